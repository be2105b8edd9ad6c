#!/usr/bin/env bash
# Quick start 2: set up and run every test (Swift suite, conformance of every plugin).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
swift build
swift test
# PEFT interop: real adapters made with PEFT, aggregated by the built binary, loaded back with PEFT.
LORA_AGG_BIN="$(swift build --show-bin-path)/lora-agg" "$(scripts/python-env.sh)" -m pytest -q -p no:cacheprovider Tests/interop
# Python bindings and the Flower strategy, over the plugins this build produced.
LORA_AGG_PLUGIN_PATH="$(swift build --show-bin-path)" "$(scripts/python-env.sh)" -m pytest -q -p no:cacheprovider python/tests
