"""One cache layer per decoder layer type: what a model's layers cache, and who builds each.

transformers names each decoder layer's attention in ``config.layer_types``
(``full_attention``, ``sliding_attention``, ``chunked_attention``, ...) and its
``DynamicCache`` builds a matching layer for each. ``make_cache`` does the same through
:class:`LayerFactory` objects, registered like selectors and executors
(the ``kvpolicy_layers`` hook):

* ``policy`` serves ``full_attention``: the policy's own :class:`~kvpolicy.cache.policy_cache.KVPolicyLayer`.
* ``window`` serves ``sliding_attention`` and ``chunked_attention``: the last ``window``
  tokens in full precision, exactly what transformers' sliding layer holds (a window of 512
  tokens is small next to a long context, and these layers never need older tokens).

A policy may map a layer type to another registered factory that serves it
(``layer_types: {sliding_attention: my_factory}``). A layer type no factory serves is
refused with the model type and the type named, never cached as if it were full attention.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, ClassVar, Protocol

import attrs

from kvpolicy.errors import UnsupportedModelError

if TYPE_CHECKING:
    from transformers.cache_utils import CacheLayerMixin


@attrs.frozen
class LayerSpec:
    """What one decoder layer caches.

    ``type``: transformers' layer type; ``window``: tokens a sliding or chunked layer attends
    (``None`` for full attention); keys are ``[batch, kv_heads, tokens, head_dim]`` and values
    ``[batch, kv_heads, tokens, value_head_dim]`` (the two differ in MiMo V2's attention).
    """

    index: int
    type: str
    kv_heads: int
    head_dim: int
    window: int | None = None
    #: decoder layers in the model (a policy's ``layers`` section counts from both ends)
    num_layers: int = 1
    #: the values' head size (``None``: the keys', ``head_dim``)
    value_head_dim: int | None = None
    #: whether the layer normalizes keys per head before caching them (QK-norm, a ``k_norm``
    #: module: Gemma 3, Qwen 3, OLMo 2), which ``rotate: auto`` leaves unrotated
    normalized_keys: bool = False
    #: whether the layer's key projection adds a learned bias (Qwen2), which RoPE turns into a few
    #: large channels; ``rotate: auto`` leaves such keys unrotated
    biased_keys: bool = False


class LayerPlan(Protocol):
    """What a layer factory is handed for one decoder layer: the policy settled for that layer
    (a :class:`~kvpolicy.policy.Policy`, its ``layers`` section applied), which builds the
    policy's own cache layer."""

    def new_layer(
        self,
        head_dim: int,
        model_config=None,
        value_head_dim: int | None = None,
        normalized_keys: bool = False,
        biased_keys: bool = False,
    ) -> CacheLayerMixin: ...


class LayerFactory:
    """Builds the cache layer of a decoder layer whose type is in :attr:`serves`, from the
    layer's plan (:class:`LayerPlan`) and what the layer caches (:class:`LayerSpec`)."""

    #: the name a policy's ``layer_types`` section uses for this factory
    name: ClassVar[str] = ""
    #: transformers layer types this factory can cache exactly
    serves: ClassVar[tuple[str, ...]] = ()

    def build(self, plan: LayerPlan, spec: LayerSpec, model_config=None) -> CacheLayerMixin:
        raise NotImplementedError


class PolicyLayers(LayerFactory):
    """Full-attention layers: the policy's selectors, quantizers and executor (its ``layers``
    section's settings on the layers it names)."""

    name = "policy"
    serves = ("full_attention",)

    def build(self, plan: LayerPlan, spec: LayerSpec, model_config=None) -> CacheLayerMixin:
        return plan.new_layer(
            spec.head_dim,
            model_config,
            value_head_dim=spec.value_head_dim,
            normalized_keys=spec.normalized_keys,
            biased_keys=spec.biased_keys,
        )


class WindowLayers(LayerFactory):
    """Sliding-window and chunked layers: the last ``window`` tokens in full precision."""

    name = "window"
    serves = ("sliding_attention", "chunked_attention")

    def build(self, plan: LayerPlan, spec: LayerSpec, model_config=None) -> CacheLayerMixin:
        from kvpolicy.cache.sliding import SlidingWindowLayer

        return SlidingWindowLayer(spec.window)


BUILTIN_LAYER_FACTORIES = (PolicyLayers, WindowLayers)


def text_config(model_config):
    """The decoder's config (a multimodal config's text part)."""
    get_text = getattr(model_config, "get_text_config", None)
    return get_text(decoder=True) if get_text else model_config


def layer_types(model_config) -> list[str]:
    """transformers' layer type of every decoder layer: ``config.layer_types``, else what
    its ``sliding_window`` / ``attention_chunk_size`` imply (as ``DynamicCache`` infers them)."""
    text = text_config(model_config)
    types = getattr(text, "layer_types", None)
    if types:
        return list(types)
    if getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True):
        kind = "sliding_attention"
    elif getattr(text, "attention_chunk_size", None) is not None:
        kind = "chunked_attention"
    else:
        kind = "full_attention"
    return [kind] * text.num_hidden_layers


def model_name(model) -> str:
    """``ClassName (model_type)``, how refusals name a model."""
    return f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')})"


#: a decoder layer's key norm under the names transformers gives it (``model.layers.5.self_attn.k_norm``;
#: ``k_layernorm`` in StableLM and Persimmon, ``key_layernorm`` in HunYuan), the layer index first
_KEY_NORM = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.[^.]+\.(?:k_norm|k_layernorm|key_layernorm|key_norm)$")


