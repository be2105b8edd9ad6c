"""The ctypes mirror matches lora_agg.h byte for byte."""

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lora_agg import _abi

HEADER_DIR = Path(__file__).resolve().parents[2] / "Sources" / "CLoraAggABI" / "include"

# sizeof on LP64 Linux, worked out by hand from the header's field list.
EXPECTED_SIZES = {
    "lora_agg_client": 48, "lora_agg_round": 48, "lora_agg_client_payload": 32, "lora_agg_diagnostic": 16,
    "lora_agg_result": 96, "lora_agg_bytes": 24, "lora_agg_host_api": 32, "lora_agg_plugin": 136,
}


def test_struct_sizes_match_the_values_worked_out_from_the_header():
    assert {name: ctypes.sizeof(cls) for name, cls in _abi.STRUCTS.items()} == EXPECTED_SIZES


def _compiler():
    # The header uses clang's __has_feature; the Swift toolchain ships clang.
    for name in ("clang", "cc", "gcc"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_every_field_offset_matches_a_compiled_c_program(tmp_path):
    compiler = _compiler()
    if compiler is None or not (HEADER_DIR / "lora_agg.h").is_file():
        pytest.skip("no C compiler or no header in this checkout")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "lora_agg.h"', "int main(void) {"]
    expected = []
    for name, cls in _abi.STRUCTS.items():
        lines.append(f'printf("{name} sizeof %zu\\n", sizeof({name}));')
        expected.append(f"{name} sizeof {ctypes.sizeof(cls)}")
        for field, _ in cls._fields_:
            lines.append(f'printf("{name} {field} %zu\\n", offsetof({name}, {field}));')
            expected.append(f"{name} {field} {getattr(cls, field).offset}")
    lines.append("return 0; }")
    source = tmp_path / "layout.c"
    source.write_text("\n".join(lines))
    binary = tmp_path / "layout"
    built = subprocess.run([compiler, "-I", str(HEADER_DIR), str(source), "-o", str(binary)],
                           capture_output=True, text=True)
    if built.returncode != 0 and os.path.basename(compiler) != "clang":
        pytest.skip(f"{compiler} cannot compile the header: {built.stderr.strip()[:200]}")
    assert built.returncode == 0, built.stderr
    output = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout.split("\n")
    assert [line for line in output if line] == expected


def test_status_and_capability_values_match_the_header():
    text = (HEADER_DIR / "lora_agg.h").read_text() if (HEADER_DIR / "lora_agg.h").is_file() else None
    if text is None:
        pytest.skip("no header in this checkout")
    for status in _abi.Status:
        assert f"LORA_AGG_{status.name} = {status.value}," in text
    for capability in _abi.Capability:
        assert f"LORA_AGG_CAP_{capability.name} = 1u << {capability.value.bit_length() - 1}," in text
