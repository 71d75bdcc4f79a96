"""Policy configuration as data: attrs classes, validated on construction, YAML/dict round-trip.

A policy config says, separately for keys and for values, which tokens stay in full
precision (``retain``: a union of selectors), what happens to the others (``demote``:
``quantize`` or ``evict``) and how they are quantized (``quant``). Names of selectors,
backends and executors are resolved against the registry when the policy is built, so
third-party plugins can be named here like built-ins.

Example (YAML)::

    name: logquant
    keys:
      retain: [{type: log, window: 42}]
      quant: {backend: native, bits: 2, group_size: 64, axis: channel}
    values:
      retain: [{type: log, window: 42}]
      quant: {backend: native, bits: 2, group_size: 64, axis: token}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import yaml

from kvpolicy.errors import ConfigError

DEMOTE_MODES = ("quantize", "evict")
AXES = ("channel", "token")
ROTATIONS = ("none", "hadamard", "auto")
#: ``group_size`` of per-token groups (``axis: token``) covering a token's whole head
WHOLE_HEAD = "head"


def _group_size(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value == WHOLE_HEAD:
        if instance.axis != "token":
            raise ConfigError(
                "quant.group_size", value, "a positive integer (`head` groups a token's channels: axis token only)"
            )
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError("quant.group_size", value, f"a positive integer, or `{WHOLE_HEAD}` with axis token")


def _positive_int(field_name: str):
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(field_name, value, "a positive integer")

    return check


def _one_of(field_name: str, allowed: tuple[str, ...]):
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in allowed:
            raise ConfigError(field_name, value, " | ".join(allowed))

    return check


def _non_empty_str(field_name: str):
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, str) or not value:
            raise ConfigError(field_name, value, "a non-empty string")

    return check


def _reject_unknown_keys(section: str, data: Any, cls: type) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(section, data, "a mapping")
    known = {f.name for f in attrs.fields(cls)}
    unknown = sorted(set(data) - known, key=lambda key: (not isinstance(key, str), str(key)))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}", data[unknown[0]], f"one of the keys {', '.join(sorted(known))}")
    return data


@attrs.frozen
class QuantSpec:
    """How demoted tokens of one tensor (keys or values) are quantized.

    ``axis="channel"``: groups of ``group_size`` run along tokens (one scale per channel
    per group; KIVI keys). ``axis="token"``: groups run along channels (one scale per
    token per group; values).
    """

    backend: str = attrs.field(
        default="native",
        validator=_non_empty_str("quant.backend"),
        metadata={"doc": "registered quantizer backend (`kvpolicy list`)"},
    )
    bits: int = attrs.field(
        default=2, validator=_positive_int("quant.bits"), metadata={"doc": "code width; native: 2, 3, 4 or 8"}
    )
    group_size: int | str = attrs.field(
        default=64,
        validator=_group_size,
        metadata={
            "doc": "elements sharing one scale and zero; must divide head_dim when axis is token, where `head` "
            "makes one group of a token's whole head (head_dim channels, whatever the model's)"
        },
    )
    axis: str = attrs.field(
        default="token",
        validator=_one_of("quant.axis", AXES),
        metadata={"doc": "`channel`: groups run along tokens (keys); `token`: groups run along channels (values)"},
    )
    options: dict = attrs.field(
        factory=dict,
        metadata={"doc": "the backend's own parameters, e.g. `{optimize: false}` for `hqq` (see the backends below)"},
    )
    rotate: str = attrs.field(
        default="none",
        validator=_one_of("quant.rotate", ROTATIONS),
        metadata={
            "doc": "`hadamard`: quantize tokens rotated by an orthonormal randomized Hadamard transform over "
            "head_dim (a power of two), rotated back when read; spreads outlier channels. Decode steps (eager or "
            "replayed from a CUDA graph) read the rotated codes in the fused kernels: the step rotates the query and "
            "rotates the output back. `auto`: `hadamard`, except on layers that normalize keys per head (QK-norm, "
            "e.g. Gemma 3, Qwen 3) or whose head_dim is not a power of two, which stay unrotated, and the keys of "
            "layers whose key projection adds a bias (Qwen2, Qwen2.5), which stay unrotated"
        },
    )

    def group_for(self, head_dim: int) -> int:
        """``group_size`` on a head of ``head_dim`` channels (``head`` resolved)."""
        return head_dim if self.group_size == WHOLE_HEAD else self.group_size

    def bits_per_element(self, head_dim: int, scale_bits: int = 16) -> float:
        """Bits a quantized element costs on a head of ``head_dim``: its code plus its share of
        its group's scale and zero (each ``scale_bits`` wide)."""
        return self.bits + 2 * scale_bits / self.group_for(head_dim)

    @classmethod
    def from_dict(cls, data: dict, section: str = "quant") -> QuantSpec:
        data = _reject_unknown_keys(section, data, cls)
        options = data.get("options", {})
        if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
            raise ConfigError(
                f"{section}.options", options, "a mapping of option name to value, e.g. {optimize: false}"
            )
        try:
            return cls(**data)
        except ConfigError as err:
            raise ConfigError(err.field.replace("quant", section, 1), err.value, err.allowed) from None

    def to_dict(self) -> dict:
        out = attrs.asdict(self)
        if out["rotate"] == "none":  # defaults stay out of written policies
            del out["rotate"]
        if not out["options"]:
            del out["options"]
        return out


