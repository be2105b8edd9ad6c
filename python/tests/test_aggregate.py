"""Golden cases through the bindings, checked against formulas computed here in numpy."""

import math
import os

import numpy as np
import pytest

import lora_agg
from lora_agg.host import factored_svd_numpy

from conftest import ideal_update, random_client, real_strategies, relative_error

D_OUT, D_IN = 6, 11  # non-square on purpose: a transposed factor cannot pass


def test_fedit_is_the_sample_weighted_mean_of_a_and_of_b(registry, rng):
    clients = [random_client(rng, D_OUT, D_IN, 3, samples=n, scaling=2.0) for n in (10, 30, 60)]
    result = registry.create("fedit").aggregate(clients, module="layers.0.q_proj")
    p = np.array([0.1, 0.3, 0.6])
    expected_a = sum(w * c.a.astype(np.float64) for w, c in zip(p, clients))
    expected_b = sum(w * c.b.astype(np.float64) for w, c in zip(p, clients))
    assert result.a.shape == (3, D_IN) and result.b.shape == (D_OUT, 3)
    np.testing.assert_allclose(result.a, expected_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.b, expected_b, rtol=1e-5, atol=1e-6)
    assert result.scaling == 2.0
    assert result.residual is None and result.payloads is None


def test_fedit_rescales_clients_of_different_scalings_by_the_square_root(registry, rng):
    # s_k = α/r and α/√r (rsLoRA) for r = 4: 16/4 = 4 and 8/2 = 4 would agree, so use α 8 and 16.
    scalings = [8 / 4, 16 / math.sqrt(4)]
    clients = [random_client(rng, D_OUT, D_IN, 4, samples=n, scaling=s) for n, s in zip((1, 3), scalings)]
    result = registry.create("fedit").aggregate(clients)
    p = np.array([0.25, 0.75])
    s = float(p @ np.array(scalings))
    c = [math.sqrt(sk / s) for sk in scalings]
    expected_a = sum(w * ck * cl.a.astype(np.float64) for w, ck, cl in zip(p, c, clients))
    assert result.scaling == pytest.approx(s)
    np.testing.assert_allclose(result.a, expected_a, rtol=1e-5, atol=1e-6)


def test_the_c_template_gives_fedit_results(registry, rng):
    if "template-c" not in registry:
        pytest.skip("template-c not built")
    clients = [random_client(rng, D_OUT, D_IN, 2, samples=n, scaling=0.5) for n in (2, 5)]
    ours = registry.create("template-c").aggregate(clients)
    reference = registry.create("fedit").aggregate(clients)
    np.testing.assert_allclose(ours.a, reference.a, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours.b, reference.b, rtol=1e-6, atol=1e-7)


def _round_for(plugin, rng, heterogeneous):
    ranks = (2, 4, 3) if heterogeneous else (3, 3, 3)
    shared_a = rng.standard_normal((max(ranks), D_IN)).astype(np.float32)
    clients = []
    for k, (rank, samples) in enumerate(zip(ranks, (5, 3, 2))):
        alpha = 2.0 * (k + 1)
        scaling = alpha / math.sqrt(rank) if k == 1 else alpha / rank  # one rsLoRA client
        a = shared_a[:rank].copy() if plugin.has("requires-shared-a") else None
        clients.append(random_client(rng, D_OUT, D_IN, rank, samples, scaling, f"client-{k}", a=a))
    return clients


@pytest.mark.parametrize("heterogeneous", [False, True], ids=["equal-ranks", "mixed-ranks"])
def test_exact_strategies_reproduce_the_weighted_sum_of_client_products(registry, rng, heterogeneous):
    exact = [p for p in real_strategies(registry) if p.has("exact")]
    if not exact:
        pytest.skip("no exact strategy loaded yet")
    for plugin in exact:
        if heterogeneous and not plugin.has("heterogeneous-ranks"):
            continue
        clients = _round_for(plugin, rng, heterogeneous)
        result = plugin.create().aggregate(clients, module="fc1")
        error = relative_error(result.effective_update(), ideal_update(clients))
        assert error < 1e-5, f"{plugin.name}: relative error {error}"


