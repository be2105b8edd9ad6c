"""PEFT state dicts: pairing A and B by key name, per-module ranks and scalings.

Keys are the ones PEFT writes (``get_peft_model_state_dict`` /
``adapter_model.safetensors``)::

    base_model.model.<module>.lora_A.weight   [r, d_in]
    base_model.model.<module>.lora_B.weight   [d_out, r]

A and B are paired by their key names, never guessed from shapes: a square
module would hide a swap. In-memory keys with the adapter name
(``...lora_A.default.weight``) are accepted too and kept as they are.
"""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .aggregator import Aggregator, ClientFactors, ClientPayload, ModuleResult, as_float32, fit_rank
from .errors import InvalidInputError, UnsupportedError

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?P<adapter>\.[^.]+)?\.weight$")
_UNSUPPORTED_KEY = re.compile(r"\.(lora_embedding_[AB]|lora_magnitude_vector|ia3_l|lora_E)\b")


def module_name(module_key: str) -> str:
    """The module path PEFT's rank/alpha patterns match: the key without ``base_model.model.``."""
    return module_key[len(PEFT_PREFIX):] if module_key.startswith(PEFT_PREFIX) else module_key


def base_weight_key(module_key: str) -> str:
    """The base model's weight key for a module (where a residual U·V is added)."""
    return module_name(module_key) + ".weight"


def _pattern_match(patterns: Mapping[str, object], name: str):
    # PEFT's get_pattern_key: a key matches the full module path or a dotted
    # suffix of it, and the first matching key in the dict's order wins.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


@dataclass
class LoraScaling:
    """The parts of a PEFT ``LoraConfig`` that decide each module's rank and scaling.

    ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``), with r
    and alpha taken per module from ``rank_pattern`` / ``alpha_pattern`` when
    a key matches, else ``r`` / ``lora_alpha``.
    """

    r: int = 8
    lora_alpha: float = 8.0
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config) -> "LoraScaling":
        """From a ``LoraScaling``, a PEFT ``LoraConfig``, or a dict such as ``adapter_config.json``."""
        if isinstance(config, LoraScaling):
            return config
        get = config.get if isinstance(config, Mapping) else (lambda key, default=None: getattr(config, key, default))
        return cls(r=int(get("r", 8)), lora_alpha=float(get("lora_alpha", 8)),
                   use_rslora=bool(get("use_rslora", False) or False),
                   rank_pattern=dict(get("rank_pattern", None) or {}),
                   alpha_pattern=dict(get("alpha_pattern", None) or {}))

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        rank = _pattern_match(self.rank_pattern, module)
        alpha = _pattern_match(self.alpha_pattern, module)
        return int(rank if rank is not None else self.r), float(alpha if alpha is not None else self.lora_alpha)

    def scaling(self, module: str, rank: int | None = None) -> float:
        """The PEFT scaling of ``module``; checks ``rank`` (from the tensors) against the config."""
        configured, alpha = self.rank_and_alpha(module)
        if rank is not None and rank != configured:
            raise InvalidInputError(f"module '{module}': tensors have rank {rank} but the LoRA config says "
                                    f"r={configured}; expected them to agree (check r and rank_pattern)")
        return alpha / math.sqrt(configured) if self.use_rslora else alpha / configured


@dataclass
class LoraStateDict:
    """A PEFT state dict split into LoRA modules and other tensors."""

    modules: dict[str, tuple[np.ndarray, np.ndarray]]  # module key -> (A, B)
    keys: dict[str, tuple[str, str]]  # module key -> (A key, B key)
    other: dict[str, np.ndarray]


