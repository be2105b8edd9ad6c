"""The federated digits example runs end to end (one short round) and writes its outputs."""

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "federated_digits.py"


def test_the_example_writes_table_and_plots(tmp_path, registry):
    for module in ("torch", "peft", "sklearn", "matplotlib", "flwr"):
        pytest.importorskip(module)
    spec = importlib.util.spec_from_file_location("federated_digits", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    sys.modules["federated_digits"] = example
    spec.loader.exec_module(example)
    example.main(["--out", str(tmp_path), "--rounds", "2", "--strategies", "fedit", "--pretrain-epochs", "5",
                  "--local-epochs", "1", "--settings", "equal"])
    for name in ("results.csv", "summary.md", "summary.csv", "strategies.png", "strategies.svg"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = (tmp_path / "results.csv").read_text().strip().split("\n")
    assert len(rows) == 1 + 3  # header, round 0 (pretrained), rounds 1 and 2
    assert "| equal ranks | fedit | 4/4/4/4 |" in (tmp_path / "summary.md").read_text()