def test_every_strategy_returns_consistent_shapes_for_the_round_it_accepts(registry, rng):
    for plugin in real_strategies(registry):
        clients = _round_for(plugin, rng, heterogeneous=plugin.has("heterogeneous-ranks"))
        result = plugin.create().aggregate(clients, module="fc1")
        assert result.a.shape[1] == D_IN and result.b.shape == (D_OUT, result.rank), plugin.name
        assert result.scaling > 0 and np.isfinite(result.a).all() and np.isfinite(result.b).all(), plugin.name
        if result.payloads is not None:
            assert len(result.payloads) == len(clients), plugin.name
            for payload in result.payloads:
                assert payload.a.shape[1] == D_IN and payload.b.shape == (D_OUT, payload.rank)
        if result.residual is not None:
            u, v = result.residual
            assert u.shape[0] == D_OUT and v.shape[1] == D_IN and u.shape[1] == v.shape[0], plugin.name


def test_heterogeneous_ranks_on_fedit_raise_the_plugins_unsupported_error(registry, rng):
    clients = [random_client(rng, D_OUT, D_IN, r, 1, client_id=f"c{r}") for r in (2, 4)]
    with pytest.raises(lora_agg.UnsupportedError) as caught:
        registry.create("fedit").aggregate(clients, module="layers.3.v_proj")
    assert caught.value.status == lora_agg.Status.UNSUPPORTED
    assert "module 'layers.3.v_proj'" in str(caught.value) and "'c4' r=4" in str(caught.value)


def test_non_finite_factors_raise_the_plugins_invalid_input_error_naming_the_client(registry, rng):
    clients = [random_client(rng, D_OUT, D_IN, 2, 1, client_id=f"site-{k}") for k in range(2)]
    clients[1].a[0, 3] = np.nan
    with pytest.raises(lora_agg.InvalidInputError) as caught:
        registry.create("fedit").aggregate(clients, module="fc2")
    assert caught.value.status == lora_agg.Status.INVALID_INPUT
    assert "site-1" in str(caught.value)


def test_an_unknown_hyperparameter_raises_the_plugins_invalid_config_error(registry):
    with pytest.raises(lora_agg.InvalidConfigError) as caught:
        registry.create("fedit", {"learning_rate": 0.1})
    assert caught.value.status == lora_agg.Status.INVALID_CONFIG
    assert "learning_rate" in str(caught.value)


def test_hyperparameters_reach_the_plugin(registry, rng):
    if "template-swift" not in registry:
        pytest.skip("template-swift not built")
    clients = [random_client(rng, D_OUT, D_IN, 2, n) for n in (1, 1)]
    plain = registry.create("template-swift").aggregate(clients)
    doubled = registry.create("template-swift", server_lr=2.0).aggregate(clients)
    np.testing.assert_allclose(doubled.b, 2 * plain.b, rtol=1e-6)
    with pytest.raises(lora_agg.InvalidConfigError):
        registry.create("template-swift", server_lr=-1)


@pytest.mark.parametrize("case, fragment", [
    ("b-transposed", "B is 2x6; expected 6x2"),
    ("a-wrong-width", "A is 2x5; expected 2x11"),
    ("zero-samples", "total sample count is 0.0"),
    ("bad-scaling", "invalid scaling 0.0"),
])
def test_malformed_rounds_are_refused_before_crossing_the_boundary(registry, rng, case, fragment):
    clients = [random_client(rng, D_OUT, D_IN, 2, 1, client_id="x") for _ in range(2)]
    if case == "b-transposed":
        clients[1].b = clients[1].b.T.copy()
    elif case == "a-wrong-width":
        clients[1].a = clients[1].a[:, :5].copy()
    elif case == "zero-samples":
        for c in clients:
            c.samples = 0
    else:
        clients[0].scaling = 0.0
    with pytest.raises(lora_agg.InvalidInputError, match=fragment.replace(".", r"\.")):
        registry.create("fedit").aggregate(clients)