def split_state_dict(state_dict: Mapping[str, object], client: str = "client") -> LoraStateDict:
    """Pairs ``lora_A`` / ``lora_B`` tensors by key name; other tensors go to ``other``."""
    halves: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    other = {}
    for key, value in state_dict.items():
        bad = _UNSUPPORTED_KEY.search(key)
        if bad:
            raise UnsupportedError(f"client '{client}': key '{key}' is a '{bad.group(1)}' tensor; only LoRA A/B "
                                   "of linear layers are aggregated (embedding LoRA, DoRA and IA3 are not supported)")
        match = _LORA_KEY.match(key)
        if match:
            parts = halves.setdefault(match.group("module"), {})
            if match.group("factor") in parts:
                raise InvalidInputError(f"client '{client}': keys '{parts[match.group('factor')][0]}' and '{key}' "
                                        "are the same factor of one module; expected one adapter per state dict")
            parts[match.group("factor")] = (key, as_float32(value))
        else:
            other[key] = np.asarray(value.detach().cpu().float().numpy() if hasattr(value, "detach") else value)
    modules, keys = {}, {}
    for module_key, parts in halves.items():
        for factor in "AB":
            if factor not in parts:
                present = parts["B" if factor == "A" else "A"][0]
                raise InvalidInputError(f"client '{client}': module '{module_name(module_key)}' has '{present}' "
                                        f"but no lora_{factor}; expected both factors")
        modules[module_key] = (parts["A"][1], parts["B"][1])
        keys[module_key] = (parts["A"][0], parts["B"][0])
    return LoraStateDict(modules=modules, keys=keys, other=other)


