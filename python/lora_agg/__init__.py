"""lora_agg: the lora-agg strategy plugins (lib<Name>.so, C ABI) from Python.

    import lora_agg
    registry = lora_agg.discover()              # explicit, LORA_AGG_PLUGIN_PATH, build folder
    fedit = registry.create("fedit")            # hyperparameters as keywords or a dict
    result = fedit.aggregate([lora_agg.ClientFactors(a, b, samples=10, scaling=2.0), ...])
    result.a, result.b, result.scaling, result.residual, result.payloads, result.diagnostics

The plugins are loaded with ctypes (which calls C through libffi); nothing is
compiled at install time.
"""

from ._abi import ABI_MAJOR, ABI_MINOR, Capability, Status
from .aggregator import Aggregator, ClientFactors, ClientPayload, ModuleResult, fit_rank
from .errors import (AggregationError, InternalError, InvalidConfigError, InvalidInputError, InvalidStateError,
                     LoraAggError, PluginLoadError, UnsupportedError)
from .loader import ENVIRONMENT_VARIABLE, ParameterSpec, Plugin, Registry, build_folder, load_plugin, search_paths
from .peft import (LoraScaling, StateDictResult, aggregate_state_dicts, base_weight_key, compress_factored,
                   module_name, split_state_dict)

__version__ = "0.1.0"

_DEFAULT: Registry | None = None


def discover(explicit=(), environ=None) -> Registry:
    """A registry of every plugin in the standard search order (see :mod:`lora_agg.loader`)."""
    return Registry.discover(explicit, environ)


def default_registry() -> Registry:
    """The registry from the standard search order, built once per process."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Registry.discover()
    return _DEFAULT


def list_plugins() -> list[str]:
    """Names of the strategies found in the standard search order."""
    return default_registry().names


def create(name: str, config=None, /, **hyperparameters) -> Aggregator:
    """A new instance of strategy ``name`` from the default registry."""
    return default_registry().create(name, config, **hyperparameters)


__all__ = [
    "ABI_MAJOR", "ABI_MINOR", "Capability", "Status", "Aggregator", "ClientFactors", "ClientPayload",
    "ModuleResult", "fit_rank", "AggregationError", "InternalError", "InvalidConfigError", "InvalidInputError",
    "InvalidStateError", "LoraAggError", "PluginLoadError", "UnsupportedError", "ENVIRONMENT_VARIABLE",
    "ParameterSpec", "Plugin", "Registry", "build_folder", "load_plugin", "search_paths", "LoraScaling",
    "StateDictResult", "aggregate_state_dicts", "base_weight_key", "compress_factored", "module_name",
    "split_state_dict", "discover", "default_registry", "list_plugins", "create",
]