def test_inputs_that_are_not_float32_c_contiguous_are_converted(registry, rng):
    clients = [random_client(rng, D_OUT, D_IN, 2, 1) for _ in range(2)]
    as_f64 = [lora_agg.ClientFactors(a=np.asfortranarray(c.a.astype(np.float64)), b=c.b.astype(np.float64),
                                     samples=1) for c in clients]
    np.testing.assert_array_equal(registry.create("fedit").aggregate(as_f64).a,
                                  registry.create("fedit").aggregate(clients).a)


def test_the_hosts_factored_svd_matches_a_dense_svd(rng):
    bs = [rng.standard_normal((D_OUT, r)) for r in (2, 3)]
    as_ = [rng.standard_normal((r, D_IN)) for r in (2, 3)]
    weights = [0.3, 0.7]
    dense = sum(w * b @ a for w, b, a in zip(weights, bs, as_))
    u, sigma, vt = factored_svd_numpy(weights, bs, as_, keep=4)
    np.testing.assert_allclose(sigma, np.linalg.svd(dense, compute_uv=False)[:4], rtol=1e-10)
    np.testing.assert_allclose(u @ np.diag(sigma) @ vt, _truncated(dense, 4), atol=1e-10)


def _truncated(matrix, keep):
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return u[:, :keep] @ np.diag(s[:keep]) @ vt[:keep]


def test_stateful_strategies_round_trip_their_state(registry, rng):
    stateful = [p for p in real_strategies(registry) if p.has("stateful")]
    if not stateful:
        pytest.skip("no stateful strategy loaded")
    for plugin in stateful:
        instance = plugin.create()
        instance.aggregate(_round_for(plugin, rng, plugin.has("heterogeneous-ranks")), module="fc1")
        saved = instance.save_state()
        plugin.create().load_state(saved)


def test_a_stateless_strategy_refuses_load_state(registry):
    with pytest.raises(lora_agg.InvalidStateError):
        registry.create("fedit").load_state(b"x")
    assert registry.create("fedit").save_state() is None


def test_describe_reports_metadata_and_the_parameter_schema(registry):
    info = registry.plugin("fedit").describe()
    assert info["name"] == "fedit" and info["version"] and "arXiv" in info["citation"]
    assert info["parameters"] == [] and info["capabilities"] == [] and info["abi"] == "1.0"
    for plugin in registry:
        for spec in plugin.parameters:
            assert spec.type in {"number", "integer", "string", "boolean"}, plugin.name


def test_unknown_strategy_names_suggest_the_nearest(registry):
    with pytest.raises(lora_agg.PluginLoadError, match="Did you mean 'fedit'") as caught:
        registry.plugin("fedti")
    assert caught.value.kind == "unknown-strategy"


def test_a_file_that_is_not_a_shared_object_is_refused(tmp_path):
    fake = tmp_path / "libFake.so"
    fake.write_text("not an ELF file lora_agg_plugin_entry\0")
    with pytest.raises(lora_agg.PluginLoadError) as caught:
        lora_agg.Registry([fake])
    assert caught.value.kind == "not-shared-object"
    registry = lora_agg.Registry([tmp_path])  # in a folder it is skipped, not fatal
    assert registry.names == [] and registry.skipped[0][0] == str(fake)


def test_a_missing_path_is_refused(tmp_path):
    with pytest.raises(lora_agg.PluginLoadError) as caught:
        lora_agg.Registry([tmp_path / "nowhere"])
    assert caught.value.kind == "path-missing"


def test_search_order_is_explicit_then_environment_then_build_folder(tmp_path):
    paths = lora_agg.search_paths([str(tmp_path / "x")], environ={lora_agg.ENVIRONMENT_VARIABLE: "/e1::/e2"},
                                  include_build_folder=False)
    assert paths == [str(tmp_path / "x"), "/e1", "/e2"]


def test_an_earlier_location_shadows_a_later_one_with_the_same_plugin(registry, tmp_path):
    fedit = registry.plugin("fedit").path
    copy = tmp_path / "libFedITCopy.so"
    copy.write_bytes(open(fedit, "rb").read())
    shadowing = lora_agg.Registry([os.path.dirname(fedit), tmp_path])
    assert shadowing.plugin("fedit").path == fedit
    assert (str(copy), fedit) in shadowing.shadowed
