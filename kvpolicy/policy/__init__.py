"""Policies: a named composition of selectors, key/value quantizer specs and an executor.

``Policy`` resolves the names in a :class:`~kvpolicy.config.PolicyConfig` against the
registry and builds caches from it::

    policy = Policy.load("logquant")            # a registered name or a YAML path
    cache = policy.make_cache(model)            # a transformers Cache
    model.generate(**inputs, cache=cache)       # past_key_values= on older transformers
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from kvpolicy.config import PolicyConfig, QuantSpec, SelectorSpec, TensorSpec
from kvpolicy.errors import ConfigError
from kvpolicy.policy.registry import Registry, get_registry
from kvpolicy.selectors import Selector, UnionSelector
from kvpolicy.store import TensorStore

if TYPE_CHECKING:  # the cache and the attention bridge import transformers: loaded on use
    from kvpolicy.cache.policy_cache import KVPolicyCache, KVPolicyLayer

#: tokens packed at a time when no side needs per-channel groups (amortizes packing)
DEFAULT_BLOCK = 32


class Policy:
    """A validated policy bound to a registry."""

    def __init__(self, config: PolicyConfig, registry: Registry | None = None, section: str = ""):
        self.config = config
        self.registry = registry or get_registry()
        #: where this policy sits in its file, for error messages (``layers[0].`` for an override)
        self.section = section
        # resolve every name now, so a typo fails at load time, not mid-generation
        for side, spec in (("keys", config.keys), ("values", config.values)):
            if self._selector(spec, side).budget is not None and spec.demote == "quantize":
                self.registry.quantizer(spec.quant.backend).check(spec.quant, f"{section}{side}.quant")
        self.registry.executor(config.executor)
        # the policy on the layers each `layers` entry names (checked like this one)
        self.overrides = [
            Policy(config.for_override(i), self.registry, f"layers[{i}].") for i in range(len(config.layers))
        ]
        factories = self.registry.layer_factories()
        for layer_type, factory in config.layer_types.items():
            if factory not in factories:
                raise ConfigError(
                    f"layer_types.{layer_type}", factory, f"a registered layer factory: {', '.join(factories)}"
                )
            if layer_type not in factories[factory].serves:
                raise ConfigError(
                    f"layer_types.{layer_type}",
                    factory,
                    f"a factory serving {layer_type!r}: "
                    + (", ".join(n for n, f in factories.items() if layer_type in f.serves) or "none is registered"),
                )

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, registry: Registry | None = None) -> Policy:
        return cls(PolicyConfig.from_dict(data), registry)

    @classmethod
    def from_yaml(cls, source: str | Path, registry: Registry | None = None) -> Policy:
        return cls(PolicyConfig.from_yaml(source), registry)

    @classmethod
    def load(cls, name_or_path: str | Path, registry: Registry | None = None) -> Policy:
        """A registered policy name (``"logquant"``) or a path to a YAML file."""
        registry = registry or get_registry()
        text = str(name_or_path)
        path = Path(text)
        if path.suffix.lower() in (".yaml", ".yml"):
            return cls.from_yaml(path, registry)
        if text not in registry.names("policy") and (path.suffix or "/" in text or path.exists()):
            raise ConfigError(
                "policy",
                text,
                "a registered policy name (`kvpolicy list`) or a path to a .yaml/.yml file; "
                + ("a directory is not a policy" if path.is_dir() else "a file with another extension is not read"),
            )
        return cls(registry.policy_config(text), registry)

    def to_dict(self) -> dict:
        return self.config.to_dict()

    def to_yaml(self) -> str:
        return self.config.to_yaml()

    @property
    def name(self) -> str:
        return self.config.name

    def __repr__(self) -> str:
        return f"Policy({self.name!r})"

    # -- building ---------------------------------------------------------------------
    def _selector(self, spec: TensorSpec, section: str) -> Selector:
        members = [self._one_selector(s, f"{self.section}{section}.retain[{i}]") for i, s in enumerate(spec.retain)]
        return members[0] if len(members) == 1 else UnionSelector(members)

    def _one_selector(self, spec: SelectorSpec, section: str) -> Selector:
        cls = self.registry.selector_class(spec.type)
        try:
            return cls(**spec.params)
        except TypeError as err:
            raise ConfigError(
                section, spec.to_dict(), f"parameters accepted by selector {spec.type!r} ({err})"
            ) from None
        except ConfigError as err:
            raise ConfigError(f"{section}.{err.field.split('.')[-1]}", err.value, err.allowed) from None

    def executor_summary(self, device: str | None = None) -> str:
        """What the configured executor runs on ``device`` (default: CUDA if present, else CPU)."""
        spec = self.config.executor
        resolves = getattr(self.registry.executor_class(spec.type), "resolves_to", None)
        described = spec.type if not spec.params else f"{spec.type} {spec.params}"
        return f"{described}: {resolves(device)}" if resolves else described

    def decode_summary(self, device: str | None = None) -> str:
        """How ``make_cache(model)`` decodes on ``device`` (default: CUDA if present, else CPU):
        from CUDA graphs or eagerly, and why (checked on a 128-channel layer of the policy,
        :mod:`kvpolicy.graphs.capability`)."""
        import torch

        from kvpolicy.graphs.capability import setting_refusal, stores_refusal

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device != "cuda":
            return "eager (CUDA graphs need a CUDA device)"
        refusal = setting_refusal(self)
        if refusal is None:
            keys, values = self._store(self.config.keys, "keys", 128), self._store(self.config.values, "values", 128)
            refusal = stores_refusal(self.name, keys, values, None)
        if refusal is not None:
            return f"eager ({refusal})"
        return "replayed from a CUDA graph where every layer of the model is full attention, else eager"

    def budget(self) -> dict[str, int | None]:
        """Most full-precision tokens per layer for keys and values (``None``: unbounded)."""
        return {
            "keys": self._selector(self.config.keys, "keys").budget,
            "values": self._selector(self.config.values, "values").budget,
        }

    def demote_block(self) -> int:
        """Tokens packed at a time, shared by keys and values: the per-channel group sizes' lcm
        (or ``DEFAULT_BLOCK`` when neither side groups along tokens)."""
        groups = [
            s.quant.group_size
            for s, section in ((self.config.keys, "keys"), (self.config.values, "values"))
            if s.demote == "quantize" and s.quant.axis == "channel" and self._selector(s, section).budget is not None
        ]
        return math.lcm(*groups) if groups else DEFAULT_BLOCK

    def memory_bound(
        self,
        tokens: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        element_size: int = 2,
        value_head_dim: int | None = None,
    ) -> int:
        """Most bytes one layer's stores can hold after ``tokens`` tokens (native backend);
        ``value_head_dim`` defaults to ``head_dim``.

        Full-precision tokens up to the selector's budget, a staging buffer below one
        packing block, every remaining token packed (codes plus scales and zeros), and 4
        bytes of position per held token. Growth beyond this bound is a leak.
        """
        budgets = self.budget()
        total = 0
        sides = (
            (self.config.keys, budgets["keys"], head_dim),
            (self.config.values, budgets["values"], value_head_dim or head_dim),
        )
        for spec, budget, dim in sides:
            per_token = batch * kv_heads * dim * element_size
            fp = tokens if budget is None else min(tokens, budget)
            total += fp * (per_token + 4)
            if spec.demote != "quantize":
                continue
            staged = min(tokens, self.demote_block() - 1)
            total += staged * (per_token + 4)
            quant = spec.quant
            codes = batch * kv_heads * dim * quant.bits / 8
            if quant.axis == "token":
                scales = 2 * batch * kv_heads * (dim // quant.group_for(dim)) * element_size
            else:
                scales = 2 * batch * kv_heads * dim * element_size / quant.group_size
            total += int(tokens * (codes + scales + 4))
        return total

    def _store(self, spec: TensorSpec, section: str, head_dim: int, unrotated_by_auto: bool = False) -> TensorStore:
        selector = self._selector(spec, section)
        backend = None
        quant = layer_quant(spec.quant, head_dim, unrotated_by_auto)
        if spec.demote == "quantize" and selector.budget is not None:  # a side that never demotes needs none
            backend = self.registry.quantizer(quant.backend)
            backend.validate(quant, head_dim, f"{self.section}{section}.quant")
        return TensorStore(selector, spec.demote, quant, backend, self.demote_block())

    def for_model(self, specs, model_name: str = "this model") -> Policy:
        """This policy on a model of ``specs`` (:class:`~kvpolicy.cache.layers.LayerSpec` per decoder
        layer): itself, or, where a ``layers`` entry picks its layers by a bit budget, a policy
        naming the layers it takes (:func:`~kvpolicy.policy.layer_budget.settle_layers`)."""
        from kvpolicy.policy.layer_budget import settle_layers

        return settle_layers(self, specs, model_name)

    def for_layer(self, layer: int, num_layers: int) -> Policy:
        """The policy on decoder layer ``layer`` of ``num_layers``: this one, or the one its
        ``layers`` section gives that layer."""
        if self.config.budgeted:  # its budgeted entries' layers are not known before the model is
            raise ConfigError(
                "layers",
                [o.to_dict()["at"] for o in self.config.layers],
                "layer indices here: a policy with a bit-budgeted entry is settled for a model first "
                "(policy.for_model(kvpolicy.cache.layers.model_layers(model)); make_cache does it)",
            )
        override = self.config.override_of(layer, num_layers)
        return self if override is None else self.overrides[override]

    def new_layer(
        self,
        head_dim: int,
        model_config=None,
        value_head_dim: int | None = None,
        normalized_keys: bool = False,
        biased_keys: bool = False,
    ) -> KVPolicyLayer:
        """One layer's cache (fresh selectors and stores: nothing shared with other layers).

        ``head_dim``: the keys' head size; ``value_head_dim``: the values' (default: the same);
        ``normalized_keys``: whether the layer normalizes keys per head (QK-norm), which
        ``rotate: auto`` leaves unrotated on both sides; ``biased_keys``: whether its key
        projection adds a bias, which ``rotate: auto`` leaves the keys unrotated for.
        """
        from kvpolicy.cache.policy_cache import KVPolicyLayer

        return KVPolicyLayer(
            key_store=self._store(
                self.config.keys, "keys", head_dim, auto_leaves_unrotated("keys", normalized_keys, biased_keys)
            ),
            value_store=self._store(
                self.config.values,
                "values",
                value_head_dim or head_dim,
                auto_leaves_unrotated("values", normalized_keys, biased_keys),
            ),
            executor=self.registry.executor(self.config.executor),
            config=model_config,
        )

    def graphs_serve(self, model, specs=None, max_cache_len: int | None = None) -> bool:
        """Whether ``make_cache(model)`` decodes from CUDA graphs (``cuda_graphs="auto"``): the
        model on one CUDA device outside tensor parallelism, the policy's executor ``auto``,
        Triton present, and a policy and model the replayed step serves."""
        from kvpolicy.cache.layers import model_layers
        from kvpolicy.graphs.capability import auto_refusal, serving_refusal

        if auto_refusal(self, model) is not None:
            return False
        specs = specs or model_layers(model)
        return serving_refusal(self.for_model(specs), model, specs, max_cache_len) is None

    def build_layers(self, model, specs) -> list:
        """One cache layer per decoder layer in ``specs`` (:func:`~kvpolicy.cache.layers.model_layers`),
        built by the layer factory serving its type: what an eager cache holds, and what a
        CUDA-graph cache gives its buffers (:mod:`kvpolicy.graphs.static_cache`)."""
        from kvpolicy.cache.layers import factory_for, model_name

        factories = self.registry.layer_factories()
        name = model_name(model)
        builders = {s.type: factory_for(s.type, self.config.layer_types, factories, name) for s in specs}
        self.config.check_layer_indices(len(specs))  # before the model is touched
        return [builders[s.type].build(self.for_layer(s.index, s.num_layers), s, model.config) for s in specs]

    def make_cache(self, model, cuda_graphs: bool | str = "auto", max_cache_len: int | None = None) -> KVPolicyCache:
        """A transformers ``Cache`` for ``model``; switches the model to ``"kvpolicy"`` attention.

        One layer per decoder layer, built by the layer factory serving its type (the policy's
        layer for full attention, a full-precision window for sliding-window layers).

        The ``"kvpolicy"`` attention behaves exactly like SDPA for any other cache, so the
        model keeps working with a plain ``DynamicCache`` afterwards.

        ``cuda_graphs``: whether decode steps are replayed from a CUDA graph, on layers whose
        buffers are allocated once (:mod:`kvpolicy.graphs.cuda_graphs`). ``"auto"`` (the default):
        where the model sits on one CUDA device, the policy's executor is ``auto`` and the
        replayed step serves the policy and the model (:mod:`kvpolicy.graphs.capability`);
        a call it does not serve (a padded batch, beam search) then runs eagerly. ``True``: always,
        refusing what it does not serve (on a CPU the same steps run eagerly, for tests).
        ``False``: never. ``max_cache_len``: the most tokens the graph path holds (the prompt plus
        the new tokens); ``None``: its buffers grow as decoding fills them.
        """
        from kvpolicy.cache import attention
        from kvpolicy.cache.layers import model_layers, model_name
        from kvpolicy.cache.policy_cache import KVPolicyCache

        if not (cuda_graphs is True or cuda_graphs is False or cuda_graphs == "auto"):
            raise ConfigError("cuda_graphs", cuda_graphs, "True, False or 'auto'")
        if max_cache_len is not None and (type(max_cache_len) is not int or max_cache_len < 1):
            raise ConfigError(
                "max_cache_len", max_cache_len, "a positive number of tokens (the prompt plus the new tokens) or None"
            )
        specs = model_layers(model)
        name = model_name(model)
        if self.config.budgeted:  # the layers its budgeted entries take on this model, named
            return self.for_model(specs, name).make_cache(model, cuda_graphs, max_cache_len)
        from kvpolicy.graphs.capability import auto_refusal

        if cuda_graphs == "auto" and auto_refusal(self, model) is not None:
            cuda_graphs = False
        layers = self.build_layers(model, specs)
        if cuda_graphs:
            from kvpolicy.errors import NotSupportedError
            from kvpolicy.graphs.static_cache import build_static_cache

            try:
                return build_static_cache(self, model, specs, layers, max_cache_len, fallback=cuda_graphs == "auto")
            except NotSupportedError:
                if cuda_graphs is True:
                    raise  # "auto": a policy or model the replayed step does not serve decodes eagerly
        attention.attach(model)
        if all(s.type in ("sliding_attention", "chunked_attention") for s in specs) and not self.config.layer_types:
            warnings.warn(
                f"every layer of {name} is a sliding-window or chunked layer (window {specs[0].window}): "
                f"policy {self.name!r} applies to full-attention layers, so this cache holds what DynamicCache "
                "holds, each layer's window in full precision",
                UserWarning,
                stacklevel=2,
            )
        return KVPolicyCache(layers, policy_name=self.name)


def auto_leaves_unrotated(side: str, normalized_keys: bool, biased_keys: bool) -> bool:
    """Whether ``rotate: auto`` leaves ``side`` (``keys`` or ``values``) of a layer unrotated:
    both sides where the layer normalizes keys per head (QK-norm), the keys where its key
    projection adds a bias (see :func:`layer_quant`)."""
    return normalized_keys or (side == "keys" and biased_keys)


def layer_quant(quant: QuantSpec, head_dim: int, unrotated_by_auto: bool = False) -> QuantSpec:
    """``quant`` on one side of one layer: ``group_size: head`` as ``head_dim`` and ``rotate:
    auto`` as ``none`` where ``unrotated_by_auto`` or ``head_dim`` is not a power of two, else
    ``hadamard``. The caller sets ``unrotated_by_auto`` where a few channels carry the side's
    variation and per-channel groups isolate them, which a rotation would spread over every
    channel: keys normalized per head (QK-norm; rotated, 4-6x kivi's error on Gemma 3) or
    projected with a bias that RoPE turns (Qwen2; rotated, 2-14x the teacher-forced KL of
    unrotated keys on Qwen2.5-Coder-0.5B)."""
    from kvpolicy.quantizers.rotation import power_of_two

    changes: dict = {}
    if quant.group_size != quant.group_for(head_dim):
        changes["group_size"] = quant.group_for(head_dim)
    if quant.rotate == "auto":
        changes["rotate"] = "hadamard" if power_of_two(head_dim) and not unrotated_by_auto else "none"
    return attrs.evolve(quant, **changes) if changes else quant


def load_policy(name_or_path: str | Path) -> Policy:
    """Shorthand for :meth:`Policy.load`."""
    return Policy.load(name_or_path)
