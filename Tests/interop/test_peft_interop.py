"""Interop of `lora-agg aggregate` with the real PEFT library.

Real adapters are made with PEFT on tiny randomly initialised models built
from a config (no downloads), aggregated by the built `lora-agg` binary,
loaded back with PEFT, and the merged weights are compared with an
independent numpy computation of the same strategy.

Run: LORA_AGG_BIN=.build/debug/lora-agg python -m pytest Tests/interop
"""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("LORA_AGG_BIN", str(ROOT / ".build" / "debug" / "lora-agg"))
PREFIX = "base_model.model."


def llama(kind="causal"):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         num_labels=3, pad_token_id=0)
    model = LlamaForSequenceClassification(config) if kind == "classifier" else LlamaForCausalLM(config)
    return model.eval()


def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def make_adapter(folder, base_factory, seed, dtype=None, **lora_kwargs):
    """Saves a PEFT adapter with random non-zero A and B (client `seed`)."""
    model = base_factory()
    torch.manual_seed(1000 + seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.1)
    if dtype is not None:
        peft_model = peft_model.to(dtype)
    peft_model.save_pretrained(folder)
    return folder


def read_tensors(path):
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key).float().numpy().astype(np.float64) for key in handle.keys()}


def dtypes(path):
    header_length = int.from_bytes(Path(path).read_bytes()[:8], "little")
    header = json.loads(Path(path).read_bytes()[8:8 + header_length])
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def raw_tensors(path):
    data = Path(path).read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_length])
    start = 8 + header_length
    return {k: (v["dtype"], v["shape"], data[start + v["data_offsets"][0]:start + v["data_offsets"][1]])
            for k, v in header.items() if k != "__metadata__"}


