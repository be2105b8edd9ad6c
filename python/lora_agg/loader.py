"""Finding and loading plugin shared objects with ctypes.

Search order, as the ``lora-agg`` CLI: explicit paths, then the folders in
``LORA_AGG_PLUGIN_PATH`` (colon-separated), then the package's build folder
(the CLI uses its executable's folder, which is the build folder). The build
folder is found by walking up from the current directory and from this
file to a folder holding ``Package.swift`` and taking ``.build/release`` or
``.build/debug``, whichever holds the newer plugins.

Plugins are never unloaded (Swift images leave dangling metadata behind a
``dlclose``), so each file is opened once per process with RTLD_NODELETE and
its handle is cached for good.
"""

from __future__ import annotations

import ctypes
import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from . import _abi
from .errors import PluginLoadError

ENVIRONMENT_VARIABLE = "LORA_AGG_PLUGIN_PATH"
_KEBAB = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")

# Real path -> Plugin. A file is dlopen'ed once per process.
_LOADED: dict[str, "Plugin"] = {}


@dataclass(frozen=True)
class ParameterSpec:
    """One hyperparameter from a plugin's ``parameters_schema``."""

    name: str
    type: str
    default: object
    description: str = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple | None = None


@dataclass(eq=False)
class Plugin:
    """A loaded strategy plugin and its checked metadata."""

    path: str
    name: str
    version: str
    summary: str
    citation: str
    description: str
    parameters_schema: str
    capability_bits: int
    abi_minor: int
    _descriptor: _abi.PluginDescriptor = field(repr=False)
    _library: ctypes.CDLL = field(repr=False)

    @property
    def capabilities(self) -> frozenset[str]:
        """Kebab-case capability names, e.g. ``{"exact", "base-residual"}``."""
        return frozenset(name for bit, name in _abi.CAPABILITY_NAMES.items() if self.capability_bits & bit)

    def has(self, capability: _abi.Capability | str) -> bool:
        """Whether the plugin declares a capability (a ``Capability`` bit or its kebab-case name)."""
        if isinstance(capability, str):
            return capability in self.capabilities
        return bool(self.capability_bits & capability)

    @property
    def parameters(self) -> list[ParameterSpec]:
        """The hyperparameters, parsed from the JSON schema."""
        specs = []
        for item in json.loads(self.parameters_schema):
            specs.append(ParameterSpec(
                name=item["name"], type=item["type"], default=item.get("default"),
                description=item.get("description", ""), minimum=item.get("minimum"),
                maximum=item.get("maximum"),
                choices=tuple(item["choices"]) if item.get("choices") is not None else None))
        return specs

    def describe(self) -> dict:
        """Everything `lora-agg describe` shows, as a JSON-ready dictionary."""
        return {
            "name": self.name, "version": self.version, "summary": self.summary,
            "citation": self.citation, "description": self.description,
            "capabilities": sorted(self.capabilities),
            "parameters": json.loads(self.parameters_schema), "path": self.path,
            "abi": f"{_abi.ABI_MAJOR}.{self.abi_minor}",
        }

    def create(self, config: Mapping[str, object] | None = None, /, **hyperparameters):
        """A new strategy instance; hyperparameters as a dict and/or keywords.

        The plugin checks them: unknown keys and out-of-range values raise
        :class:`~lora_agg.InvalidConfigError` with the plugin's message.
        """
        from .aggregator import Aggregator  # circular at import time
        merged = dict(config or {})
        merged.update(hyperparameters)
        return Aggregator(self, merged)