#: a decoder layer's key projection (``model.layers.5.self_attn.k_proj``), the layer index first
_KEY_PROJECTION = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.[^.]+\.(?:k_proj|key_proj|wk)$")


def _layers_owning(model, pattern: re.Pattern, holds=lambda module: True) -> set[int]:
    """Indices of the decoder layers owning a module named as ``pattern`` says (the layer index
    its first group) for which ``holds(module)``."""
    named = getattr(model, "named_modules", None)
    if named is None:
        return set()
    return {int(m.group(1)) for name, module in named() if (m := pattern.search(name)) and holds(module)}


def normalized_key_layers(model) -> set[int]:
    """Indices of the decoder layers that normalize keys per head (own a key-norm module)."""
    return _layers_owning(model, _KEY_NORM)


def biased_key_layers(model) -> set[int]:
    """Indices of the decoder layers whose key projection adds a bias (Qwen2's ``k_proj``)."""
    return _layers_owning(model, _KEY_PROJECTION, lambda module: getattr(module, "bias", None) is not None)


def model_layers(model) -> list[LayerSpec]:
    """One :class:`LayerSpec` per decoder layer of ``model``, or a refusal naming what is not
    served (cross-attention, latent attention, layers sharing another's cache)."""
    from transformers import PretrainedConfig

    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise UnsupportedModelError(
            f"expected a transformers model (a module with a transformers config, as from_pretrained returns), got "
            f"{type(model).__name__}{' with config ' + type(config).__name__ if config is not None else ''}"
        )
    text = text_config(config)
    name = model_name(model)
    if getattr(config, "is_encoder_decoder", False) or getattr(text, "add_cross_attention", False):
        raise UnsupportedModelError(
            f"{name} uses cross-attention (encoder-decoder): its cache holds the encoder's keys and values beside "
            "the decoder's, which a kvpolicy cache does not store; kvpolicy serves decoder-only models"
        )
    cross = getattr(text, "cross_attention_layers", None)
    if cross:
        raise UnsupportedModelError(
            f"{name} has cross-attention layers ({', '.join(map(str, cross))}) among its decoder layers: their cache "
            "holds the image encoder's keys and values, which a kvpolicy cache does not store; kvpolicy serves "
            "models whose every cached layer holds its own tokens' keys and values"
        )
    if getattr(text, "kv_lora_rank", None):
        raise UnsupportedModelError(
            f"{name} uses multi-head latent attention (kv_lora_rank={text.kv_lora_rank}): its cache holds compressed "
            "latents that the model expands into keys and values after the cache, so a kvpolicy cache would never "
            "see what attention reads. kvpolicy serves models whose cache holds per-head keys and values"
        )
    shared = getattr(text, "num_kv_shared_layers", 0) or ("reuse" in (getattr(text, "kv_sharing_modes", None) or ()))
    if shared:
        raise UnsupportedModelError(
            f"{name} shares keys and values across layers (num_kv_shared_layers={shared}): its later layers read "
            "another layer's cache, which a kvpolicy cache does not provide (it would need a layer type that "
            "hands one layer's stored tokens to another)"
        )
    try:
        for attribute in ("num_attention_heads", "num_key_value_heads", "head_dim"):
            getattr(text, attribute, None)
    except RuntimeError as err:  # transformers' heterogeneous configs refuse a global per-layer attribute
        raise UnsupportedModelError(
            f"{name} sets its attention per layer ({str(err).splitlines()[0].split('.')[0]}): kvpolicy builds its "
            "cache from one head size and head count per model"
        ) from None
    try:
        num_layers = text.num_hidden_layers
        num_heads = text.num_attention_heads
    except AttributeError as err:
        raise UnsupportedModelError(
            f"{name} has no attention heads in its config ({err}): recurrent and state-space models keep a state, "
            "not per-token keys and values, so there is nothing for a kvpolicy cache to hold"
        ) from None
    kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    value_head_dim = getattr(text, "v_head_dim", None)  # set where values have their own head size
    types = layer_types(config)
    if len(types) != num_layers:
        raise UnsupportedModelError(
            f"{name} lists {len(types)} layer types for {num_layers} layers; kvpolicy cannot tell which "
            "layer attends how"
        )
    windows = {
        "sliding_attention": getattr(text, "sliding_window", None),
        "chunked_attention": getattr(text, "attention_chunk_size", None),
    }
    specs = []
    normalized = normalized_key_layers(model)
    biased = biased_key_layers(model)
    for index, kind in enumerate(types):
        window = windows.get(kind)
        if kind in windows and not window:
            raise UnsupportedModelError(f"{name}: layer {index} is {kind!r} but the config gives no window size")
        specs.append(
            LayerSpec(
                index,
                kind,
                kv_heads,
                head_dim,
                window,
                num_layers,
                value_head_dim,
                normalized_keys=index in normalized,
                biased_keys=index in biased,
            )
        )
    return specs


def factory_for(layer_type: str, chosen: dict[str, str], factories: dict[str, type], model_name: str) -> LayerFactory:
    """The factory the policy maps ``layer_type`` to (``chosen``), else the first registered
    one serving it; a refusal when none does."""
    if layer_type in chosen:
        return factories[chosen[layer_type]]()
    for cls in factories.values():
        if layer_type in cls.serves:
            return cls()
    served = sorted({t for cls in factories.values() for t in cls.serves})
    raise UnsupportedModelError(
        f"{model_name} has {layer_type!r} layers, which no kvpolicy cache layer serves (served: {', '.join(served)}). "
        "Recurrent, linear-attention and other non-softmax layers keep a state instead of keys and values; a plugin "
        "can add a layer factory for them (the kvpolicy_layers hook)"
    )