@attrs.frozen
class SelectorSpec:
    """A named retention selector and its parameters, e.g. ``{type: window, size: 128}``."""

    type: str = attrs.field(validator=_non_empty_str("retain.type"))
    params: dict = attrs.field(factory=dict)

    @classmethod
    def from_dict(cls, data: Any, section: str = "retain") -> SelectorSpec:
        if not isinstance(data, dict) or "type" not in data:
            raise ConfigError(section, data, "a mapping with a 'type' key, e.g. {type: window, size: 128}")
        params = {k: v for k, v in data.items() if k != "type"}
        return cls(type=data["type"], params=params)

    def to_dict(self) -> dict:
        return {"type": self.type, **self.params}


@attrs.frozen
class ExecutorSpec:
    """The attention executor and its parameters: a name (``fused``) or a mapping
    (``{type: fused, kernel: triton}``); the registered executor validates the parameters."""

    type: str = attrs.field(default="auto", validator=_non_empty_str("executor.type"))
    params: dict = attrs.field(factory=dict)

    @classmethod
    def coerce(cls, data: Any) -> ExecutorSpec:
        """From a name, a mapping with a ``type`` key, or an ``ExecutorSpec``."""
        if isinstance(data, ExecutorSpec):
            return data
        if isinstance(data, str):
            return cls(type=data)
        if isinstance(data, dict) and isinstance(data.get("type"), str):
            return cls(type=data["type"], params={k: v for k, v in data.items() if k != "type"})
        raise ConfigError(
            "executor",
            data,
            "a registered executor name or a mapping with a 'type' key, e.g. {type: fused, kernel: triton}",
        )

    def to_data(self) -> str | dict:
        """The YAML form: the bare name when there are no parameters."""
        return {"type": self.type, **self.params} if self.params else self.type


@attrs.frozen
class TensorSpec:
    """Retention and demotion for one of keys or values."""

    retain: tuple[SelectorSpec, ...] = attrs.field(
        converter=tuple,
        metadata={"doc": "selectors whose union stays in full precision, e.g. `[{type: window, size: 128}]`"},
    )
    demote: str = attrs.field(
        default="quantize",
        validator=_one_of("demote", DEMOTE_MODES),
        metadata={"doc": "what happens to tokens no selector keeps: `quantize` or `evict`"},
    )
    quant: QuantSpec = attrs.field(factory=QuantSpec, metadata={"doc": "how demoted tokens are quantized"})

    @retain.validator
    def _check_retain(self, attribute: attrs.Attribute, value: tuple) -> None:
        if not value:
            raise ConfigError("retain", list(value), "a non-empty list of selectors")

    @classmethod
    def from_dict(cls, data: Any, section: str) -> TensorSpec:
        data = _reject_unknown_keys(section, data, cls)
        retain = data.get("retain")
        if isinstance(retain, dict):
            retain = [retain]
        if not isinstance(retain, list):
            raise ConfigError(f"{section}.retain", retain, "a list of selectors, e.g. [{type: window, size: 128}]")
        selectors = [SelectorSpec.from_dict(s, f"{section}.retain[{i}]") for i, s in enumerate(retain)]
        demote = data.get("demote", "quantize")
        if demote not in DEMOTE_MODES:
            raise ConfigError(f"{section}.demote", demote, " | ".join(DEMOTE_MODES))
        quant = QuantSpec.from_dict(data.get("quant", {}), f"{section}.quant")
        try:
            return cls(retain=selectors, demote=demote, quant=quant)
        except ConfigError as err:  # the validators know the field, not the section
            field = err.field if err.field.startswith(f"{section}.") else f"{section}.{err.field}"
            raise ConfigError(field, err.value, err.allowed) from None

    def to_dict(self) -> dict:
        return {
            "retain": [s.to_dict() for s in self.retain],
            "demote": self.demote,
            "quant": self.quant.to_dict(),
        }


