#!/usr/bin/env bash
# Copies the shared fixtures a GPU run needs into .device-fixtures/models/ (git-ignored), to
# be carried with the device call: ../shared does not travel to the device machine, and a
# call carries at most 64 MiB with the working tree. So:
#   - kjv-llama-12m: the repo's embedded copy (models/, which travels anyway) by relative
#     symbolic links, plus its reference.json;
#   - kjv-llama-12m-gptq-4bit, kjv-llama-12m-awq-4bit: copied (about 11 MB each);
#   - kjv-llama-12m-fp8-dynamic: reference.json and config only; the GPU test quantizes
#     the base model at load, which reproduces this fixture byte for byte.
# scripts/device-check.sh points QSHARD_SHARED_DIR at .device-fixtures when it exists.
#
#   scripts/prepare-device-fixtures.sh [SHARED_DIR]   # default ../shared
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
SHARED="$(realpath "${1:-../shared}")"
DEST=.device-fixtures/models
[[ -d "$SHARED/models" ]] || { echo "prepare-device-fixtures: no $SHARED/models" >&2; exit 1; }

rm -rf .device-fixtures
mkdir -p "$DEST/kjv-llama-12m" "$DEST/kjv-llama-12m-fp8-dynamic"
for f in models/kjv-llama-12m/*; do
  ln -s "../../../$f" "$DEST/kjv-llama-12m/$(basename "$f")"
done
cp "$SHARED/models/kjv-llama-12m/reference.json" "$DEST/kjv-llama-12m/"
for m in kjv-llama-12m-gptq-4bit kjv-llama-12m-awq-4bit; do
  cp -r "$SHARED/models/$m" "$DEST/$m"
done
cp "$SHARED/models/kjv-llama-12m-fp8-dynamic/"{reference.json,config.json} \
  "$DEST/kjv-llama-12m-fp8-dynamic/"
chmod -R u+w .device-fixtures
echo "prepare-device-fixtures: wrote .device-fixtures ($(du -shL .device-fixtures | cut -f1) with the linked base model)"
