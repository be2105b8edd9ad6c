"""Flower: two rounds with two clients through the real strategy loop, checked against numpy."""

import json

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

import lora_agg  # noqa: E402
from lora_agg import flower as lf  # noqa: E402
from lora_agg import LoraScaling  # noqa: E402

from conftest import real_strategies, relative_error  # noqa: E402

P = "base_model.model."
DIMS = {"fc1": (5, 8), "fc2": (3, 5)}  # non-square
SAMPLES = {1: 30, 2: 10}


def initial_state(rank):
    rng = np.random.default_rng(7)
    state = {}
    for module, (d_out, d_in) in DIMS.items():
        state[f"{P}{module}.lora_A.weight"] = rng.standard_normal((rank, d_in)).astype(np.float32)
        state[f"{P}{module}.lora_B.weight"] = np.zeros((d_out, rank), np.float32)
    return state


def local_step(node, server_round, factor, shape):
    """A deterministic stand-in for local training, different per node and round."""
    rng = np.random.default_rng(1000 * node + 10 * server_round + (factor == "B"))
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)


def make_client_app(configs):
    app = ClientApp()

    @app.train()
    def train(message, context):
        node = context.node_id
        config = configs[node]
        received = lf.from_array_record(message.content["arrays"])
        view = lf.client_state_dict(received, config)
        trained = {}
        for key, value in view.lora.items():
            factor = "A" if ".lora_A." in key else "B"
            trained[key] = value + local_step(node, message.content["config"]["server-round"], factor, value.shape)
        return Message(RecordDict({"arrays": lf.to_array_record(trained),
                                   "metrics": MetricRecord({"num-examples": SAMPLES[node]}),
                                   lf.LORA_CONFIG_KEY: lf.lora_config_record(config)}), reply_to=message)

    @app.evaluate()
    def evaluate(message, context):
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=message)

    return app


def run(strategy_name, configs, rounds=2, rank=2, registry=None):
    strategy = lf.LoraAggStrategy(strategy_name, registry=registry, fraction_evaluate=0.0,
                                  min_available_nodes=2, min_train_nodes=2)
    grid = lf.InProcessGrid(make_client_app(configs), num_nodes=2)
    initial = lf.initial_arrays(initial_state(rank), configs[1])
    result = strategy.start(grid, lf.to_array_record(initial), num_rounds=rounds)
    return strategy, lf.from_array_record(result.arrays)


