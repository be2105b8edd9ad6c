"""The ``lora_agg_host_api`` table this process hands to every plugin.

``factored_svd`` is implemented with numpy: the thin SVD of
M = Σ_j w_j B_j A_j without forming M (QR of the stacked factors, then an SVD
of the small (Σr_j)² core), in float64. ``log`` forwards to the
``lora_agg.plugin`` logger. The table and the ctypes callbacks live until
process exit, as the ABI requires.
"""

from __future__ import annotations

import ctypes
import logging

import numpy as np

from . import _abi

logger = logging.getLogger("lora_agg.plugin")


def _write_error(buffer, capacity: int, message: str) -> None:
    if capacity <= 0 or not buffer:
        return
    data = message.encode("utf-8")[: capacity - 1]
    ctypes.memmove(buffer, data, len(data))
    buffer[len(data)] = b"\0"


def factored_svd_numpy(weights, b_factors, a_factors, keep: int):
    """Top-``keep`` thin SVD of Σ_j w_j B_j A_j from its factors (float64).

    Returns ``(u, sigma, vt)`` with u d_out×keep, sigma descending, vt keep×d_in.
    """
    b_stack = np.concatenate([w * np.asarray(b, np.float64) for w, b in zip(weights, b_factors)], axis=1)
    a_stack = np.concatenate([np.asarray(a, np.float64) for a in a_factors], axis=0)
    qb, rb = np.linalg.qr(b_stack)
    qa, ra = np.linalg.qr(a_stack.T)
    core_u, sigma, core_vt = np.linalg.svd(rb @ ra.T)
    u = qb @ core_u[:, :keep]
    vt = (qa @ core_vt[:keep].T).T
    return u, sigma[:keep], vt


def _factored_svd(count, weights, ranks, b_factors, a_factors, d_out, d_in, keep, u, sigma, vt,
                  error, capacity):
    try:
        d_out, d_in = int(d_out), int(d_in)
        if count == 0:
            raise ValueError("no terms")
        rank_list = [int(ranks[j]) for j in range(count)]
        if keep > min(d_out, d_in, sum(rank_list)):
            raise ValueError(f"keep {keep} exceeds min(d_out {d_out}, d_in {d_in}, sum of ranks {sum(rank_list)})")
        bs = [np.ctypeslib.as_array(b_factors[j], shape=(d_out, r)) for j, r in enumerate(rank_list)]
        as_ = [np.ctypeslib.as_array(a_factors[j], shape=(r, d_in)) for j, r in enumerate(rank_list)]
        w = [float(weights[j]) for j in range(count)]
        out_u, out_s, out_vt = factored_svd_numpy(w, bs, as_, int(keep))
        if keep:
            np.ctypeslib.as_array(u, shape=(d_out, keep))[:] = out_u
            np.ctypeslib.as_array(sigma, shape=(keep,))[:] = out_s
            np.ctypeslib.as_array(vt, shape=(keep, d_in))[:] = out_vt
        return _abi.Status.OK
    except Exception as exc:  # a callback must never raise into C
        _write_error(error, capacity, f"factored_svd failed: {exc}")
        return _abi.Status.INTERNAL_ERROR


def _log(level, message):
    text = message.decode("utf-8", "replace") if message else ""
    logger.log(logging.DEBUG if level < 1 else logging.INFO if level == 1 else logging.WARNING, text)


_FACTORED_SVD = _abi.FactoredSVDFn(_factored_svd)
_LOG = _abi.LogFn(_log)

#: The table passed to ``create``; module-level so it is never collected.
HOST_API = _abi.HostApi(
    struct_size=ctypes.sizeof(_abi.HostApi), abi_major=_abi.ABI_MAJOR, abi_minor=_abi.ABI_MINOR,
    reserved=0, factored_svd=_FACTORED_SVD, log=_LOG)
