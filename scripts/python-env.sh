#!/usr/bin/env bash
# Creates (once) the virtual environment the Python tests use, with a CPU-only
# torch, PEFT, transformers, safetensors, numpy and Flower, and prints its
# python path. Everything is offline-capable: no model is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-test
stamp="$venv/.requirements-v1"
if [ ! -f "$stamp" ]; then
    echo "==> creating $venv (CPU torch, peft, transformers, safetensors, numpy, flwr)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check \
        "torch==2.13.0+cpu" "peft==0.21.2" "transformers" "safetensors" "numpy" \
        "flwr==1.41.0" "pytest" "matplotlib" "scikit-learn" >&2
    touch "$stamp"
fi
echo "$PWD/$venv/bin/python"