def test_fedit_through_flower_matches_numpy_after_two_rounds(registry):
    config = LoraScaling(r=2, lora_alpha=4)
    _, final = run("fedit", {1: config, 2: config}, registry=registry)
    p = {1: 0.75, 2: 0.25}
    expected = {k: v.astype(np.float64) for k, v in initial_state(2).items()}
    for server_round in (1, 2):
        expected = {key: sum(p[n] * (value + local_step(n, server_round, "A" if ".lora_A." in key else "B",
                                                        value.shape)) for n in (1, 2))
                    for key, value in expected.items()}
    for key, value in expected.items():
        np.testing.assert_allclose(final[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert float(final[f"{P}fc1{lf.SCALING_SUFFIX}"]) == 2.0


def test_legacy_aggregate_fit_matches_numpy(registry):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    class Proxy:
        def __init__(self, cid):
            self.cid = cid

    config = LoraScaling(r=2, lora_alpha=2)
    strategy = lf.LegacyLoraAggStrategy("fedit", registry=registry)
    states = []
    results = []
    for node in (1, 2):
        state = {k: v + local_step(node, 1, "B", v.shape) for k, v in initial_state(2).items()}
        states.append(state)
        metrics = {lf.LEGACY_KEYS_KEY: json.dumps(list(state)), lf.LORA_CONFIG_KEY: json.dumps(lf.lora_config_dict(config))}
        results.append((Proxy(str(node)), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(list(state.values())),
                                                  SAMPLES[node], metrics)))
    parameters, _ = strategy.aggregate_fit(1, results, [])
    merged = dict(zip(strategy.global_keys, parameters_to_ndarrays(parameters)))
    for key in states[0]:
        np.testing.assert_allclose(merged[key], 0.75 * states[0][key] + 0.25 * states[1][key], rtol=1e-5, atol=1e-6)


def test_exact_strategies_keep_the_global_model_exact_over_rounds(registry):
    # fedex-lora through its residual, flora through merging its wide adapter
    # into the base; the test clients train A, so FFA-LoRA (frozen A) is left out.
    plugins = [p for p in real_strategies(registry) if p.has("exact") and not p.has("requires-shared-a")]
    if not plugins:
        pytest.skip("no exact strategy loaded yet")
    config = LoraScaling(r=2, lora_alpha=4)
    configs = {1: config, 2: config}
    for plugin in plugins:
        strategy, final = run(plugin.name, configs, registry=registry)
        # The exact global model after round 2: the weighted mean of what each
        # client's effective model (residual + s·B·A) became, from the start.
        state = {k: v.astype(np.float64) for k, v in initial_state(2).items()}
        models = {m: 2.0 * state[f"{P}{m}.lora_B.weight"] @ state[f"{P}{m}.lora_A.weight"] for m in DIMS}
        view = lf.client_state_dict(lf.initial_arrays(initial_state(2), config), config)
        for server_round in (1, 2):
            new = {m: 0.0 for m in DIMS}
            for node, p in ((1, 0.75), (2, 0.25)):
                for m in DIMS:
                    a = view.lora[f"{P}{m}.lora_A.weight"] + local_step(node, server_round, "A", view.lora[f"{P}{m}.lora_A.weight"].shape)
                    b = view.lora[f"{P}{m}.lora_B.weight"] + local_step(node, server_round, "B", view.lora[f"{P}{m}.lora_B.weight"].shape)
                    residual = view.base_weight_deltas().get(f"{m}.weight", 0.0)
                    new[m] = new[m] + p * (residual + 2.0 * b.astype(np.float64) @ a)
            models = new
            if server_round == 1:
                view = lf.client_state_dict(strategy_arrays_after_round_1(plugin.name, configs, registry), config)
        got = lf.client_state_dict(final, config)
        for m in DIMS:
            effective = got.base_weight_deltas().get(f"{m}.weight", 0.0) + 2.0 * (
                got.lora[f"{P}{m}.lora_B.weight"].astype(np.float64) @ got.lora[f"{P}{m}.lora_A.weight"])
            assert relative_error(effective, models[m]) < 1e-5, plugin.name


def strategy_arrays_after_round_1(name, configs, registry):
    return run(name, configs, rounds=1, registry=registry)[1]


def test_per_client_payloads_go_to_their_own_node(registry):
    plugins = [p for p in real_strategies(registry) if p.has("per-client-payloads")]
    if not plugins:
        pytest.skip("no strategy with per-client payloads loaded yet")
    configs = {1: LoraScaling(r=2, lora_alpha=4), 2: LoraScaling(r=4, lora_alpha=4)}
    for plugin in plugins:
        if not plugin.has("heterogeneous-ranks"):
            configs = {1: configs[1], 2: configs[1]}
        strategy, _ = run(plugin.name, configs, rounds=1, registry=registry)
        if not strategy.lora.client_arrays:
            continue  # the plugin chose not to personalise this round
        grid = lf.InProcessGrid(make_client_app(configs), num_nodes=2)
        messages = strategy.configure_train(2, lf.to_array_record({}), flwr.app.ConfigRecord(), grid)
        for message in messages:
            node = message.metadata.dst_node_id
            sent = lf.from_array_record(message.content["arrays"])
            own = strategy.lora.client_arrays[f"node-{node}"]
            for key in own:
                np.testing.assert_array_equal(sent[key], own[key])


def test_a_plugin_error_surfaces_from_aggregate_train(registry):
    configs = {1: LoraScaling(r=2, lora_alpha=4), 2: LoraScaling(r=2, lora_alpha=4, rank_pattern={"fc1": 3})}

    app = make_client_app(configs)
    with pytest.raises(lora_agg.UnsupportedError, match="fedit needs clients of equal rank"):
        strategy = lf.LoraAggStrategy("fedit", registry=registry, fraction_evaluate=0.0, min_available_nodes=2)
        initial = lf.initial_arrays(initial_state(2), configs[1])
        strategy.start(lf.InProcessGrid(app, num_nodes=2), lf.to_array_record(initial), num_rounds=1)


def test_legacy_configure_fit_sends_names_and_each_clients_payload(registry):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    class Proxy:
        def __init__(self, cid):
            self.cid = cid

    class Manager:
        def __init__(self, proxies):
            self.proxies = proxies

        def num_available(self):
            return len(self.proxies)

        def sample(self, num_clients, min_num_clients=None, criterion=None):
            return self.proxies[:num_clients]

    personalising = [p for p in real_strategies(registry) if p.has("per-client-payloads")]
    name = personalising[0].name if personalising else "fedit"
    config = LoraScaling(r=2, lora_alpha=2)
    strategy = lf.LegacyLoraAggStrategy(name, registry=registry)
    proxies = [Proxy("1"), Proxy("2")]
    results = []
    for node, proxy in zip((1, 2), proxies):
        state = {k: v + local_step(node, 1, "A" if ".lora_A." in k else "B", v.shape) for k, v in initial_state(2).items()}
        metrics = {lf.LEGACY_KEYS_KEY: json.dumps(list(state)), lf.LORA_CONFIG_KEY: json.dumps(lf.lora_config_dict(config))}
        results.append((proxy, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(list(state.values())),
                                      SAMPLES[node], metrics)))
    parameters, _ = strategy.aggregate_fit(1, results, [])
    instructions = strategy.configure_fit(2, parameters, Manager(proxies))
    assert len(instructions) == 2
    for proxy, fit_ins in instructions:
        names = json.loads(fit_ins.config[lf.LEGACY_KEYS_KEY])
        sent = dict(zip(names, parameters_to_ndarrays(fit_ins.parameters)))
        expected = strategy.lora.arrays_for(proxy.cid, dict(zip(strategy.global_keys, parameters_to_ndarrays(parameters))))
        assert set(sent) == set(expected)
        for key in sent:
            np.testing.assert_array_equal(sent[key], expected[key])
        assert fit_ins.config[lf.FREEZE_A_KEY] is False
    if personalising:
        assert strategy.lora.client_arrays, f"{name} emitted no payloads"
