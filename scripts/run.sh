#!/usr/bin/env bash
# The main job: install, build, and serve the embedded default model over gRPC
# (port 50051, Prometheus metrics on 9400). Extra args go to `qshard serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
exec build/bin/qshard serve --model models/kjv-llama-12m "$@"
