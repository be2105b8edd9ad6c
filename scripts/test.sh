#!/usr/bin/env bash
# Quick start 2: set up and run every test (Swift suite, conformance of every plugin).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
swift build
swift test
