"""A strategy instance: aggregating one module's client factors through the C ABI.

Inputs cross without a copy: the round points into the callers' C-contiguous
float32 arrays (other dtypes or layouts are converted once, which copies).
The plugin's result is copied into numpy arrays and released with
``free_result`` before :meth:`Aggregator.aggregate` returns, so nothing
plugin-owned outlives the call.
"""

from __future__ import annotations

import ctypes
import json
import threading
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from . import _abi
from .errors import InternalError, InvalidInputError, error_for_status
from .host import HOST_API

_ERROR_CAPACITY = 2048


def as_float32(value) -> np.ndarray:
    """A C-contiguous float32 numpy view of ``value`` (copies only when it must).

    Accepts numpy arrays, torch tensors (any float dtype, any device) and lists.
    """
    if hasattr(value, "detach"):  # torch: bfloat16 has no numpy dtype, so upcast first
        value = value.detach().to("cpu").float().numpy()
    return np.ascontiguousarray(value, dtype=np.float32)


@dataclass
class ClientFactors:
    """One client's LoRA factors for one module: update = scaling · b · a.

    ``a`` is rank×d_in and ``b`` d_out×rank, as PEFT's ``lora_A`` / ``lora_B``.
    """

    a: np.ndarray
    b: np.ndarray
    samples: float
    scaling: float = 1.0
    client_id: str | None = None

    @property
    def rank(self) -> int:
        return int(np.shape(self.a)[0])


@dataclass
class ClientPayload:
    """Factors a personalising strategy returns for one client."""

    a: np.ndarray
    b: np.ndarray
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class ModuleResult:
    """The aggregate of one module, owned by Python.

    Effective global update: ``scaling · b · a + residual_u · residual_v``.
    """

    module: str
    a: np.ndarray
    b: np.ndarray
    scaling: float
    residual: tuple[np.ndarray, np.ndarray] | None = None
    payloads: list[ClientPayload] | None = None
    diagnostics: dict[str, float] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def effective_update(self) -> np.ndarray:
        """The dense d_out×d_in global update in float64 (for tests and small models)."""
        update = self.scaling * (self.b.astype(np.float64) @ self.a.astype(np.float64))
        if self.residual is not None:
            update += self.residual[0].astype(np.float64) @ self.residual[1].astype(np.float64)
        return update

    def client_factors(self, k: int, rank: int) -> ClientPayload:
        """What client ``k`` of rank ``rank`` receives: its payload when the
        strategy emits payloads, else the first ``rank`` slots of the global
        factors (zero-padded when the global rank is smaller)."""
        if self.payloads:
            return self.payloads[k]
        a, b = fit_rank(self.a, self.b, rank)
        return ClientPayload(a=a, b=b, scaling=self.scaling)


