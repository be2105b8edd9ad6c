#!/usr/bin/env bash
# Installs the system packages lora-agg needs, when missing: OpenBLAS (BLAS +
# LAPACK) for the math and libffi for the Python bindings' ctypes.
set -euo pipefail
missing=()
for package in libopenblas-dev libffi-dev pkg-config; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing ${missing[*]}"
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi
