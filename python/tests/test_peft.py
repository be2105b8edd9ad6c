"""PEFT state dicts: key pairing, per-module ranks and scalings, what clients receive."""

import math

import numpy as np
import pytest

import lora_agg
from lora_agg import LoraScaling

P = "base_model.model."


def adapter(rng, ranks, dims={"layers.0.q_proj": (6, 9), "layers.0.v_proj": (4, 9), "head": (5, 5)}):
    """A PEFT-style state dict: keys in an order PEFT never uses, to prove pairing is by name."""
    out = {}
    for module, (d_out, d_in) in dims.items():
        r = ranks[module]
        out[f"{P}{module}.lora_B.weight"] = rng.standard_normal((d_out, r)).astype(np.float32)
    for module, (d_out, d_in) in reversed(list(dims.items())):
        out[f"{P}{module}.lora_A.weight"] = rng.standard_normal((ranks[module], d_in)).astype(np.float32)
    return out


def test_scalings_follow_peft_patterns_and_rslora():
    config = LoraScaling(r=8, lora_alpha=16, rank_pattern={"v_proj": 4}, alpha_pattern={"layers.0.q_proj": 32})
    assert config.scaling("model.layers.0.q_proj") == 32 / 8
    assert config.scaling("model.layers.1.q_proj") == 16 / 8
    assert config.scaling("model.layers.0.v_proj") == 16 / 4
    assert config.rank_and_alpha("model.layers.0.xv_proj")[0] == 8  # a suffix match needs a dot
    rs = LoraScaling(r=4, lora_alpha=8, use_rslora=True)
    assert rs.scaling("fc") == 8 / math.sqrt(4)
    assert LoraScaling.from_config({"r": 2, "lora_alpha": 4, "rank_pattern": None}).scaling("fc") == 2.0


def test_fedit_on_state_dicts_averages_each_factor_by_key_name(registry, rng):
    ranks = {"layers.0.q_proj": 4, "layers.0.v_proj": 2, "head": 3}
    config = LoraScaling(r=4, lora_alpha=8, rank_pattern={"v_proj": 2, "head": 3})
    clients = [adapter(rng, ranks) for _ in range(3)]
    samples = [1, 1, 2]
    result = lora_agg.aggregate_state_dicts(registry.create("fedit"), clients, samples, config)
    merged = result.global_state_dict()
    assert set(merged) == set(clients[0])
    p = np.array(samples) / 4
    for key in clients[0]:
        np.testing.assert_allclose(merged[key], sum(w * c[key].astype(np.float64) for w, c in zip(p, clients)),
                                   rtol=1e-5, atol=1e-6, err_msg=key)
    assert result.scalings() == {f"{P}layers.0.q_proj": 2.0, f"{P}layers.0.v_proj": 4.0, f"{P}head": 8 / 3}


def test_mixed_ranks_per_client_reach_the_plugin_and_fedit_refuses_them(registry, rng):
    small = adapter(rng, {"layers.0.q_proj": 2, "layers.0.v_proj": 2, "head": 2})
    large = adapter(rng, {"layers.0.q_proj": 4, "layers.0.v_proj": 2, "head": 2})
    configs = [LoraScaling(r=2, lora_alpha=2), LoraScaling(r=2, lora_alpha=2, rank_pattern={"q_proj": 4})]
    with pytest.raises(lora_agg.UnsupportedError, match="module 'layers.0.q_proj'"):
        lora_agg.aggregate_state_dicts(registry.create("fedit"), [small, large], [1, 1], configs)


def test_heterogeneous_strategies_send_each_client_its_own_rank(registry, rng):
    hetero = [p for p in registry if p.has("heterogeneous-ranks") and not p.name.startswith("template-")]
    if not hetero:
        pytest.skip("no heterogeneous-rank strategy loaded yet")
    ranks = [{"layers.0.q_proj": r, "layers.0.v_proj": r, "head": r} for r in (2, 4)]
    clients = [adapter(rng, r) for r in ranks]
    configs = [LoraScaling(r=r["head"], lora_alpha=4) for r in ranks]
    for plugin in hetero:
        result = lora_agg.aggregate_state_dicts(plugin.create(), clients, [3, 1], configs)
        for k, rank in enumerate((2, 4)):
            mine = result.client_state_dict(k)
            assert mine[f"{P}layers.0.q_proj.lora_A.weight"].shape == (rank, 9), plugin.name
            assert mine[f"{P}layers.0.q_proj.lora_B.weight"].shape == (6, rank), plugin.name


