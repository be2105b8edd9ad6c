"""zero-pad, replication-pad and ffa-lora on real PEFT adapters.

Adapters made with PEFT (mixed ranks via r, mixed scalings via lora_alpha and
use_rslora) are aggregated by the built `lora-agg` binary, loaded back with
PEFT, and compared with an independent numpy computation of each rule.

Run: LORA_AGG_BIN=.build/debug/lora-agg python -m pytest Tests/interop
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

import test_peft_interop as peft_helpers

TARGETS = ["q_proj", "v_proj"]


def shared_a_adapter(folder, seed, **lora_kwargs):
    """An FFA-LoRA client: PEFT's default init of A from one shared seed, B trained (random)."""
    model = peft_helpers.llama()
    torch.manual_seed(42)
    peft_model = get_peft_model(model, LoraConfig(target_modules=TARGETS, **lora_kwargs))
    torch.manual_seed(1000 + seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.1)
    peft_model.save_pretrained(folder)
    return folder


def factors(folder):
    """Per module: (A, B, s) read from the files, A and B paired by their PEFT key names."""
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    tensors = peft_helpers.read_tensors(Path(folder) / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(peft_helpers.PREFIX):-len(".lora_A.weight")]
            out[module] = (a, tensors[key.replace(".lora_A.", ".lora_B.")], peft_helpers.scaling(config, module)[0])
    return out


def exact_mean(clients):
    """Σ p_k s_k B_k A_k per module."""
    total = sum(n for _, n in clients)
    out = {}
    for folder, n in clients:
        for module, (a, b, s) in factors(folder).items():
            out[module] = out.get(module, 0) + n / total * s * b @ a
    return out


def padded_mean(clients, renormalise):
    """zero-pad (renormalise=False) or replication-pad, written from the formulas."""
    total = sum(n for _, n in clients)
    per_client = [(factors(folder), n / total) for folder, n in clients]
    out = {}
    for module in per_client[0][0]:
        entries = [(f[module], p) for f, p in per_client]
        scalings = [s for (_, _, s), _ in entries]
        common = scalings[0] if len(set(scalings)) == 1 else sum(p * s for (_, _, s), p in entries)
        rank = max(a.shape[0] for (a, _, _), _ in entries)
        a_bar = np.zeros((rank, entries[0][0][0].shape[1]))
        b_bar = np.zeros((entries[0][0][1].shape[0], rank))
        for i in range(rank):
            owners = [((a, b, s), p) for (a, b, s), p in entries if a.shape[0] > i]
            weight_total = sum(p for _, p in owners) if renormalise else 1.0
            for (a, b, s), p in owners:
                c = np.sqrt(s / common)
                a_bar[i] += p / weight_total * c * a[i]
                b_bar[:, i] += p / weight_total * c * b[:, i]
        out[module] = common * b_bar @ a_bar
    return out


def effective(folder):
    return {module: s * b @ a for module, (a, b, s) in factors(folder).items()}


def relative_error(got, expected):
    return max(np.abs(got[m] - expected[m]).max() / np.abs(expected[m]).max() for m in expected)


@pytest.mark.parametrize("strategy, renormalise", [("zero-pad", False), ("replication-pad", True)])
def test_padding_with_mixed_ranks_and_scalings(tmp_path, strategy, renormalise):
    if not peft_helpers.available(strategy):
        pytest.skip(f"{strategy} is not built")
    clients = [
        (peft_helpers.make_adapter(tmp_path / "c0", peft_helpers.llama, 0, r=2, lora_alpha=8, target_modules=TARGETS), 10),
        (peft_helpers.make_adapter(tmp_path / "c1", peft_helpers.llama, 1, r=4, lora_alpha=8, use_rslora=True,
                                   target_modules=TARGETS), 30),
        (peft_helpers.make_adapter(tmp_path / "c2", peft_helpers.llama, 2, r=4, lora_alpha=16, target_modules=TARGETS), 20),
    ]
    result = peft_helpers.run_aggregate(clients, tmp_path / "out", strategy=strategy)
    assert result.returncode == 0, result.stderr
    expected = padded_mean(clients, renormalise)
    assert relative_error(effective(tmp_path / "out"), expected) < 1e-5
    peft_helpers.check_merged(peft_helpers.llama, tmp_path / "out", expected, 1e-5)


def test_ffa_lora_is_exact_keeps_a_and_names_a_client_with_its_own_a(tmp_path):
    if not peft_helpers.available("ffa-lora"):
        pytest.skip("ffa-lora is not built")
    clients = [(shared_a_adapter(tmp_path / "f0", 0, r=4, lora_alpha=8), 10),
               (shared_a_adapter(tmp_path / "f1", 1, r=4, lora_alpha=8, use_rslora=True), 30),
               (shared_a_adapter(tmp_path / "f2", 2, r=4, lora_alpha=16), 60)]
    result = peft_helpers.run_aggregate(clients, tmp_path / "out", strategy="ffa-lora")
    assert result.returncode == 0, result.stderr
    expected = exact_mean(clients)
    assert relative_error(effective(tmp_path / "out"), expected) < 1e-5
    peft_helpers.check_merged(peft_helpers.llama, tmp_path / "out", expected, 1e-5)
    shared = factors(tmp_path / "f0")
    for module, (a, _, _) in factors(tmp_path / "out").items():
        assert np.array_equal(a, shared[module][0]), module
    # make_adapter draws its own A, so this client breaks the shared-A assumption.
    odd = (peft_helpers.make_adapter(tmp_path / "odd", peft_helpers.llama, 7, r=4, lora_alpha=8, target_modules=TARGETS), 5)
    result = peft_helpers.run_aggregate(clients + [odd], tmp_path / "refused", strategy="ffa-lora")
    assert result.returncode != 0
    assert "'odd'" in result.stderr and "self_attn" in result.stderr and "A differs" in result.stderr
    assert not (tmp_path / "refused").exists()
