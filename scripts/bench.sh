#!/usr/bin/env bash
# Builds in release and runs the benchmark (arguments are passed to lora-agg-bench).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
swift build -c release
.build/release/lora-agg-bench "$@"