def _merged(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` applied: ``quant`` field by field, every other key replaced."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = {**base.get(key, {}), **value} if key == "quant" and isinstance(value, dict) else value
    return out


#: the key of a ``layers`` entry's ``at`` mapping that fills layers under a bit budget
EARLIEST_WITHIN_BITS = "earliest_within_bits"


@attrs.frozen
class LayerOverride:
    """Keys/values settings for chosen layers, over the policy's own (per-layer precision).

    ``at``: layer indices, negative ones counted from the last layer (``[0, 1, -2, -1]``: the
    first and last two). ``within_bits``: instead of indices (``at: {earliest_within_bits: 3.0}``),
    the earliest layers the policy serves, as many as keep its mean bits per quantized element
    (keys and values, scales and zeros included) at most this; which layers that is depends on
    the model and is settled by ``make_cache`` (:mod:`kvpolicy.policy.layer_budget`).
    ``keys``/``values``: the fields that change, e.g. ``{quant: {bits: 4}}`` or
    ``{retain: [{type: all}]}`` (16-bit); ``quant`` merges field by field, ``retain`` and
    ``demote`` replace."""

    at: tuple[int, ...] = attrs.field(converter=tuple)
    keys: dict = attrs.field(factory=dict)
    values: dict = attrs.field(factory=dict)
    within_bits: float | None = None

    @classmethod
    def from_dict(cls, data: Any, section: str) -> LayerOverride:
        if isinstance(data, dict) and "within_bits" in data:  # a field, written as ``at: {earliest_within_bits: ..}``
            raise ConfigError(f"{section}.within_bits", data["within_bits"], "one of the keys at, keys, values")
        data = _reject_unknown_keys(section, data, cls)
        at, within_bits = data.get("at"), None
        if isinstance(at, dict):
            if set(at) != {EARLIEST_WITHIN_BITS}:
                raise ConfigError(
                    f"{section}.at", at, f"layer indices, or {{{EARLIEST_WITHIN_BITS}: BITS}} (e.g. 3.0, kivi's mean)"
                )
            within_bits = at[EARLIEST_WITHIN_BITS]
            if isinstance(within_bits, bool) or not isinstance(within_bits, (int, float)) or not within_bits > 0:
                raise ConfigError(
                    f"{section}.at.{EARLIEST_WITHIN_BITS}", within_bits, "a positive number of bits per element"
                )
            at = []
        elif isinstance(at, int) and not isinstance(at, bool):
            at = [at]
        elif not isinstance(at, list) or not at or not all(isinstance(i, int) and not isinstance(i, bool) for i in at):
            raise ConfigError(
                f"{section}.at",
                at,
                f"a non-empty list of layer indices, e.g. [0, 1, -2, -1], or {{{EARLIEST_WITHIN_BITS}: BITS}}",
            )
        changes = {}
        for side in ("keys", "values"):
            value = data.get(side, {})
            _reject_unknown_keys(f"{section}.{side}", value, TensorSpec)
            changes[side] = value
        if not changes["keys"] and not changes["values"]:
            raise ConfigError(section, data, "a 'keys' and/or 'values' section saying what changes on these layers")
        return cls(at=at, within_bits=None if within_bits is None else float(within_bits), **changes)

    def to_dict(self) -> dict:
        at = {EARLIEST_WITHIN_BITS: self.within_bits} if self.within_bits is not None else list(self.at)
        out: dict = {"at": at}
        out.update({side: getattr(self, side) for side in ("keys", "values") if getattr(self, side)})
        return out


@attrs.frozen
class PolicyConfig:
    """A complete policy: key and value specs plus the attention executor."""

    name: str = attrs.field(validator=_non_empty_str("name"), metadata={"doc": "the policy's name"})
    keys: TensorSpec = attrs.field(metadata={"doc": "retention and quantization of keys"})
    values: TensorSpec = attrs.field(metadata={"doc": "retention and quantization of values"})
    executor: ExecutorSpec = attrs.field(
        default=ExecutorSpec(),
        converter=ExecutorSpec.coerce,
        metadata={
            "doc": "attention executor: a registered name (`kvpolicy list`) or `{type: NAME, PARAM: VALUE}`; "
            "`auto` takes the fused kernels on CUDA where they serve and the chunked path elsewhere"
        },
    )
    description: str = attrs.field(default="", metadata={"doc": "free text shown by `kvpolicy show`"})
    layer_types: dict = attrs.field(
        factory=dict,
        metadata={
            "doc": "which registered layer factory caches each transformers layer type, e.g. "
            "`{sliding_attention: window}`; unnamed types take the first factory serving them (`policy` for "
            "`full_attention`, `window`, the window in full precision, for `sliding_attention` and "
            "`chunked_attention`)"
        },
    )

    layers: tuple[LayerOverride, ...] = attrs.field(
        default=(),
        converter=tuple,
        metadata={
            "doc": "per-layer precision: a list of `{at: [layer indices], keys: {...}, values: {...}}` whose "
            "fields replace the policy's on those layers (negative indices count from the last layer), e.g. "
            "`[{at: [0, 1, -2, -1], keys: {retain: [{type: all}]}, values: {retain: [{type: all}]}}]` keeps the "
            "first and last two layers in 16-bit"
        },
    )

    def __attrs_post_init__(self) -> None:
        for i in range(len(self.layers)):  # every override must give a valid policy for its layers
            self.for_override(i)
        evicting = [s.demote == "evict" for s in (self.keys, self.values)]
        if any(evicting) and (not all(evicting) or self.keys.retain != self.values.retain):
            raise ConfigError(
                "values.demote",
                self.values.demote,
                "eviction must apply to keys and values alike, with the same retain list "
                "(attention needs both halves of every kept token)",
            )

    @classmethod
    def from_dict(cls, data: Any) -> PolicyConfig:
        data = _reject_unknown_keys("policy", data, cls)
        for required in ("name", "keys", "values"):
            if required not in data:
                raise ConfigError(required, None, f"a '{required}' section is required")
        description = data.get("description", "")
        if not isinstance(description, str):
            raise ConfigError("description", description, "a string")
        layer_types = data.get("layer_types", {})
        if not isinstance(layer_types, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and v for k, v in layer_types.items()
        ):
            raise ConfigError(
                "layer_types", layer_types, "a mapping of layer type to factory name, e.g. {sliding_attention: window}"
            )
        layers = data.get("layers", [])
        if not isinstance(layers, list):
            raise ConfigError("layers", layers, "a list of {at: [...], keys: {...}, values: {...}}")
        return cls(
            name=data["name"],
            keys=TensorSpec.from_dict(data["keys"], "keys"),
            values=TensorSpec.from_dict(data["values"], "values"),
            executor=ExecutorSpec.coerce(data.get("executor", "auto")),
            description=description,
            layer_types=dict(layer_types),
            layers=[LayerOverride.from_dict(item, f"layers[{i}]") for i, item in enumerate(layers)],
        )

    @classmethod
    def from_yaml(cls, source: str | Path) -> PolicyConfig:
        """Load from a YAML file path or a YAML string (safe loader: no Python objects; a key
        given twice in one mapping is an error, not silently the last one)."""
        text = _read_policy_file(Path(source)) if _looks_like_path(source) else str(source)
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
        except yaml.YAMLError as err:
            raise ConfigError("yaml", str(source)[:80], f"valid YAML ({err})") from None
        except RecursionError:
            raise ConfigError("yaml", str(source)[:80], "YAML nested a few levels deep, as a policy is") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        out = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out.update(keys=self.keys.to_dict(), values=self.values.to_dict(), executor=self.executor.to_data())
        if self.layer_types:
            out["layer_types"] = dict(self.layer_types)
        if self.layers:
            out["layers"] = [override.to_dict() for override in self.layers]
        return out

    def for_override(self, index: int) -> PolicyConfig:
        """The policy on the layers of ``layers[index]`` (validated; errors name that override)."""
        override = self.layers[index]
        section = f"layers[{index}]"
        specs = {}
        for side in ("keys", "values"):
            base = getattr(self, side).to_dict()
            try:
                specs[side] = TensorSpec.from_dict(_merged(base, getattr(override, side)), side)
            except ConfigError as err:
                raise ConfigError(f"{section}.{err.field}", err.value, err.allowed) from None
        try:
            return attrs.evolve(self, layers=(), **specs)
        except ConfigError as err:
            raise ConfigError(f"{section}.{err.field}", err.value, err.allowed) from None

    def check_layer_indices(self, num_layers: int) -> None:
        """Raise a :class:`ConfigError` naming the override if a ``layers`` index lies outside a
        model of ``num_layers`` layers."""
        for i, override in enumerate(self.layers):
            for at in override.at:
                if not -num_layers <= at < num_layers:
                    raise ConfigError(
                        f"layers[{i}].at", at, f"a layer index of this model: {-num_layers} .. {num_layers - 1}"
                    )

    def override_of(self, layer: int, num_layers: int) -> int | None:
        """Which entry of ``layers`` applies to ``layer`` of ``num_layers`` (the last one naming
        it), or ``None``. An index outside the model is an error naming the override."""
        self.check_layer_indices(num_layers)
        found = None
        for i, override in enumerate(self.layers):
            if any(at % num_layers == layer for at in override.at):
                found = i
        return found

    @property
    def budgeted(self) -> bool:
        """Whether a ``layers`` entry picks its layers by a bit budget (settled per model)."""
        return any(override.within_bits is not None for override in self.layers)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def policy_files(folder: str | Path) -> list[PolicyConfig]:
    """Every ``*.yaml`` policy in ``folder``, in name order: how the shipped plugins keep their
    policies as data, one file each (``kvpolicy show NAME`` prints one back)."""
    return [PolicyConfig.from_yaml(path) for path in sorted(Path(folder).glob("*.yaml"))]


def _looks_like_path(source: str | Path) -> bool:
    if isinstance(source, Path):
        return True
    return "\n" not in source and Path(source).suffix.lower() in (".yaml", ".yml")


def read_text(path: Path, field: str, kind: str, missing: str | None = None) -> str:
    """The UTF-8 text of ``path``, or a :class:`ConfigError` for ``field`` that names the file and
    the problem (``kind``: what the file should be, e.g. ``"YAML file"``; ``missing``: what to
    say when it does not exist, ``"an existing KIND"`` by default)."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(field, str(path), missing or f"an existing {kind}") from None
    except IsADirectoryError:
        raise ConfigError(field, str(path), f"a {kind} (this is a directory)") from None
    except UnicodeDecodeError as err:
        raise ConfigError(field, str(path), f"a UTF-8 text file ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(field, str(path), f"a readable {kind} ({err.strerror})") from None


def _read_policy_file(path: Path) -> str:
    return read_text(path, "policy file", "YAML file", missing="an existing YAML file or a registered policy name")


#: the largest integer a policy file may hold (no count or size of a cache comes near it)
MAX_INT = 2**53


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (merge keys, ``<<: *anchor``,
    may still be overridden by the mapping's own keys), a key that is not a scalar, and integers
    beyond :data:`MAX_INT`."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                line = key_node.start_mark.line + 1
                raise ConfigError("yaml", f"a {key_node.id} as a key on line {line}", "plain (scalar) keys")
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError("yaml", key, f"each key once per mapping (given again on line {line})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        text = str(node.value)
        if len(text.replace("_", "").lstrip("+-")) > 17:  # before Python converts a 5,000-digit string
            raise ConfigError("yaml", text[:40] + ("..." if len(text) > 40 else ""), f"integers of at most {MAX_INT}")
        value = super().construct_yaml_int(node)
        if abs(value) > MAX_INT:
            raise ConfigError("yaml", value, f"integers of at most {MAX_INT}")
        return value


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)
