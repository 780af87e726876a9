#!/usr/bin/env bash
# Installs everything qshard needs on a fresh Debian 12 machine (root). Idempotent: when
# every package is already installed it touches nothing and needs no network.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  # toolchain
  build-essential cmake ninja-build ccache pkg-config git
  # engine core
  libabsl-dev nlohmann-json3-dev libsentencepiece-dev
  # service
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev prometheus-cpp-dev
  # tests and benchmarks
  libgtest-dev libbenchmark-dev python3 python3-grpcio python3-numpy prometheus
  # chart tooling (helm ships inside an npm package)
  unzip
)
# Node.js may come from another source (nodesource): install Debian's only when absent.
command -v node >/dev/null 2>&1 || APT_PACKAGES+=(nodejs)
command -v npm >/dev/null 2>&1 || APT_PACKAGES+=(npm)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Optional hooks of other components (chart tooling, ...), each idempotent.
for hook in scripts/setup.d/*.sh; do
  [ -e "$hook" ] || continue
  bash "$hook"
done
echo "setup: ok"