def test_a_client_with_another_scaling_gets_the_ratio_folded_into_b(registry, rng):
    ranks = {"layers.0.q_proj": 2, "layers.0.v_proj": 2, "head": 2}
    clients = [adapter(rng, ranks) for _ in range(2)]
    configs = [LoraScaling(r=2, lora_alpha=2), LoraScaling(r=2, lora_alpha=6)]  # s = 1 and 3
    result = lora_agg.aggregate_state_dicts(registry.create("fedit"), clients, [1, 1], configs)
    module = result.modules[f"{P}head"]
    assert module.scaling == pytest.approx(2.0)
    for k, own in enumerate((1.0, 3.0)):
        received = result.client_state_dict(k)
        product = own * received[f"{P}head.lora_B.weight"].astype(np.float64) @ received[f"{P}head.lora_A.weight"]
        np.testing.assert_allclose(product, module.effective_update(), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(received[f"{P}head.lora_A.weight"], module.a)


def test_a_rank_that_contradicts_the_config_is_an_error(registry, rng):
    clients = [adapter(rng, {"layers.0.q_proj": 4, "layers.0.v_proj": 4, "head": 4}) for _ in range(2)]
    with pytest.raises(lora_agg.InvalidInputError, match="tensors have rank 4 but the LoRA config says r=8"):
        lora_agg.aggregate_state_dicts(registry.create("fedit"), clients, [1, 1], LoraScaling(r=8, lora_alpha=8))


def test_a_module_without_its_b_is_an_error_naming_client_and_module(registry, rng):
    clients = [adapter(rng, {"layers.0.q_proj": 2, "layers.0.v_proj": 2, "head": 2}) for _ in range(2)]
    del clients[1][f"{P}head.lora_B.weight"]
    with pytest.raises(lora_agg.InvalidInputError, match="client 'b': module 'head' has .* but no lora_B"):
        lora_agg.aggregate_state_dicts(registry.create("fedit"), clients, [1, 1], LoraScaling(r=2, lora_alpha=2),
                                       client_ids=["a", "b"])


def test_embedding_lora_and_dora_are_refused(registry, rng):
    state = adapter(rng, {"layers.0.q_proj": 2, "layers.0.v_proj": 2, "head": 2})
    state[f"{P}embed_tokens.lora_embedding_A"] = np.zeros((2, 10), np.float32)
    with pytest.raises(lora_agg.UnsupportedError, match="lora_embedding_A"):
        lora_agg.aggregate_state_dicts(registry.create("fedit"), [state], [1], LoraScaling(r=2, lora_alpha=2))


def test_non_lora_tensors_are_averaged_by_samples(registry, rng):
    clients = [adapter(rng, {"layers.0.q_proj": 2, "layers.0.v_proj": 2, "head": 2}) for _ in range(2)]
    for k, c in enumerate(clients):
        c[f"{P}classifier.weight"] = np.full((2, 3), float(k), np.float32)
    result = lora_agg.aggregate_state_dicts(registry.create("fedit"), clients, [1, 3], LoraScaling(r=2, lora_alpha=2))
    np.testing.assert_allclose(result.global_state_dict()[f"{P}classifier.weight"], 0.75)


def test_compress_factored_keeps_the_product_and_drops_the_rank(rng):
    u = rng.standard_normal((7, 3))
    v = rng.standard_normal((3, 5))
    uu, vv = lora_agg.compress_factored(np.hstack([u, u]), np.vstack([v, v]))  # rank 6 -> 3
    assert uu.shape == (7, 3) and vv.shape == (3, 5)
    np.testing.assert_allclose(uu.astype(np.float64) @ vv, 2 * u @ v, rtol=1e-5, atol=1e-5)


def test_real_peft_state_dicts_round_trip(registry):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(9, 6)
            self.fc2 = torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], rank_pattern={"fc2": 2},
                             init_lora_weights=False)
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(peft.get_peft_model_state_dict(peft.get_peft_model(Net(), config)))
    assert "base_model.model.fc1.lora_A.weight" in states[0]
    result = lora_agg.aggregate_state_dicts(registry.create("fedit"), states, [1, 1], config)
    target = peft.get_peft_model(Net(), config)
    received = result.client_state_dict(0)
    outcome = peft.set_peft_model_state_dict(target, {k: torch.from_numpy(v) for k, v in received.items()})
    assert not outcome.unexpected_keys
    loaded = peft.get_peft_model_state_dict(target)
    expected = (states[0]["base_model.model.fc2.lora_B.weight"] + states[1]["base_model.model.fc2.lora_B.weight"]) / 2
    torch.testing.assert_close(loaded["base_model.model.fc2.lora_B.weight"], expected)
    assert result.scalings()["base_model.model.fc2"] == 8 / 2


def test_modules_aggregated_in_parallel_threads_match_the_serial_result(registry, rng):
    clients = [adapter(rng, {"layers.0.q_proj": 2, "layers.0.v_proj": 2, "head": 2}) for _ in range(3)]
    config = LoraScaling(r=2, lora_alpha=2)
    serial = lora_agg.aggregate_state_dicts(registry.create("fedit"), clients, [1, 2, 3], config)
    parallel = lora_agg.aggregate_state_dicts(registry.create("fedit"), clients, [1, 2, 3], config, workers=3)
    for key, value in serial.global_state_dict().items():
        np.testing.assert_array_equal(parallel.global_state_dict()[key], value)