def load_plugin(path: str | os.PathLike) -> Plugin:
    """Loads one shared object and checks its descriptor, as the Swift loader does."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise PluginLoadError("path-missing", f"Could not find plugin path '{path}'\n"
                              "Detail: No file or folder exists at this path.\n"
                              f"Hint: Check the path and {ENVIRONMENT_VARIABLE}.", path)
    real = os.path.realpath(path)
    if real in _LOADED:
        return _LOADED[real]
    mode = os.RTLD_NOW | os.RTLD_LOCAL | getattr(os, "RTLD_NODELETE", 0)
    try:
        library = ctypes.CDLL(real, mode=mode)
    except OSError as exc:
        raise PluginLoadError("not-shared-object",
                              f"Could not load plugin '{path}': not a loadable shared object\n"
                              f"Detail: {exc}\n"
                              "Hint: Plugins are lib<Name>.so files built with `swift build` or `cc -shared`.",
                              path) from None
    try:
        entry_address = ctypes.cast(getattr(library, _abi.ENTRY_SYMBOL), ctypes.c_void_p).value
    except AttributeError:
        raise PluginLoadError("missing-entry-symbol",
                              f"Could not load plugin '{path}': it does not export '{_abi.ENTRY_SYMBOL}'\n"
                              "Detail: The shared object loaded, but has no entry symbol, so it is not a lora-agg plugin.",
                              path) from None
    address = _abi.EntryFn(entry_address)()
    if not address:
        raise PluginLoadError("missing-field", f"Could not load plugin '{path}': required field "
                              "'descriptor (entry returned NULL)' is NULL", path)
    plugin = _check_descriptor(address, path, library)
    _LOADED[real] = plugin
    return plugin


def _check_descriptor(address: int, path: str, library: ctypes.CDLL) -> Plugin:
    # Read the major version alone first: nothing else is meaningful if it differs.
    major = ctypes.c_uint32.from_address(address).value
    if major != _abi.ABI_MAJOR:
        raise PluginLoadError("abi-mismatch",
                              f"Could not load plugin '{path}': built for ABI {major}, this host speaks {_abi.ABI_MAJOR}\n"
                              f"Detail: Plugin ABI major version is {major}; this host supports {_abi.ABI_MAJOR}.\n"
                              "Hint: Rebuild the plugin against this release's lora_agg.h.", path)
    descriptor = _abi.PluginDescriptor.from_address(address)
    minimum = ctypes.sizeof(_abi.PluginDescriptor)
    if descriptor.struct_size < minimum:
        raise PluginLoadError("descriptor-too-small",
                              f"Could not load plugin '{path}': descriptor is {descriptor.struct_size} bytes\n"
                              f"Detail: An ABI 1.0 descriptor has at least {minimum} bytes.", path)

    def required_text(field_name: str) -> str:
        value = getattr(descriptor, field_name)
        if value is None:
            raise PluginLoadError("missing-field", f"Could not load plugin '{path}': required field "
                                  f"'{field_name}' is NULL\nDetail: Every plugin must provide '{field_name}'.", path)
        return value.decode("utf-8")

    texts = {name: required_text(name) for name in
             ("name", "version", "summary", "citation", "description", "parameters_schema")}
    for function in ("create", "aggregate", "free_result", "destroy"):
        if not getattr(descriptor, function):
            raise PluginLoadError("missing-field", f"Could not load plugin '{path}': required field "
                                  f"'{function}' is NULL\nDetail: Every plugin must provide '{function}'.", path)
    problems = []
    if descriptor.reserved != 0:
        problems.append(f"reserved field is {descriptor.reserved}; expected 0")
    unknown = descriptor.capabilities & ~_abi.KNOWN_CAPABILITY_BITS
    if unknown:
        problems.append(f"unknown capability bits 0x{unknown:x}")
    if descriptor.capabilities & _abi.Capability.STATEFUL and not (
            descriptor.save_state and descriptor.load_state and descriptor.free_bytes):
        problems.append("declares 'stateful' but lacks save_state, load_state or free_bytes")
    if not _KEBAB.match(texts["name"]):
        problems.append(f"name '{texts['name']}' is not kebab-case")
    try:
        schema = json.loads(texts["parameters_schema"])
        if not isinstance(schema, list) or not all(isinstance(item, dict) and "name" in item and "type" in item
                                                    for item in schema):
            problems.append("parameters_schema is not a JSON array of objects with 'name' and 'type'")
    except json.JSONDecodeError as exc:
        problems.append(f"parameters_schema is not valid JSON: {exc}")
    if problems:
        raise PluginLoadError("invalid-metadata",
                              f"Could not load plugin '{path}': invalid metadata\nDetail: {'; '.join(problems)}.", path)
    return Plugin(path=path, name=texts["name"], version=texts["version"], summary=texts["summary"],
                  citation=texts["citation"], description=texts["description"],
                  parameters_schema=texts["parameters_schema"], capability_bits=int(descriptor.capabilities),
                  abi_minor=int(descriptor.abi_minor), _descriptor=descriptor, _library=library)


def _candidates(folder: str) -> list[str]:
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [os.path.join(folder, n) for n in sorted(names) if n.startswith("lib") and n.endswith(".so")]


def _exports_entry_symbol(path: str) -> bool:
    # Read the dynamic symbol table as bytes instead of dlopen-ing: loading
    # runs the file's constructors, and a build folder holds other libraries.
    try:
        with open(path, "rb") as handle:
            return _abi.ENTRY_SYMBOL.encode() + b"\0" in handle.read()
    except OSError:
        return False


def build_folder(start: Iterable[str | os.PathLike] | None = None) -> str | None:
    """The Swift package's build folder holding the plugins, or None.

    Walks up from each start (default: the current directory, then this
    file's folder) to a folder with ``Package.swift`` and ``.build``, and
    returns ``.build/release`` or ``.build/debug``, whichever has the most
    recently built plugin (a stale configuration never shadows a fresh one).
    """
    starts = list(start) if start is not None else [os.getcwd(), os.path.dirname(os.path.abspath(__file__))]
    for origin in starts:
        for folder in [Path(origin).resolve(), *Path(origin).resolve().parents]:
            if (folder / "Package.swift").is_file() and (folder / ".build").is_dir():
                best, best_time = None, -1.0
                for configuration in ("release", "debug"):
                    candidate = folder / ".build" / configuration
                    plugins = [p for p in _candidates(str(candidate)) if _exports_entry_symbol(p)]
                    newest = max((os.path.getmtime(p) for p in plugins), default=-1.0)
                    if newest > best_time:
                        best, best_time = str(candidate), newest
                if best is not None:
                    return best
    return None


def search_paths(explicit: Iterable[str | os.PathLike] = (), environ: Mapping[str, str] | None = None,
                 include_build_folder: bool = True) -> list[str]:
    """The search order: explicit paths, ``LORA_AGG_PLUGIN_PATH``, then the build folder."""
    environ = os.environ if environ is None else environ
    paths = [os.fspath(p) for p in explicit]
    paths += [p for p in environ.get(ENVIRONMENT_VARIABLE, "").split(":") if p]
    if include_build_folder:
        folder = build_folder()
        if folder:
            paths.append(folder)
    return paths


class Registry:
    """The loaded strategies, by name.

    An explicit file must be a valid plugin. In folders, ``lib*.so`` files
    without the entry symbol are ignored and files that fail to load are
    recorded in :attr:`skipped`. Two files of one name in the same place are
    an error naming both; a name found again in a later search location is
    shadowed by the earlier one (recorded in :attr:`shadowed`), so an explicit
    path or ``LORA_AGG_PLUGIN_PATH`` can override a built-in strategy.
    """

    def __init__(self, paths: Iterable[str | os.PathLike] = ()):
        self.plugins: dict[str, Plugin] = {}
        self.searched: list[str] = []
        self.skipped: list[tuple[str, PluginLoadError]] = []
        self.shadowed: list[tuple[str, str]] = []
        seen: set[str] = set()
        for raw in paths:
            path = os.fspath(raw)
            if not os.path.exists(path):
                raise PluginLoadError("path-missing", f"Could not find plugin path '{path}'\n"
                                      "Detail: No file or folder exists at this path.\n"
                                      f"Hint: Check the path and {ENVIRONMENT_VARIABLE}.", path)
            self.searched.append(path)
            here: dict[str, Plugin] = {}
            files = [path] if os.path.isfile(path) else [f for f in _candidates(path) if _exports_entry_symbol(f)]
            for file in files:
                real = os.path.realpath(file)
                if real in seen:
                    continue
                seen.add(real)
                try:
                    plugin = load_plugin(file)
                except PluginLoadError as error:
                    if os.path.isfile(path):
                        raise
                    self.skipped.append((file, error))
                    continue
                if plugin.name in here:
                    raise PluginLoadError("duplicate-name", f"Two plugins are named '{plugin.name}'\n"
                                          f"Detail: '{here[plugin.name].path}' and '{file}' both define it.\n"
                                          "Hint: Remove one of them from the plugin path, or rename one.", file)
                here[plugin.name] = plugin
            for name, plugin in here.items():
                if name in self.plugins:
                    self.shadowed.append((plugin.path, self.plugins[name].path))
                else:
                    self.plugins[name] = plugin

    @classmethod
    def discover(cls, explicit: Iterable[str | os.PathLike] = (), environ: Mapping[str, str] | None = None) -> "Registry":
        """Loads from the standard search order; fails when nothing was found."""
        registry = cls(search_paths(explicit, environ))
        if not registry.plugins:
            if registry.skipped:
                raise registry.skipped[0][1]
            searched = ", ".join(f"'{p}'" for p in registry.searched) or "no folder"
            raise PluginLoadError("no-plugins-found", "No plugins found\n"
                                  f"Detail: Looked in {searched}.\n"
                                  "Hint: Run `swift build` in the repository first, or point "
                                  f"{ENVIRONMENT_VARIABLE} at a folder of lib*.so plugins.")
        return registry

    @property
    def names(self) -> list[str]:
        """Strategy names, sorted."""
        return sorted(self.plugins)

    def plugin(self, name: str) -> Plugin:
        """The plugin called ``name``, or an error listing the known names and the nearest one."""
        if name in self.plugins:
            return self.plugins[name]
        known = ", ".join(self.names) or "(none)"
        message = f"Unrecognized strategy '{name}'\nDetail: Known strategies: {known}."
        close = difflib.get_close_matches(name, self.names, n=1)
        if close:
            message += f"\nHint: Did you mean '{close[0]}'?"
        raise PluginLoadError("unknown-strategy", message)

    __getitem__ = plugin

    def __contains__(self, name: object) -> bool:
        return name in self.plugins

    def __iter__(self) -> Iterator[Plugin]:
        return iter(self.plugins[n] for n in self.names)

    def __len__(self) -> int:
        return len(self.plugins)

    def create(self, name: str, config: Mapping[str, object] | None = None, /, **hyperparameters):
        """A new instance of strategy ``name`` with hyperparameters."""
        return self.plugin(name).create(config, **hyperparameters)
