#!/usr/bin/env bash
# Quick start 1: set up, build every plugin, and run the built-in demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
swift build -c release
.build/release/lora-agg demo "$@"
