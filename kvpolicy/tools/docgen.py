"""Documentation generated from the code: the YAML reference and the retention pictures.

Used by the docs build (``docs/hooks.py``) so the pages cannot drift from the classes.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import attrs

from kvpolicy.config import PolicyConfig, QuantSpec, TensorSpec
from kvpolicy.policy.registry import Registry, get_registry, parameter_names


def _default(field: attrs.Attribute) -> str:
    if field.default is attrs.NOTHING:
        return "required"
    if isinstance(field.default, attrs.Factory):
        return "see below"
    shown = field.default.to_data() if hasattr(field.default, "to_data") else field.default
    return f"`{shown!r}`"


def _table(cls: type) -> list[str]:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for field in attrs.fields(cls):
        if field.name.startswith("_") or not field.init:
            continue
        rows.append(f"| `{field.name}` | {_default(field)} | {field.metadata.get('doc', '')} |")
    return rows


def yaml_reference(registry: Registry | None = None) -> str:
    """Markdown tables of every YAML key, built from the attrs classes and registered selectors."""
    registry = registry or get_registry()
    out = ["## Policy (top level)", "", *_table(PolicyConfig), ""]
    out += ["## `keys` / `values`", "", *_table(TensorSpec), ""]
    out += ["## `quant`", "", *_table(QuantSpec), ""]
    out += ["## Quantizer backends (`quant.backend`)", ""]
    for name in registry.names("quantizer"):
        cls = registry.quantizer(name)
        doc = inspect.getdoc(type(cls)).splitlines()[0] if inspect.getdoc(type(cls)) else ""
        plugin = registry.provider("quantizer", name)
        bits = ", ".join(map(str, cls.supported_bits))
        out += [f"### `backend: {name}`", "", f"{doc} Bits: {bits}. (plugin: `{plugin}`)", ""]
        if cls.options:
            out += ["| `options` key | default | accepted | meaning |", "|---|---|---|---|"]
            out += [f"| `{k}` | `{o.default!r}` | {o.allowed} | {o.doc} |" for k, o in cls.options.items()]
            out += [""]
        else:
            out += ["No options.", ""]
    out += ["## Selectors (`retain` entries)", ""]
    for name in registry.names("selector"):
        cls = registry.selector_class(name)
        doc = inspect.getdoc(cls).splitlines()[0] if inspect.getdoc(cls) else ""
        plugin = registry.provider("selector", name)
        out += [f"### `type: {name}`", "", f"{doc} (plugin: `{plugin}`)", ""]
        if attrs.has(cls) and any(f.init and not f.name.startswith("_") for f in attrs.fields(cls)):
            out += _table(cls) + [""]
        else:
            out += ["No parameters.", ""]
    out += ["## Executors (`executor`)", "", "A name, or a mapping with `type` and the executor's parameters.", ""]
    for name in registry.names("executor"):
        cls = registry.executor_class(name)
        doc = inspect.getdoc(cls).splitlines()[0] if inspect.getdoc(cls) else ""
        plugin = registry.provider("executor", name)
        out += [f"### `type: {name}`", "", f"{doc} (plugin: `{plugin}`)", ""]
        out += (_table(cls) + [""]) if parameter_names(cls) else ["No parameters.", ""]
    return "\n".join(out)


def write_retention_pictures(folder: str | Path, steps: int = 400, registry: Registry | None = None) -> list[Path]:
    """One PNG per registered policy, named ``retention-<policy>.png``."""
    from kvpolicy.policy import Policy
    from kvpolicy.tools.retention import plot_retention

    registry = registry or get_registry()
    paths = []
    for name in registry.names("policy"):
        policy = Policy(registry.policy_config(name), registry)
        paths.append(plot_retention(policy, Path(folder) / f"retention-{name}.png", steps=steps))
    return paths