def scaling(config, module):
    """PEFT's scaling for a module, with its suffix-regex pattern rule."""
    import re

    def pick(pattern, default):
        for key, value in (pattern or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default
    r = pick(config.get("rank_pattern"), config["r"])
    alpha = pick(config.get("alpha_pattern"), config["lora_alpha"])
    return alpha / (np.sqrt(r) if config.get("use_rslora") else r), r


def run_aggregate(clients, out, strategy="fedit", extra=()):
    args = [BIN, "aggregate", "--strategy", strategy, "--out", str(out), "--quiet", *extra]
    for folder, samples in clients:
        args += ["--client", f"{folder}={samples}"]
    return subprocess.run(args, capture_output=True, text=True)


def available(strategy):
    listed = subprocess.run([BIN, "list"], capture_output=True, text=True).stdout.splitlines()
    return any(line.split()[:1] == [strategy] for line in listed)


def exact_expected(clients):
    """The ideal update Σ p_k s_k B_k A_k per module, any ranks."""
    total = sum(n for _, n in clients)
    deltas = {}
    for folder, samples in clients:
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
        tensors = read_tensors(Path(folder) / "adapter_model.safetensors")
        for key in tensors:
            if key.endswith(".lora_A.weight"):
                module = key[len(PREFIX):-len(".lora_A.weight")]
                s_k = scaling(config, module)[0]
                update = samples / total * s_k * tensors[PREFIX + module + ".lora_B.weight"] @ tensors[key]
                deltas[module] = deltas.get(module, 0) + update
    return deltas


def fedit_expected(clients):
    """Independent FedIT: p_k-weighted means of √(s_k/s)·A_k and √(s_k/s)·B_k, scaling s."""
    total = sum(n for _, n in clients)
    adapters = []
    for folder, samples in clients:
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
        adapters.append((samples / total, config, read_tensors(Path(folder) / "adapter_model.safetensors")))
    modules = sorted(k[len(PREFIX):-len(".lora_A.weight")] for k in adapters[0][2] if k.endswith(".lora_A.weight"))
    deltas = {}
    for module in modules:
        s_k = [scaling(c, module)[0] for _, c, _ in adapters]
        p = [w for w, _, _ in adapters]
        s = s_k[0] if all(x == s_k[0] for x in s_k) else sum(pk * sk for pk, sk in zip(p, s_k))
        a = sum(pk * np.sqrt(sk / s) * t[PREFIX + module + ".lora_A.weight"] for pk, sk, (_, _, t) in zip(p, s_k, adapters))
        b = sum(pk * np.sqrt(sk / s) * t[PREFIX + module + ".lora_B.weight"] for pk, sk, (_, _, t) in zip(p, s_k, adapters))
        deltas[module] = s * b @ a
    return deltas, adapters


def merged_weights(base_factory, adapter_folder):
    model = PeftModel.from_pretrained(base_factory(), str(adapter_folder)).float()
    merged = model.merge_and_unload()
    return {k: v.detach().double().numpy() for k, v in merged.state_dict().items()}


def check_merged(base_factory, out, deltas, tolerance, conv1d=False):
    base = {k: v.detach().double().numpy() for k, v in base_factory().state_dict().items()}
    merged = merged_weights(base_factory, out)
    assert deltas, "no LoRA modules"
    for module, delta in deltas.items():
        key = module + ".weight"
        expected = base[key] + (delta.T if conv1d else delta)
        error = np.abs(merged[key] - expected).max() / max(np.abs(delta).max(), 1e-12)
        assert error < tolerance, f"{module}: relative error {error}"
    return merged


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_equal_ranks(tmp_path):
    clients = [(make_adapter(tmp_path / f"c{k}", llama, k, r=4, lora_alpha=8, target_modules=LLAMA_TARGETS), n)
               for k, n in enumerate([10, 30, 60])]
    result = run_aggregate(clients, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    deltas, _ = fedit_expected(clients)
    check_merged(llama, tmp_path / "out", deltas, 1e-5)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["strategy"]["name"] == "fedit"
    assert [c["weight"] for c in report["clients"]] == pytest.approx([0.1, 0.3, 0.6])
    assert dtypes(tmp_path / "out" / "adapter_model.safetensors")[PREFIX + "model.layers.0.self_attn.q_proj.lora_A.weight"] == "F32"


def test_different_ranks_via_rank_pattern(tmp_path):
    clients = [
        (make_adapter(tmp_path / "c0", llama, 0, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 10),
        (make_adapter(tmp_path / "c1", llama, 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      rank_pattern={"model.layers.1.self_attn.q_proj": 2}), 20),
    ]
    result = run_aggregate(clients, tmp_path / "out")
    assert result.returncode != 0
    assert "model.layers.1.self_attn.q_proj" in result.stderr and "equal rank" in result.stderr
    assert not (tmp_path / "out").exists()
    if available("flora"):
        # FLoRA stacks the clients' factors: exact for any ranks, output rank Σ r_k per module.
        result = run_aggregate(clients, tmp_path / "stacked", strategy="flora")
        assert result.returncode == 0, result.stderr
        check_merged(llama, tmp_path / "stacked", exact_expected(clients), 1e-5)
        config = json.loads((tmp_path / "stacked" / "adapter_config.json").read_text())
        assert scaling(config, "model.layers.1.self_attn.q_proj")[1] == 4 + 2
        assert scaling(config, "model.layers.0.self_attn.q_proj")[1] == 4 + 4
    if available("zero-pad"):
        result = run_aggregate(clients, tmp_path / "padded", strategy="zero-pad")
        assert result.returncode == 0, result.stderr
        # Zero-padding to the largest rank then averaging (scalings agree here: alpha 8 / r... differ
        # per rank, so only check that PEFT loads it and the output config states each module's rank).
        config = json.loads((tmp_path / "padded" / "adapter_config.json").read_text())
        tensors = read_tensors(tmp_path / "padded" / "adapter_model.safetensors")
        for key, value in tensors.items():
            if key.endswith(".lora_A.weight"):
                module = key[len(PREFIX):-len(".lora_A.weight")]
                assert scaling(config, module)[1] == value.shape[0]
        merged_weights(llama, tmp_path / "padded")


def test_rslora_with_alpha_pattern(tmp_path):
    clients = [
        (make_adapter(tmp_path / "c0", llama, 0, r=4, lora_alpha=8, use_rslora=True, target_modules=LLAMA_TARGETS), 1),
        (make_adapter(tmp_path / "c1", llama, 1, r=4, lora_alpha=16, use_rslora=True, target_modules=LLAMA_TARGETS,
                      alpha_pattern={"v_proj": 4}), 3),
    ]
    result = run_aggregate(clients, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    deltas, _ = fedit_expected(clients)
    check_merged(llama, tmp_path / "out", deltas, 1e-5)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["use_rslora"] is True


def test_bf16(tmp_path):
    clients = [(make_adapter(tmp_path / f"c{k}", llama, k, dtype=torch.bfloat16, r=4, lora_alpha=8,
                             target_modules=LLAMA_TARGETS), n) for k, n in enumerate([1, 2])]
    assert set(dtypes(clients[0][0] / "adapter_model.safetensors").values()) == {"BF16"}
    result = run_aggregate(clients, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert set(dtypes(tmp_path / "out" / "adapter_model.safetensors").values()) == {"BF16"}
    deltas, _ = fedit_expected(clients)
    # BF16 keeps 8 bits of mantissa: the averaged factors are rounded once more on writing.
    check_merged(llama, tmp_path / "out", deltas, 2e-2)
    result = run_aggregate(clients, tmp_path / "out32", extra=["--dtype", "f32"])
    assert result.returncode == 0, result.stderr
    assert set(dtypes(tmp_path / "out32" / "adapter_model.safetensors").values()) == {"F32"}
    check_merged(llama, tmp_path / "out32", deltas, 1e-5)


def test_modules_to_save(tmp_path):
    factory = lambda: llama("classifier")
    clients = [(make_adapter(tmp_path / f"c{k}", factory, k, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             modules_to_save=["score"], task_type="SEQ_CLS"), n) for k, n in enumerate([1, 3])]
    result = run_aggregate(clients, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    deltas, adapters = fedit_expected(clients)
    merged = check_merged(factory, tmp_path / "out", deltas, 1e-5)
    heads = [t[PREFIX + "score.weight"] for _, _, t in adapters]
    expected = 0.25 * heads[0] + 0.75 * heads[1]
    assert np.abs(merged["score.weight"] - expected).max() < 1e-6
    result = run_aggregate(clients, tmp_path / "refused", extra=["--extra-tensors", "error"])
    assert result.returncode != 0 and "score.weight" in result.stderr


def test_gpt2_conv1d(tmp_path):
    clients = [(make_adapter(tmp_path / f"c{k}", gpt2, k, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                             fan_in_fan_out=True), n) for k, n in enumerate([2, 1])]
    result = run_aggregate(clients, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    deltas, _ = fedit_expected(clients)
    # attn.c_proj is square (32x32): only the values catch a wrong orientation there.
    assert any(d.shape[0] == d.shape[1] for d in deltas.values())
    check_merged(gpt2, tmp_path / "out", deltas, 1e-5, conv1d=True)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["fan_in_fan_out"] is True


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_peft_adapter_round_trips_bit_exactly(tmp_path, dtype):
    """One client through fedit is the identity: every tensor comes back byte for byte."""
    folder = make_adapter(tmp_path / "c0", llama, 0, dtype=dtype, r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)
    expected_dtype = {None: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
    assert set(dtypes(folder / "adapter_model.safetensors").values()) == {expected_dtype}
    result = run_aggregate([(folder, 7)], tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert raw_tensors(tmp_path / "out" / "adapter_model.safetensors") == raw_tensors(folder / "adapter_model.safetensors")
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    original = json.loads((folder / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "target_modules", "base_model_name_or_path", "peft_version"):
        value = written[key]
        assert (sorted(value) if isinstance(value, list) else value) == (sorted(original[key]) if isinstance(original[key], list) else original[key])


def save_base(model, path):
    """The base model as one safetensors checkpoint (tied weights written once)."""
    from safetensors.torch import save_file
    tensors, seen = {}, set()
    for key, value in model.state_dict().items():
        if value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        tensors[key] = value.detach().clone().contiguous()
    save_file(tensors, str(path))


def load_base(factory, path):
    from safetensors.torch import load_file
    model = factory()
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    assert not unexpected
    model.tie_weights()
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_residual_applied_to_the_base_is_exact(tmp_path, family):
    """fedex-lora: adapter + residual folded into the base by apply-residual = W0 + Σ p_k s_k B_k A_k."""
    if not available("fedex-lora"):
        pytest.skip("fedex-lora is not built in this branch")
    factory, conv1d = (llama, False) if family == "llama" else (gpt2, True)
    kwargs = dict(target_modules=LLAMA_TARGETS) if family == "llama" else dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    clients = [(make_adapter(tmp_path / f"c{k}", factory, k, r=4, lora_alpha=8 * (k + 1), **kwargs), n)
               for k, n in enumerate([1, 2, 3])]
    result = run_aggregate(clients, tmp_path / "out", strategy="fedex-lora")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "residual.safetensors").exists()
    save_base(factory(), tmp_path / "base.safetensors")
    applied = subprocess.run([BIN, "apply-residual", "--base", str(tmp_path / "base.safetensors"),
                              "--residual", str(tmp_path / "out" / "residual.safetensors"),
                              "--out", str(tmp_path / "merged-base.safetensors")], capture_output=True, text=True)
    assert applied.returncode == 0, applied.stderr
    base = {k: v.detach().double().numpy() for k, v in factory().state_dict().items()}
    model = PeftModel.from_pretrained(load_base(factory, tmp_path / "merged-base.safetensors"), str(tmp_path / "out"))
    merged = {k: v.detach().double().numpy() for k, v in model.float().merge_and_unload().state_dict().items()}
    for module, delta in exact_expected(clients).items():
        key = module + ".weight"
        expected = base[key] + (delta.T if conv1d else delta)
        error = np.abs(merged[key] - expected).max() / np.abs(delta).max()
        assert error < 1e-5, f"{module}: relative error {error}"