def fit_rank(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``rank`` slots of (a, b), zero-padded when they have fewer."""
    have = a.shape[0]
    if have >= rank:
        return np.ascontiguousarray(a[:rank]), np.ascontiguousarray(b[:, :rank])
    a_out = np.zeros((rank, a.shape[1]), np.float32)
    b_out = np.zeros((b.shape[0], rank), np.float32)
    a_out[:have], b_out[:, :have] = a, b
    return a_out, b_out


def _message(buffer) -> str:
    return buffer.value.decode("utf-8", "replace")


class Aggregator:
    """An instance of a plugin's strategy, created with hyperparameters.

    ``aggregate`` may be called from several threads at once (the ABI marks it
    [any-thread], and ctypes releases the GIL during the call);
    ``save_state`` / ``load_state`` / ``close`` must not overlap other calls.
    """

    def __init__(self, plugin, config: Mapping[str, object]):
        self.plugin = plugin
        self.config = dict(config)
        self._descriptor = plugin._descriptor
        self._lock = threading.Lock()
        state = ctypes.c_void_p()
        error = ctypes.create_string_buffer(_ERROR_CAPACITY)
        try:
            config_json = json.dumps(self.config, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise error_for_status(_abi.Status.INVALID_CONFIG,
                                   f"hyperparameters for '{plugin.name}' are not JSON-serialisable: {exc}") from None
        status = self._descriptor.create(config_json, ctypes.byref(HOST_API), ctypes.byref(state), error,
                                         _ERROR_CAPACITY)
        if status != _abi.Status.OK or not state.value:
            raise error_for_status(status if status != _abi.Status.OK else _abi.Status.INTERNAL_ERROR,
                                   _message(error) or f"'{plugin.name}': create returned no state")
        self._state = state

    @property
    def name(self) -> str:
        return self.plugin.name

    def close(self) -> None:
        """Destroys the plugin state; further calls raise."""
        if getattr(self, "_state", None) is not None and self._state.value:
            self._descriptor.destroy(self._state)
            self._state = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _live_state(self):
        if self._state is None:
            raise InternalError(f"strategy '{self.name}' instance is closed")
        return self._state

    def aggregate(self, clients: Sequence[ClientFactors], module: str = "module", round_index: int = 0) -> ModuleResult:
        """Aggregates one module's client factors.

        Raises :class:`~lora_agg.InvalidInputError` for malformed input (checked
        here first: the C round carries only pointers, so wrong shapes must not
        cross) and the plugin's own error otherwise.
        """
        state = self._live_state()
        if not clients:
            raise InvalidInputError(f"module '{module}': no clients in the round")
        factors = [(as_float32(c.a), as_float32(c.b)) for c in clients]
        ids = [c.client_id if c.client_id is not None else f"client-{k}" for k, c in enumerate(clients)]
        # The round's shape is taken from the first client; _validate checks every client against it.
        first_a, first_b = factors[0]
        d_out = first_b.shape[0] if first_b.ndim == 2 else 0
        d_in = first_a.shape[1] if first_a.ndim == 2 else 0
        self._validate(module, clients, factors, ids, d_out, d_in)
        table = (_abi.Client * len(clients))()
        encoded_ids = [i.encode("utf-8") for i in ids]
        for k, (client, (a, b)) in enumerate(zip(clients, factors)):
            table[k] = _abi.Client(struct_size=ctypes.sizeof(_abi.Client), rank=a.shape[0],
                                   samples=float(client.samples), scaling=float(client.scaling),
                                   a=a.ctypes.data, b=b.ctypes.data, client_id=encoded_ids[k])
        round_ = _abi.Round(struct_size=ctypes.sizeof(_abi.Round), client_count=len(clients), d_out=d_out,
                            d_in=d_in, module_name=module.encode("utf-8"), round_index=round_index, clients=table)
        result = _abi.Result()
        result.struct_size = ctypes.sizeof(_abi.Result)
        error = ctypes.create_string_buffer(_ERROR_CAPACITY)
        status = self._descriptor.aggregate(state, ctypes.byref(round_), ctypes.byref(result), error,
                                            _ERROR_CAPACITY)
        if status != _abi.Status.OK:
            raise error_for_status(status, _message(error) or f"module '{module}': aggregate failed")
        try:
            return self._convert(result, module, d_out, d_in, len(clients))
        finally:
            self._descriptor.free_result(state, ctypes.byref(result))

    @staticmethod
    def _validate(module, clients, factors, ids, d_out, d_in) -> None:
        # Mirrors ModuleRound.validate() of the Swift host, word for word.
        if d_out <= 0 or d_in <= 0:
            raise InvalidInputError(f"module '{module}': invalid shape {d_out}x{d_in}")
        total = 0.0
        for client, (a, b), client_id in zip(clients, factors, ids):
            who = f"module '{module}', client '{client_id}'"
            samples, scaling = float(client.samples), float(client.scaling)
            if not (np.isfinite(samples) and samples >= 0):
                raise InvalidInputError(f"{who}: invalid sample count {samples}; expected a finite number >= 0")
            if not (np.isfinite(scaling) and scaling > 0):
                raise InvalidInputError(f"{who}: invalid scaling {scaling}; expected a finite number > 0")
            if a.ndim != 2 or b.ndim != 2:
                raise InvalidInputError(f"{who}: A and B must be matrices; got {a.ndim}-D A and {b.ndim}-D B")
            rank = a.shape[0]
            if rank < 1:
                raise InvalidInputError(f"{who}: rank is 0; expected at least 1")
            if a.shape[1] != d_in:
                raise InvalidInputError(f"{who}: A is {a.shape[0]}x{a.shape[1]}; expected {rank}x{d_in} (rank x d_in)")
            if b.shape != (d_out, rank):
                raise InvalidInputError(f"{who}: B is {b.shape[0]}x{b.shape[1]}; expected {d_out}x{rank} "
                                        "(d_out x rank, the rank of A)")
            total += samples
        if not total > 0:
            raise InvalidInputError(f"module '{module}': total sample count is {total}; "
                                    "at least one client needs samples > 0")

    def _convert(self, raw: _abi.Result, module: str, d_out: int, d_in: int, client_count: int) -> ModuleResult:
        def matrix(pointer, rows: int, cols: int, name: str) -> np.ndarray:
            if rows * cols == 0:
                return np.zeros((rows, cols), np.float32)
            if not pointer:
                raise InternalError(f"module '{module}': plugin '{self.name}' returned NULL '{name}'")
            return np.ctypeslib.as_array(pointer, shape=(rows, cols)).copy()

        rank = int(raw.rank)
        problems = []
        if rank < 1:
            problems.append("global rank is 0")
        if not raw.scaling > 0:
            problems.append(f"scaling is {raw.scaling}; expected > 0")
        payload_count = int(raw.client_payload_count)
        if payload_count not in (0, client_count):
            problems.append(f"{payload_count} client payloads for {client_count} clients")
        if problems:
            raise InternalError(f"module '{module}': plugin '{self.name}' returned an inconsistent result: "
                                + "; ".join(problems))
        result = ModuleResult(module=module, a=matrix(raw.a, rank, d_in, "a"), b=matrix(raw.b, d_out, rank, "b"),
                              scaling=float(raw.scaling))
        if raw.residual_rank > 0:
            q = int(raw.residual_rank)
            result.residual = (matrix(raw.residual_u, d_out, q, "residual_u"),
                               matrix(raw.residual_v, q, d_in, "residual_v"))
        if payload_count and raw.client_payloads:
            payloads = []
            for k in range(payload_count):
                p = raw.client_payloads[k]
                r = int(p.rank)
                payloads.append(ClientPayload(a=matrix(p.a, r, d_in, f"client_payloads[{k}].a"),
                                              b=matrix(p.b, d_out, r, f"client_payloads[{k}].b"),
                                              scaling=float(p.scaling)))
            result.payloads = payloads
        if raw.diagnostic_count > 0 and raw.diagnostics:
            result.diagnostics = {raw.diagnostics[i].name.decode("utf-8"): float(raw.diagnostics[i].value)
                                  for i in range(int(raw.diagnostic_count))}
        return result

    def save_state(self) -> bytes | None:
        """The state kept across rounds, or None for a stateless strategy."""
        d = self._descriptor
        if not (d.save_state and d.free_bytes):
            return None
        state = self._live_state()
        out = _abi.Bytes()
        error = ctypes.create_string_buffer(_ERROR_CAPACITY)
        status = d.save_state(state, ctypes.byref(out), error, _ERROR_CAPACITY)
        if status != _abi.Status.OK:
            raise error_for_status(status, _message(error) or "save_state failed")
        try:
            return ctypes.string_at(out.data, out.size) if out.data else b""
        finally:
            d.free_bytes(state, ctypes.byref(out))

    def load_state(self, data: bytes) -> None:
        """Restores bytes written by :meth:`save_state` of the same strategy."""
        d = self._descriptor
        if not d.load_state:
            raise error_for_status(_abi.Status.INVALID_STATE, f"strategy '{self.name}' keeps no state across rounds")
        state = self._live_state()
        error = ctypes.create_string_buffer(_ERROR_CAPACITY)
        buffer = (ctypes.c_uint8 * max(len(data), 1)).from_buffer_copy(data or b"\0")
        status = d.load_state(state, buffer, len(data), error, _ERROR_CAPACITY)
        if status != _abi.Status.OK:
            raise error_for_status(status, _message(error) or "load_state failed")

    def aggregate_state_dicts(self, state_dicts, samples, lora_configs, client_ids=None, round_index=0,
                              workers: int = 1):
        """Aggregates PEFT state dicts; see :func:`lora_agg.peft.aggregate_state_dicts`."""
        from .peft import aggregate_state_dicts
        return aggregate_state_dicts(self, state_dicts, samples, lora_configs, client_ids=client_ids,
                                     round_index=round_index, workers=workers)
