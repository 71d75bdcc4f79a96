"""The plugin registry: a pluggy PluginManager over :mod:`kvpolicy.hookspecs`.

The plugins kvpolicy ships (:data:`DEFAULT_PLUGINS`: the core's built-ins and the
LogQuant, KIVI and StreamingLLM plugin packages) register first, by module name, through the
same hooks; then every ``kvpolicy`` entry point. What is registered first wins a name
clash, so no third party can replace a shipped plugin or policy: an entry point that takes a
shipped plugin's name, or registers a name already provided, is skipped with a warning naming
the newcomer. A plugin that fails to load is recorded in :attr:`Registry.load_errors` with a
warning naming it; the others still load.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import warnings
from typing import Any

import attrs
import pluggy

from kvpolicy import hookspecs
from kvpolicy.config import ExecutorSpec, PolicyConfig
from kvpolicy.errors import ConfigError, UnknownNameError

KINDS = ("selector", "quantizer", "executor", "layer", "policy")
#: the plugins kvpolicy ships, ``{plugin name: module}``, registered in this order before any entry point
DEFAULT_PLUGINS = {
    "kvpolicy": "kvpolicy.policy.builtins",
    "kvpolicy_logquant": "kvpolicy_logquant.plugin",
    "kvpolicy_kivi": "kvpolicy_kivi.plugin",
    "kvpolicy_streaming": "kvpolicy_streaming.plugin",
}
#: what a registered class of each kind must provide (its contract's attributes and methods)
_CONTRACTS = {
    "selector": ("name", "budget", "keep"),
    "quantizer": ("name", "supported_bits", "quantize", "concat"),
    "executor": ("name", "attend"),
    "layer": ("name", "serves", "build"),
}
_HOOKS = {
    "selector": "kvpolicy_selectors",
    "quantizer": "kvpolicy_quantizers",
    "executor": "kvpolicy_executors",
    "layer": "kvpolicy_layers",
    "policy": "kvpolicy_policies",
}


class Registry:
    """Everything the installed plugins provide, by kind and name, with the providing plugin."""

    def __init__(self, load_entry_points: bool = True, plugins: dict[str, Any] | None = None):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.load_errors: dict[str, str] = {}
        for name, module in DEFAULT_PLUGINS.items():
            self.pm.register(importlib.import_module(module), name=name)
        if load_entry_points:
            for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
                self._load_entry_point(ep)
        for name, plugin in (plugins or {}).items():
            self.pm.register(plugin, name=name)
        self._check_hook_names()
        self._entries: dict[str, dict[str, tuple[Any, str]]] = {kind: {} for kind in KINDS}
        self._collect()

    def _load_entry_point(self, ep: importlib.metadata.EntryPoint) -> None:
        if ep.value in DEFAULT_PLUGINS.values():  # a shipped plugin's own entry point (an older install)
            return
        source = f"{ep.value}, from {ep.dist.name if ep.dist else 'an unknown distribution'}"
        if self.pm.has_plugin(ep.name):
            shipped = "a plugin kvpolicy ships" if ep.name in DEFAULT_PLUGINS else "a plugin already loaded"
            self._fail(f"{ep.name} ({source})", f"takes the name of {shipped}; skipped")
            return
        try:
            self.pm.register(ep.load(), name=ep.name)
        except Exception as err:  # a broken plugin must not break the others
            self._fail(ep.name, f"failed to load ({type(err).__name__}: {err}; {source})")

    def _check_hook_names(self) -> None:
        """A hook implementation whose name matches no hook (``kvpolicy_selector`` for
        ``kvpolicy_selectors``) would never be called: name it and the hooks there are."""
        known = sorted(_HOOKS.values())
        for hook_name, caller in vars(self.pm.hook).items():
            if caller.spec is not None:
                continue
            for impl in caller.get_hookimpls():
                close = difflib.get_close_matches(hook_name, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self._fail(impl.plugin_name, f"implements unknown hook {hook_name!r}{hint}; hooks: {', '.join(known)}")

    def _fail(self, plugin: str, message: str) -> None:
        self.load_errors[plugin] = message
        warnings.warn(f"kvpolicy plugin {plugin!r} {message}", RuntimeWarning, stacklevel=3)

    def _collect(self) -> None:
        order = {name: i for i, (name, _) in enumerate(self.pm.list_name_plugin())}
        for kind, hook_name in _HOOKS.items():
            hook = getattr(self.pm.hook, hook_name)
            # in registration order, so the shipped plugins win name clashes (pluggy's own
            # order puts an implementation marked trylast first)
            for impl in sorted(hook.get_hookimpls(), key=lambda impl: order[impl.plugin_name]):
                plugin = impl.plugin_name
                try:
                    items = impl.function() or []
                    for item in items:
                        broken = _breaks_contract(kind, item)
                        if broken:
                            self._fail(plugin, f"registers a {kind} that {broken}; skipped")
                            continue
                        name = _name_of(kind, item)
                        if name in self._entries[kind]:
                            other = self._entries[kind][name][1]
                            self._fail(plugin, f"registers {kind} {name!r}, already provided by {other!r}; skipped")
                            continue
                        self._entries[kind][name] = (item, plugin)
                except Exception as err:
                    self._fail(plugin, f"hook {hook_name} failed ({type(err).__name__}: {err})")

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def provider(self, kind: str, name: str) -> str:
        return self._lookup(kind, name)[1]

    def _lookup(self, kind: str, name: str) -> tuple[Any, str]:
        try:
            return self._entries[kind][name]
        except KeyError:
            raise UnknownNameError(kind, name, self._entries[kind]) from None

    def selector_class(self, name: str) -> type:
        return self._lookup("selector", name)[0]

    def quantizer(self, name: str):
        return self._lookup("quantizer", name)[0]()

    def executor(self, spec: str | dict | ExecutorSpec):
        """A new executor from its name or spec (``{type: fused, kernel: triton}``), its
        parameters checked by the executor class (an error names the accepted ones)."""
        spec = ExecutorSpec.coerce(spec)
        cls = self._lookup("executor", spec.type)[0]
        try:
            return cls(**spec.params)
        except TypeError:
            accepted = parameter_names(cls)
            raise ConfigError(
                "executor",
                spec.to_data(),
                f"parameters of executor {spec.type!r}: {', '.join(accepted) if accepted else 'none'}",
            ) from None

    def executor_class(self, name: str) -> type:
        return self._lookup("executor", name)[0]

    def layer_factories(self) -> dict[str, type]:
        """Registered layer factories by name, built-ins first."""
        return {name: item for name, (item, _) in self._entries["layer"].items()}

    def policy_config(self, name: str) -> PolicyConfig:
        item = self._lookup("policy", name)[0]
        return item if isinstance(item, PolicyConfig) else PolicyConfig.from_dict(item)

    def table(self) -> list[tuple[str, str, str]]:
        """``(kind, name, plugin)`` rows for everything registered."""
        return [(kind, name, plugin) for kind in KINDS for name, (_, plugin) in sorted(self._entries[kind].items())]


def parameter_names(cls: type) -> list[str]:
    """The parameters a registered class takes from the config (its public attrs fields)."""
    if not attrs.has(cls):
        return []
    return [f.name for f in attrs.fields(cls) if f.init and not f.name.startswith("_")]


def _breaks_contract(kind: str, item: Any) -> str | None:
    """How ``item`` fails the contract of ``kind`` (in words), or ``None``."""
    if kind == "policy":
        if isinstance(item, PolicyConfig) or (isinstance(item, dict) and isinstance(item.get("name"), str)):
            return None
        return f"is neither a PolicyConfig nor a mapping with a name ({type(item).__name__})"
    if not isinstance(item, type):
        return f"is not a class ({type(item).__name__} {item!r:.60})"
    missing = [attribute for attribute in _CONTRACTS[kind] if not hasattr(item, attribute)]
    if missing:
        return f"does not implement the {kind} contract: {item.__name__} has no {', '.join(missing)}"
    if inspect.isabstract(item):
        abstract = ", ".join(sorted(item.__abstractmethods__))
        return f"does not implement the {kind} contract: {item.__name__} leaves {abstract} abstract"
    if not isinstance(item.name, str) or not item.name:
        return f"has no name: {item.__name__}.name is {item.name!r}"
    return None


def _name_of(kind: str, item: Any) -> str:
    if kind == "policy":
        return item.name if isinstance(item, PolicyConfig) else item["name"]
    return item.name


_default: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The registry of installed plugins, built once per process (``refresh=True`` rebuilds it)."""
    global _default
    if _default is None or refresh:
        _default = Registry()
    return _default
