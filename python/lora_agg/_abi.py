"""ctypes mirror of ``Sources/CLoraAggABI/include/lora_agg.h`` (ABI 1.0).

Field order, types and therefore offsets follow the header exactly; the tests
compile a small C file against the header and compare every ``sizeof`` and
``offsetof`` with these classes. The header's growth rule applies: structs
only grow at the end, so a newer plugin's larger descriptor still reads right
through these fields.
"""

from __future__ import annotations

import ctypes
import enum
from ctypes import (CFUNCTYPE, POINTER, Structure, c_char, c_char_p, c_double, c_int, c_int32,
                    c_size_t, c_uint8, c_uint32, c_uint64, c_void_p)

ABI_MAJOR = 1
ABI_MINOR = 0
ENTRY_SYMBOL = "lora_agg_plugin_entry"

#: C enums are ``int`` on every Linux ABI this project targets.
c_status = c_int


class Status(enum.IntEnum):
    """``lora_agg_status``: the result of every fallible call."""

    OK = 0
    INVALID_INPUT = 1
    UNSUPPORTED = 2
    INVALID_CONFIG = 3
    INVALID_STATE = 4
    INTERNAL_ERROR = 5


class Capability(enum.IntFlag):
    """``LORA_AGG_CAP_*`` bits of ``lora_agg_plugin.capabilities``."""

    HETEROGENEOUS_RANKS = 1 << 0
    EXACT = 1 << 1
    REQUIRES_SHARED_A = 1 << 2
    BASE_RESIDUAL = 1 << 3
    PER_CLIENT_PAYLOADS = 1 << 4
    STATEFUL = 1 << 5


#: Kebab-case names, as `lora-agg describe` prints them.
CAPABILITY_NAMES = {
    Capability.HETEROGENEOUS_RANKS: "heterogeneous-ranks",
    Capability.EXACT: "exact",
    Capability.REQUIRES_SHARED_A: "requires-shared-a",
    Capability.BASE_RESIDUAL: "base-residual",
    Capability.PER_CLIENT_PAYLOADS: "per-client-payloads",
    Capability.STATEFUL: "stateful",
}
KNOWN_CAPABILITY_BITS = int(sum(CAPABILITY_NAMES))

c_float_p = POINTER(ctypes.c_float)
c_char_buffer = POINTER(c_char)  # caller-owned error buffers


class Client(Structure):
    """``lora_agg_client``: one client's factors for one module (host-owned)."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("rank", c_uint32),
        ("samples", c_double),
        ("scaling", c_double),
        ("a", c_void_p),
        ("b", c_void_p),
        ("client_id", c_char_p),
    ]


class Round(Structure):
    """``lora_agg_round``: the clients of one round for one module (host-owned)."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("client_count", c_uint32),
        ("d_out", c_uint64),
        ("d_in", c_uint64),
        ("module_name", c_char_p),
        ("round_index", c_uint64),
        ("clients", POINTER(Client)),
    ]


class ClientPayload(Structure):
    """``lora_agg_client_payload``: factors for one client (plugin-owned)."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("rank", c_uint32),
        ("scaling", c_double),
        ("a", c_float_p),
        ("b", c_float_p),
    ]


class Diagnostic(Structure):
    """``lora_agg_diagnostic``: one named number (plugin-owned)."""

    _fields_ = [("name", c_char_p), ("value", c_double)]


class Result(Structure):
    """``lora_agg_result``: the outcome of one module (plugin-owned until free_result)."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("rank", c_uint32),
        ("scaling", c_double),
        ("a", c_float_p),
        ("b", c_float_p),
        ("residual_rank", c_uint32),
        ("residual_u", c_float_p),
        ("residual_v", c_float_p),
        ("client_payload_count", c_uint32),
        ("client_payloads", POINTER(ClientPayload)),
        ("diagnostic_count", c_uint32),
        ("diagnostics", POINTER(Diagnostic)),
        ("plugin_private", c_void_p),
    ]


class Bytes(Structure):
    """``lora_agg_bytes``: saved state (plugin-owned until free_bytes)."""

    _fields_ = [("data", POINTER(c_uint8)), ("size", c_uint64), ("plugin_private", c_void_p)]


FactoredSVDFn = CFUNCTYPE(c_status, c_uint32, POINTER(c_double), POINTER(c_uint32),
                          POINTER(c_float_p), POINTER(c_float_p), c_uint64, c_uint64, c_uint32,
                          c_float_p, c_float_p, c_float_p, c_char_buffer, c_size_t)
LogFn = CFUNCTYPE(None, c_int32, c_char_p)


class HostApi(Structure):
    """``lora_agg_host_api``: services the host offers to plugins."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("abi_major", c_uint32),
        ("abi_minor", c_uint32),
        ("reserved", c_uint32),
        ("factored_svd", FactoredSVDFn),
        ("log", LogFn),
    ]


CreateFn = CFUNCTYPE(c_status, c_char_p, POINTER(HostApi), POINTER(c_void_p), c_char_buffer, c_size_t)
AggregateFn = CFUNCTYPE(c_status, c_void_p, POINTER(Round), POINTER(Result), c_char_buffer, c_size_t)
FreeResultFn = CFUNCTYPE(None, c_void_p, POINTER(Result))
DestroyFn = CFUNCTYPE(None, c_void_p)
SaveStateFn = CFUNCTYPE(c_status, c_void_p, POINTER(Bytes), c_char_buffer, c_size_t)
LoadStateFn = CFUNCTYPE(c_status, c_void_p, POINTER(c_uint8), c_uint64, c_char_buffer, c_size_t)
FreeBytesFn = CFUNCTYPE(None, c_void_p, POINTER(Bytes))
GetExtensionFn = CFUNCTYPE(c_void_p, c_char_p)


class PluginDescriptor(Structure):
    """``lora_agg_plugin``: the descriptor the entry symbol returns (plugin-owned)."""

    _fields_ = [
        ("abi_major", c_uint32),
        ("abi_minor", c_uint32),
        ("struct_size", c_uint32),
        ("reserved", c_uint32),
        ("name", c_char_p),
        ("version", c_char_p),
        ("summary", c_char_p),
        ("citation", c_char_p),
        ("description", c_char_p),
        ("parameters_schema", c_char_p),
        ("capabilities", c_uint64),
        ("create", CreateFn),
        ("aggregate", AggregateFn),
        ("free_result", FreeResultFn),
        ("destroy", DestroyFn),
        ("save_state", SaveStateFn),
        ("load_state", LoadStateFn),
        ("free_bytes", FreeBytesFn),
        ("get_extension", GetExtensionFn),
    ]


EntryFn = CFUNCTYPE(c_void_p)

#: The C struct names and their mirrors, for the layout test.
STRUCTS = {
    "lora_agg_client": Client,
    "lora_agg_round": Round,
    "lora_agg_client_payload": ClientPayload,
    "lora_agg_diagnostic": Diagnostic,
    "lora_agg_result": Result,
    "lora_agg_bytes": Bytes,
    "lora_agg_host_api": HostApi,
    "lora_agg_plugin": PluginDescriptor,
}
