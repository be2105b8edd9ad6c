"""Flower strategies that aggregate clients' LoRA adapters with a lora-agg plugin.

Two APIs of flwr are served:

* :class:`LoraAggStrategy` — the Message API (``flwr.serverapp.strategy``,
  Flower ≥ 1.21), built on Flower's ``FedAvg`` for node sampling, evaluation
  and metrics, with ``configure_train`` / ``aggregate_train`` replaced.
* :class:`LegacyLoraAggStrategy` — the older ``flwr.server.strategy`` API
  (``configure_fit`` / ``aggregate_fit``), which carries unnamed arrays: the
  client sends its PEFT key names in ``FitRes.metrics["lora-agg.keys"]``.

What travels (the *global arrays*, self-contained, no side channel):

* every module's global ``lora_A`` / ``lora_B`` under its PEFT key;
* ``<module key>.lora_agg.scaling`` (0-d float64): the scaling of those
  factors, which may differ from a client's own α/r;
* for strategies that return a base-weight residual (fedex-lora),
  ``<module key>.lora_agg.residual_U`` (d_out×q) and ``.residual_V``
  (q×d_in): the residual **accumulated over all rounds so far** (kept
  factored and re-compressed each round), which the client adds to its
  *pretrained* base weight, W = W0 + U·V. Sending the total rather than the
  round's increment keeps clients stateless: one that skipped rounds is
  still exact.

A global adapter wider than every client with no payloads (FLoRA's
stacking, svd-fedavg ``exact=true``) cannot be sliced without loss, so by
default its product s·B·A is merged into the accumulated residual and
clients restart from a fresh adapter (A Kaiming-uniform, B = 0), as FLoRA
prescribes (``merge_into_base`` overrides). When the plugin requires a shared
A (FFA-LoRA), the train config carries ``lora-agg.freeze-a = True``.

When the plugin emits per-client payloads, each node that took part in the
round receives its own factors (and their scaling) in the next
``configure_train``; other nodes get the global arrays. Clients adapt what
they receive with :func:`client_state_dict`, which picks the first r_k slots
(or zero-pads), folds scaling/s_k into B so their unchanged PEFT config
reproduces the aggregate, and returns the residual to add to base weights.
Clients report their LoRA config (``r``, ``lora_alpha``, ``use_rslora``,
patterns) with :func:`lora_config_record` so ranks and scalings are exact
per client and module.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from .aggregator import Aggregator
from .peft import LoraScaling, StateDictResult, aggregate_state_dicts, base_weight_key, compress_factored

logger = logging.getLogger("lora_agg.flower")

SCALING_SUFFIX = ".lora_agg.scaling"
RESIDUAL_U_SUFFIX = ".lora_agg.residual_U"
RESIDUAL_V_SUFFIX = ".lora_agg.residual_V"
_OWN_SUFFIXES = (SCALING_SUFFIX, RESIDUAL_U_SUFFIX, RESIDUAL_V_SUFFIX)
#: Name of the ConfigRecord (Message API) / metrics entry (legacy API) holding a client's LoRA config.
LORA_CONFIG_KEY = "lora-config"
#: Legacy API: JSON list of the array names, in order, in FitRes.metrics / FitIns.config.
LEGACY_KEYS_KEY = "lora-agg.keys"
#: Train-config flag: True when the client must keep lora_A frozen (FFA-LoRA).
FREEZE_A_KEY = "lora-agg.freeze-a"


def lora_config_dict(config) -> dict:
    """The scaling-relevant part of a LoRA config as plain JSON types."""
    scaling = LoraScaling.from_config(config)
    return {"r": scaling.r, "lora_alpha": scaling.lora_alpha, "use_rslora": scaling.use_rslora,
            "rank_pattern": json.dumps(scaling.rank_pattern), "alpha_pattern": json.dumps(scaling.alpha_pattern)}


def _lora_config_from(values: Mapping) -> LoraScaling:
    def pattern(key):
        raw = values.get(key) or "{}"
        return json.loads(raw) if isinstance(raw, str) else dict(raw)
    return LoraScaling(r=int(values["r"]), lora_alpha=float(values["lora_alpha"]),
                       use_rslora=bool(values.get("use_rslora", False)),
                       rank_pattern=pattern("rank_pattern"), alpha_pattern=pattern("alpha_pattern"))


def lora_config_record(config):
    """A Flower ``ConfigRecord`` a client adds to its train reply under :data:`LORA_CONFIG_KEY`."""
    from flwr.app import ConfigRecord
    return ConfigRecord(lora_config_dict(config))


def initial_arrays(state_dict: Mapping[str, object], lora_config) -> dict[str, np.ndarray]:
    """The round-0 global arrays from one PEFT state dict: its factors plus each module's scaling.

    Give every client the same initial adapter (same seed) so factor-averaging
    strategies start from a shared A, as FFA-LoRA requires.
    """
    from .peft import module_name, split_state_dict
    config = LoraScaling.from_config(lora_config)
    split = split_state_dict(state_dict, "initial")
    out = dict(split.other)
    for module_key, (a, b) in split.modules.items():
        a_key, b_key = split.keys[module_key]
        out[a_key], out[b_key] = a, b
        out[module_key + SCALING_SUFFIX] = np.array(config.scaling(module_name(module_key), a.shape[0]), np.float64)
    return out


def _is_own_key(key: str) -> bool:
    return key.endswith(_OWN_SUFFIXES)


@dataclass
class ClientView:
    """What a client makes of the arrays it received (see :func:`client_state_dict`)."""

    lora: dict[str, np.ndarray]
    residuals: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    other: dict[str, np.ndarray] = field(default_factory=dict)

    def base_weight_deltas(self) -> dict[str, np.ndarray]:
        """Base-model key -> dense U·V to add to the *pretrained* weight (small models)."""
        return {base_weight_key(m): u.astype(np.float64) @ v.astype(np.float64) for m, (u, v) in self.residuals.items()}


def client_state_dict(arrays: Mapping[str, np.ndarray], lora_config, ranks: Mapping[str, int] | None = None) -> ClientView:
    """Turns received global/payload arrays into what a client of ``lora_config`` loads.

    ``ranks`` (module key -> rank) defaults to the config's ranks. A is kept;
    B is multiplied by (received scaling)/(own scaling), and the rank is
    truncated or zero-padded to the client's own.
    """
    from .aggregator import fit_rank
    from .peft import module_name
    config = LoraScaling.from_config(lora_config)
    plain = {k: np.asarray(v) for k, v in arrays.items()}
    view = ClientView(lora={})
    module_keys = sorted({k[: -len(SCALING_SUFFIX)] for k in plain if k.endswith(SCALING_SUFFIX)})
    claimed = set()
    for module_key in module_keys:
        a_key, b_key = f"{module_key}.lora_A.weight", f"{module_key}.lora_B.weight"
        name = module_name(module_key)
        rank = (ranks or {}).get(module_key) or config.rank_and_alpha(name)[0]
        a, b = fit_rank(plain[a_key].astype(np.float32), plain[b_key].astype(np.float32), rank)
        ratio = float(plain[module_key + SCALING_SUFFIX]) / config.scaling(name)
        if ratio != 1.0:
            b = (b.astype(np.float64) * ratio).astype(np.float32)
        view.lora[a_key], view.lora[b_key] = a, b
        claimed.update({a_key, b_key, module_key + SCALING_SUFFIX})
        if module_key + RESIDUAL_U_SUFFIX in plain:
            view.residuals[module_key] = (plain[module_key + RESIDUAL_U_SUFFIX], plain[module_key + RESIDUAL_V_SUFFIX])
            claimed.update({module_key + RESIDUAL_U_SUFFIX, module_key + RESIDUAL_V_SUFFIX})
    view.other = {k: v for k, v in plain.items() if k not in claimed}
    return view


class FederatedLora:
    """The framework-neutral core: aggregation, accumulated residuals, per-client arrays.

    Both Flower strategies delegate to it; it is usable from any other server.
    """

    def __init__(self, strategy: str | Aggregator, hyperparameters: Mapping | None = None, *, registry=None,
                 default_lora_config=None, workers: int = 1, merge_into_base: bool | None = None,
                 track_error: bool = False, seed: int = 0):
        if isinstance(strategy, Aggregator):
            self.aggregator = strategy
        else:
            from . import default_registry
            self.aggregator = (registry or default_registry()).create(strategy, dict(hyperparameters or {}))
        self.default_lora_config = default_lora_config
        self.workers = workers
        self.merge_into_base = merge_into_base
        self.track_error = track_error
        self._rng = np.random.default_rng(seed)
        self.residuals: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.client_arrays: dict[str, dict[str, np.ndarray]] = {}
        self.last_result: StateDictResult | None = None
        #: Per round (with ``track_error``): relative Frobenius error of the global
        #: update and (mean over clients) of what clients receive, against Σ p_k s_k B_k A_k.
        self.errors: list[dict[str, float]] = []

    @property
    def freezes_a(self) -> bool:
        """Whether clients must keep A fixed (FFA-LoRA: the plugin requires a shared A)."""
        return self.aggregator.plugin.has("requires-shared-a")

    def _merges(self, result: StateDictResult, module_key: str) -> bool:
        # A global adapter wider than every client, with no payloads, cannot be
        # sliced without loss (FLoRA's stacking, svd-fedavg exact=true): the
        # only lossless delivery is to merge s·B·A into the base weights and
        # restart the adapters, which is what FLoRA prescribes.
        module = result.modules[module_key]
        if self.merge_into_base is not None:
            return self.merge_into_base
        return not module.payloads and module.rank > max(r[module_key] for r in result.client_ranks)

    def _fresh_adapter(self, rank: int, d_in: int, d_out: int) -> tuple[np.ndarray, np.ndarray]:
        # PEFT's default init: A ~ Kaiming-uniform(a=√5) = U(±1/√d_in), B = 0.
        bound = 1.0 / np.sqrt(d_in)
        return (self._rng.uniform(-bound, bound, (rank, d_in)).astype(np.float32),
                np.zeros((d_out, rank), np.float32))

    @property
    def name(self) -> str:
        return self.aggregator.name

    def aggregate(self, round_index: int, client_arrays: Sequence[Mapping[str, np.ndarray]], samples: Sequence[float],
                  lora_configs: Sequence, client_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Aggregates one round; returns the global arrays and remembers each client's own."""
        configs = [c if c is not None else self.default_lora_config for c in lora_configs]
        missing = [cid for cid, c in zip(client_ids, configs) if c is None]
        if missing:
            raise ValueError(f"clients {missing} sent no '{LORA_CONFIG_KEY}' and the strategy has no "
                             "default_lora_config; expected the client's r and lora_alpha")
        lora_only = [{k: v for k, v in arrays.items() if not _is_own_key(k)} for arrays in client_arrays]
        result = aggregate_state_dicts(self.aggregator, lora_only, samples, configs, client_ids=client_ids,
                                       round_index=round_index, workers=self.workers)
        self.last_result = result
        increments = {m: r for m, r in result.residuals().items()}
        delivered = {}
        for module_key, module in result.modules.items():
            if self._merges(result, module_key):
                merged = (module.scaling * module.b, module.a)
                if module_key in increments:
                    u, v = increments[module_key]
                    merged = (np.concatenate([u, merged[0]], axis=1), np.concatenate([v, merged[1]], axis=0))
                increments[module_key] = merged
                rank = max(r[module_key] for r in result.client_ranks)
                a, b = self._fresh_adapter(rank, module.a.shape[1], module.b.shape[0])
                delivered[module_key] = (a, b, module.scaling)
            else:
                delivered[module_key] = (module.a, module.b, module.scaling)
        for module_key, (u, v) in increments.items():
            if module_key in self.residuals:
                old_u, old_v = self.residuals[module_key]
                u, v = np.concatenate([old_u, u], axis=1), np.concatenate([old_v, v], axis=0)
            self.residuals[module_key] = compress_factored(u, v)
        global_arrays = self._pack(result, lambda m: delivered[m])
        self.client_arrays = {}
        if any(r.payloads for r in result.modules.values()):
            for k, client_id in enumerate(client_ids):
                def own(m, k=k):
                    module = result.modules[m]
                    if module.payloads:
                        p = module.payloads[k]
                        return p.a, p.b, p.scaling
                    return delivered[m]
                self.client_arrays[client_id] = self._pack(result, own)
        if self.track_error:
            self.errors.append(self._errors(result, lora_only, samples, client_ids, increments))
        return global_arrays

    def _errors(self, result, client_arrays, samples, client_ids, increments) -> dict[str, float]:
        """Dense check of this round's update (small models only; opt-in)."""
        weights = np.asarray(samples, np.float64) / float(np.sum(samples))
        ideal, glob = {}, {}
        received = [dict() for _ in client_ids]
        for m, module in result.modules.items():
            a_key, b_key = result.keys[m]
            ideal[m] = sum(w * result.client_scalings[k][m] * (client_arrays[k][b_key].astype(np.float64)
                                                               @ np.asarray(client_arrays[k][a_key], np.float64))
                           for k, w in enumerate(weights))
            glob[m] = module.effective_update()
            extra = 0.0
            if m in increments:
                u, v = increments[m]
                extra = u.astype(np.float64) @ v.astype(np.float64)
            for k, client_id in enumerate(client_ids):
                arrays = self.client_arrays.get(client_id)
                if arrays is None:
                    a, b, scaling = self._delivered_for(result, m, increments)
                else:
                    a, b, scaling = arrays[a_key], arrays[b_key], float(arrays[m + SCALING_SUFFIX])
                from .aggregator import fit_rank
                a, b = fit_rank(np.asarray(a, np.float32), np.asarray(b, np.float32), result.client_ranks[k][m])
                received[k][m] = extra + scaling * (b.astype(np.float64) @ a.astype(np.float64))

        def rel(got):
            num = sum(np.linalg.norm(got[m] - ideal[m]) ** 2 for m in ideal)
            den = sum(np.linalg.norm(ideal[m]) ** 2 for m in ideal)
            return float(np.sqrt(num / den)) if den > 0 else 0.0
        return {"global": rel(glob), "received": float(np.mean([rel(r) for r in received]))}

    def _delivered_for(self, result, m, increments):
        module = result.modules[m]
        if self._merges(result, m):
            return np.zeros_like(module.a), np.zeros_like(module.b), module.scaling
        return module.a, module.b, module.scaling

    def _pack(self, result: StateDictResult, factors) -> dict[str, np.ndarray]:
        out = dict(result.other)
        for module_key in result.modules:
            a, b, scaling = factors(module_key)
            a_key, b_key = result.keys[module_key]
            out[a_key], out[b_key] = a, b
            out[module_key + SCALING_SUFFIX] = np.array(scaling, dtype=np.float64)
            if module_key in self.residuals:
                u, v = self.residuals[module_key]
                out[module_key + RESIDUAL_U_SUFFIX], out[module_key + RESIDUAL_V_SUFFIX] = u, v
        return out

    def arrays_for(self, client_id: str, global_arrays: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """The arrays to send a client: its own payload from the last round, else the global ones."""
        return self.client_arrays.get(client_id, global_arrays)


def _node_id(node: int) -> str:
    return f"node-{node}"


try:  # Message API (Flower >= 1.21)
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg as _MessageFedAvg
except ImportError:  # pragma: no cover - flwr missing or too old
    _MessageFedAvg = None


def to_array_record(arrays: Mapping[str, np.ndarray]):
    """A Flower ``ArrayRecord`` of numpy arrays, keeping the key order."""
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def from_array_record(record) -> dict[str, np.ndarray]:
    """The numpy arrays of a Flower ``ArrayRecord``, by name."""
    return {k: v.numpy() for k, v in record.items()}


if _MessageFedAvg is not None:
    class LoraAggStrategy(_MessageFedAvg):
        """A Flower (Message API) strategy aggregating LoRA adapters with a lora-agg plugin.

        ``strategy`` is a plugin name (or an :class:`~lora_agg.Aggregator`),
        ``hyperparameters`` its settings. Clients reply with their PEFT LoRA
        state dict in ``"arrays"``, ``num-examples`` in ``"metrics"`` and
        their LoRA config in a ConfigRecord named :data:`LORA_CONFIG_KEY`
        (else ``default_lora_config`` is used). Other keyword arguments go to
        Flower's ``FedAvg`` (``fraction_train``, ``min_available_nodes``, …).
        Plugin errors propagate as :class:`~lora_agg.AggregationError`.
        """

        def __init__(self, strategy: str | Aggregator, hyperparameters: Mapping | None = None, *, registry=None,
                     default_lora_config=None, workers: int = 1, merge_into_base: bool | None = None,
                     track_error: bool = False, **fedavg_kwargs):
            super().__init__(**fedavg_kwargs)
            self.lora = FederatedLora(strategy, hyperparameters, registry=registry,
                                      default_lora_config=default_lora_config, workers=workers,
                                      merge_into_base=merge_into_base, track_error=track_error)
            self._global_arrays = None

        def summary(self) -> None:
            logger.info("LoraAggStrategy: plugin '%s' %s", self.lora.name, self.lora.aggregator.config)
            super().summary()

        def configure_train(self, server_round, arrays, config, grid) -> Iterable[Message]:
            config[FREEZE_A_KEY] = self.lora.freezes_a
            messages = list(super().configure_train(server_round, arrays, config, grid))
            if not self.lora.client_arrays:
                return messages
            personal = []
            for message in messages:
                node = message.metadata.dst_node_id
                own = self.lora.client_arrays.get(_node_id(node))
                if own is None:
                    personal.append(message)
                    continue
                content = RecordDict({self.arrayrecord_key: to_array_record(own),
                                      self.configrecord_key: message.content[self.configrecord_key]})
                personal.append(Message(content=content, message_type=message.metadata.message_type,
                                        dst_node_id=node))
            return personal

        def aggregate_train(self, server_round, replies):
            valid, _ = self._check_and_log_replies(replies, is_train=True)
            if not valid:
                return None, None
            arrays, samples, configs, ids = [], [], [], []
            for message in valid:
                content = message.content
                arrays.append(from_array_record(content[self.arrayrecord_key]))
                metrics = next(iter(content.metric_records.values()))
                samples.append(float(metrics[self.weighted_by_key]))
                lora_config = content.config_records.get(LORA_CONFIG_KEY)
                configs.append(_lora_config_from(lora_config) if lora_config is not None else None)
                ids.append(_node_id(message.metadata.src_node_id))
            global_arrays = self.lora.aggregate(server_round - 1, arrays, samples, configs, ids)
            metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
            return to_array_record(global_arrays), metrics
else:  # pragma: no cover
    LoraAggStrategy = None


try:  # Legacy API (flwr.server.strategy)
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg as _LegacyFedAvg
except ImportError:  # pragma: no cover
    _LegacyFedAvg = None


if _LegacyFedAvg is not None:
    class LegacyLoraAggStrategy(_LegacyFedAvg):
        """The same strategy for Flower's legacy API (``aggregate_fit``).

        The legacy API sends unnamed arrays, so each client puts the names of
        its arrays, in order, as a JSON list in ``FitRes.metrics["lora-agg.keys"]``
        and its LoRA config as JSON in ``FitRes.metrics["lora-config"]``. The
        server sends names back the same way in ``FitIns.config``.
        """

        def __init__(self, strategy: str | Aggregator, hyperparameters: Mapping | None = None, *, registry=None,
                     default_lora_config=None, workers: int = 1, merge_into_base: bool | None = None,
                     track_error: bool = False, **fedavg_kwargs):
            super().__init__(**fedavg_kwargs)
            self.lora = FederatedLora(strategy, hyperparameters, registry=registry,
                                      default_lora_config=default_lora_config, workers=workers,
                                      merge_into_base=merge_into_base, track_error=track_error)
            self.global_keys: list[str] | None = None

        def __repr__(self) -> str:
            return f"LegacyLoraAggStrategy({self.lora.name!r})"

        def configure_fit(self, server_round, parameters, client_manager):
            pairs = super().configure_fit(server_round, parameters, client_manager)
            out = []
            for proxy, fit_ins in pairs:
                config = dict(fit_ins.config)
                config[FREEZE_A_KEY] = self.lora.freezes_a
                own = self.lora.client_arrays.get(str(proxy.cid))
                if own is not None:
                    config[LEGACY_KEYS_KEY] = json.dumps(list(own))
                    out.append((proxy, FitIns(ndarrays_to_parameters(list(own.values())), config)))
                    continue
                if self.global_keys is not None:
                    config[LEGACY_KEYS_KEY] = json.dumps(self.global_keys)
                out.append((proxy, FitIns(fit_ins.parameters, config)))
            return out

        def aggregate_fit(self, server_round, results, failures):
            if not results:
                return None, {}
            if failures and not self.accept_failures:
                return None, {}
            arrays, samples, configs, ids = [], [], [], []
            for proxy, fit_res in results:
                names = fit_res.metrics.get(LEGACY_KEYS_KEY)
                if names is None:
                    raise ValueError(f"client '{proxy.cid}' sent no '{LEGACY_KEYS_KEY}' metric; expected the JSON "
                                     "list of its PEFT key names, in the order of its arrays")
                values = parameters_to_ndarrays(fit_res.parameters)
                names = json.loads(names)
                if len(names) != len(values):
                    raise ValueError(f"client '{proxy.cid}' sent {len(values)} arrays and {len(names)} names")
                arrays.append(dict(zip(names, values)))
                samples.append(float(fit_res.num_examples))
                raw = fit_res.metrics.get(LORA_CONFIG_KEY)
                configs.append(_lora_config_from(json.loads(raw)) if raw is not None else None)
                ids.append(str(proxy.cid))
            global_arrays = self.lora.aggregate(server_round - 1, arrays, samples, configs, ids)
            self.global_keys = list(global_arrays)
            metrics = {}
            if self.fit_metrics_aggregation_fn:
                metrics = self.fit_metrics_aggregation_fn([(res.num_examples, res.metrics) for _, res in results])
            return ndarrays_to_parameters(list(global_arrays.values())), metrics
else:  # pragma: no cover
    LegacyLoraAggStrategy = None


class InProcessGrid:
    """Placeholder replaced below when flwr is importable."""


if _MessageFedAvg is not None:
    from flwr.app import Context
    from flwr.serverapp.grid import Grid

    class InProcessGrid(Grid):
        """A Flower ``Grid`` that runs a ``ClientApp`` in this process, node by node.

        Flower's simulation engine needs Ray (a large dependency that takes
        about 25 s to start); this grid drives the same ``ClientApp`` and
        ``Strategy.start`` loop without it, node after node. Each node keeps
        its own ``Context`` (and state) across rounds; ``node_config`` gives
        ``partition-id`` = node − 1, as the simulation engine does.
        """

        def __init__(self, client_app, num_nodes: int, node_config=None, run_config=None):
            self.client_app = client_app
            self.node_ids = list(range(1, num_nodes + 1))
            self.contexts = {
                node: Context(run_id=1, node_id=node,
                              node_config=dict((node_config(node - 1) if callable(node_config) else node_config) or
                                               {"partition-id": node - 1, "num-partitions": num_nodes}),
                              state=RecordDict(), run_config=dict(run_config or {}))
                for node in self.node_ids}
            from flwr.supercore.task_identity import TaskIdentity
            TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

        @property
        def run(self):
            return None

        def set_run(self, run_id: int) -> None:
            pass

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

        def get_node_ids(self):
            return list(self.node_ids)

        def push_messages(self, messages):
            raise NotImplementedError("InProcessGrid only supports send_and_receive")

        def pull_messages(self, message_ids):
            raise NotImplementedError("InProcessGrid only supports send_and_receive")

        def send_and_receive(self, messages, *, timeout=None):
            return [self.client_app(message, self.contexts[message.metadata.dst_node_id]) for message in messages]