@dataclass
class StateDictResult:
    """The aggregate of PEFT state dicts, module by module."""

    modules: dict[str, ModuleResult]
    keys: dict[str, tuple[str, str]]
    other: dict[str, np.ndarray]
    client_ranks: list[dict[str, int]]
    client_scalings: list[dict[str, float]]

    def global_state_dict(self) -> dict[str, np.ndarray]:
        """Global A/B under the PEFT key names, plus the averaged non-LoRA tensors."""
        out = dict(self.other)
        for module_key, result in self.modules.items():
            a_key, b_key = self.keys[module_key]
            out[a_key], out[b_key] = result.a, result.b
        return out

    def scalings(self) -> dict[str, float]:
        """The scaling of each module's global factors."""
        return {m: r.scaling for m, r in self.modules.items()}

    def residuals(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Module key -> (U, V) for modules whose strategy returned a base-weight residual."""
        return {m: r.residual for m, r in self.modules.items() if r.residual is not None}

    def diagnostics(self) -> dict[str, dict[str, float]]:
        return {m: r.diagnostics for m, r in self.modules.items() if r.diagnostics}

    def client_state_dict(self, k: int, fold_scaling: bool = True) -> dict[str, np.ndarray]:
        """What client ``k`` loads: its payload or its rank's slots of the global factors.

        With ``fold_scaling`` the ratio (scaling of the factors)/(client's own
        PEFT scaling) is folded into B, so the client's unchanged LoRA config
        reproduces the aggregated product exactly; A stays untouched (which
        strategies that need a shared A rely on).
        """
        out = dict(self.other)
        for module_key, result in self.modules.items():
            rank = self.client_ranks[k][module_key]
            payload = result.client_factors(k, rank)
            a, b = payload.a, payload.b
            if a.shape[0] != rank:
                a, b = fit_rank(a, b, rank)
            if fold_scaling:
                ratio = payload.scaling / self.client_scalings[k][module_key]
                if ratio != 1.0:
                    b = (b.astype(np.float64) * ratio).astype(np.float32)
            a_key, b_key = self.keys[module_key]
            out[a_key], out[b_key] = a, b
        return out


def aggregate_state_dicts(aggregator: Aggregator, state_dicts: Sequence[Mapping[str, object]],
                          samples: Sequence[float], lora_configs, client_ids: Sequence[str] | None = None,
                          round_index: int = 0, workers: int = 1) -> StateDictResult:
    """Aggregates clients' PEFT LoRA state dicts with a strategy instance.

    ``lora_configs`` is one config for all clients or one per client
    (``LoraScaling``, PEFT ``LoraConfig`` or dict); ranks come from the
    tensors and are checked against it. Clients may have different ranks per
    module. Non-LoRA tensors (``modules_to_save`` heads) are averaged by
    sample weight. ``workers`` > 1 aggregates modules in parallel threads.
    """
    count = len(state_dicts)
    if count == 0:
        raise InvalidInputError("no clients in the round")
    if len(samples) != count:
        raise InvalidInputError(f"{len(samples)} sample counts for {count} clients; expected one per client")
    ids = list(client_ids) if client_ids is not None else [f"client-{k}" for k in range(count)]
    configs = list(lora_configs) if isinstance(lora_configs, (list, tuple)) else [lora_configs] * count
    if len(configs) != count:
        raise InvalidInputError(f"{len(configs)} LoRA configs for {count} clients; expected one, or one per client")
    configs = [LoraScaling.from_config(c) for c in configs]
    split = [split_state_dict(sd, ids[k]) for k, sd in enumerate(state_dicts)]
    reference = split[0]
    for k, part in enumerate(split[1:], start=1):
        for mine, theirs, what in ((set(part.keys), set(reference.keys), "LoRA modules"),
                                   (set(part.other), set(reference.other), "other tensors")):
            if mine != theirs:
                missing = sorted(theirs - mine)[:3]
                extra = sorted(mine - theirs)[:3]
                raise InvalidInputError(f"client '{ids[k]}': {what} differ from client '{ids[0]}' "
                                        f"(missing {missing}, extra {extra}); expected the same keys")
    ranks = [{m: part.modules[m][0].shape[0] for m in part.modules} for part in split]
    scalings = [{m: configs[k].scaling(module_name(m), ranks[k][m]) for m in split[k].modules}
                for k in range(count)]

    def one(module_key: str) -> ModuleResult:
        clients = [ClientFactors(a=split[k].modules[module_key][0], b=split[k].modules[module_key][1],
                                 samples=samples[k], scaling=scalings[k][module_key], client_id=ids[k])
                   for k in range(count)]
        return aggregator.aggregate(clients, module=module_name(module_key), round_index=round_index)

    names = list(reference.keys)
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = dict(zip(names, pool.map(one, names)))
    else:
        results = {m: one(m) for m in names}
    weights = np.asarray(samples, np.float64) / float(np.sum(samples))
    other = {}
    for key, first in reference.other.items():
        shapes = {part.other[key].shape for part in split}
        if len(shapes) != 1:
            raise InvalidInputError(f"tensor '{key}' has shapes {sorted(shapes)} across clients; expected one shape")
        other[key] = sum(w * part.other[key].astype(np.float64) for w, part in zip(weights, split)).astype(first.dtype)
    return StateDictResult(modules=results, keys=reference.keys, other=other, client_ranks=ranks,
                           client_scalings=scalings)


def compress_factored(u: np.ndarray, v: np.ndarray, rtol: float = 1e-7) -> tuple[np.ndarray, np.ndarray]:
    """An equal product U'·V' with the smallest rank (QR of both factors, SVD of the core).

    Drops singular values below ``rtol`` times the largest; exact to rounding
    otherwise. Used to keep a residual accumulated over rounds small.
    """
    u64, v64 = u.astype(np.float64), v.astype(np.float64)
    if u64.shape[1] == 0:
        return u.astype(np.float32), v.astype(np.float32)
    qu, ru = np.linalg.qr(u64)
    qv, rv = np.linalg.qr(v64.T)
    cu, sigma, cvt = np.linalg.svd(ru @ rv.T)
    keep = int(np.sum(sigma > rtol * (sigma[0] if sigma.size else 0))) if sigma.size and sigma[0] > 0 else 0
    root = np.sqrt(sigma[:keep])
    new_u = (qu @ cu[:, :keep]) * root
    new_v = (root[:, None] * cvt[:keep]) @ qv.T
    return new_u.astype(np.float32), new_v.astype(np.float32)
