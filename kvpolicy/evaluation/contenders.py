"""What an evaluation compares: caches built by kvpolicy policies or by transformers itself.

A :class:`Contender` makes a fresh cache for a model and says how many bytes a cache holds.
``hf_quantized`` is transformers' own ``QuantizedCache`` with the quanto backend, used as
shipped (its defaults except ``nbits`` and ``residual_length``, which follow the run's bits
and budget, else 2 bits and its own 128); ``hf_quantized_int2`` and ``hf_quantized_int4`` name
the bits themselves, so both widths can be compared in one run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import attrs
import torch
from transformers.cache_utils import Cache, DynamicCache, QuantizedCache

from kvpolicy.cache.policy_cache import KVPolicyCache
from kvpolicy.errors import ConfigError, MissingDependencyError
from kvpolicy.evaluation.matching import at_budget
from kvpolicy.policy import Policy

#: the name under which transformers' QuantizedCache (quanto backend) is evaluated
HF_QUANTIZED = "hf_quantized"
#: ``hf_quantized`` at a named width: ``hf_quantized_int2``, ``hf_quantized_int4``
HF_QUANTIZED_WIDTHS = {f"{HF_QUANTIZED}_int{bits}": bits for bits in (2, 4)}


@attrs.frozen
class Contender:
    """A named way of building a cache. ``policy`` is set for kvpolicy contenders."""

    name: str
    make_cache: Callable[[torch.nn.Module], Cache]
    policy: Policy | None = None
    budget: int | None = None
    bits: int | None = None
    #: why this contender cannot serve a model (``None``: it can)
    refuses: Callable[[torch.nn.Module], str | None] = lambda model: None


def policy_contender(
    policy: Policy, budget: int | None = None, bits: int | None = None, cuda_graphs: bool | str = "auto"
) -> Contender:
    """``policy.make_cache(model, cuda_graphs=cuda_graphs)`` under the policy's name."""

    def refuses(model: torch.nn.Module) -> str | None:
        """A policy whose settings this model cannot take (a bit budget below its own bits
        after ``--bits``): the error, so the run skips it and goes on."""
        from kvpolicy.cache.layers import model_layers, model_name

        try:
            policy.for_model(model_layers(model), model_name(model))
        except ConfigError as err:
            return str(err)
        return None

    def make(model: torch.nn.Module) -> Cache:
        return policy.make_cache(model, cuda_graphs=cuda_graphs)

    return Contender(policy.name, make, policy, budget, bits, refuses)


def hf_quantized_contender(bits: int = 2, residual_length: int = 128, name: str = HF_QUANTIZED) -> Contender:
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        raise MissingDependencyError(f"contender {HF_QUANTIZED!r}", "optimum-quanto", "quanto") from None

    def make(model: torch.nn.Module) -> Cache:
        return QuantizedCache(backend="quanto", config=model.config, nbits=bits, residual_length=residual_length)

    def refuses(model: torch.nn.Module) -> str | None:
        from kvpolicy.cache.layers import layer_types

        other = sorted(set(layer_types(model.config)) - {"full_attention"})
        if other:
            return f"transformers' QuantizedCache serves full-attention models only (this one has {other})"
        return None

    return Contender(name, make, None, residual_length, bits, refuses)


def resolve_contenders(
    names: list[str], budget: int | None = None, bits: int | None = None, cuda_graphs: bool | str = "auto"
) -> list[Contender]:
    """Contenders for registered policy names, YAML paths and ``hf_quantized``; with ``budget``
    every policy is matched to that many full-precision tokens (see :func:`at_budget`);
    ``cuda_graphs``: what each policy's ``make_cache`` is given."""
    out = []
    for name in names:
        if name == HF_QUANTIZED:
            if bits not in (None, 0, 2, 4):
                raise ConfigError("--bits", bits, f"2 or 4 for {HF_QUANTIZED} (transformers' QuantizedCache, quanto)")
            out.append(hf_quantized_contender(bits or 2, budget or 128))
            continue
        if name in HF_QUANTIZED_WIDTHS:
            out.append(hf_quantized_contender(HF_QUANTIZED_WIDTHS[name], budget or 128, name))
            continue
        policy = Policy.load(name)
        if budget is not None or bits is not None:
            config = policy.config
            config = at_budget(config, budget, bits) if budget is not None else _with_bits(config, bits)
            policy = Policy(config, policy.registry)
        if Path(str(name)).suffix in (".yaml", ".yml"):
            policy.config = attrs.evolve(policy.config, name=Path(name).stem)
        out.append(policy_contender(policy, budget, bits, cuda_graphs))
    return out


def _with_bits(config, bits):
    keys = attrs.evolve(config.keys, quant=attrs.evolve(config.keys.quant, bits=bits))
    values = attrs.evolve(config.values, quant=attrs.evolve(config.values.quant, bits=bits))
    return attrs.evolve(config, keys=keys, values=values)


def _leaf_bytes(t) -> int:
    if t is None or not isinstance(t, torch.Tensor):
        return 0
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_leaf_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def cache_nbytes(cache: Cache) -> int:
    """Bytes of key/value data a cache holds (packed codes, scales, full-precision tokens, positions)."""
    if isinstance(cache, KVPolicyCache):
        return cache.memory().total_bytes
    total = 0
    for layer in cache.layers:
        for attr in ("keys", "values", "_quantized_keys", "_quantized_values"):
            total += _leaf_bytes(getattr(layer, attr, None))
    return total


def held_ratio(cache: Cache, model: torch.nn.Module) -> float:
    """KV bytes ``cache`` holds against a ``DynamicCache`` holding the same tokens in the same dtype."""
    if isinstance(cache, KVPolicyCache):
        report = cache.memory()
        return report.total_bytes / report.dynamic_cache_bytes if report.dynamic_cache_bytes else 0.0
    from kvpolicy.cache.layers import model_layers

    layers = [layer for layer in cache.layers if layer.is_initialized]
    if not layers:
        return 0.0
    specs = model_layers(model)
    batch, element_size = layers[0]._quantized_keys.shape[0], next(model.parameters()).element_size()
    tokens = cache.get_seq_length()
    base = sum(s.kv_heads * (s.head_dim + (s.value_head_dim or s.head_dim)) for s in specs[: len(layers)])
    return cache_nbytes(cache) / (base * batch * tokens * element_size)


def bits_per_element(contender: Contender, model: torch.nn.Module) -> float:
    """Bits per quantized element on ``model``, scales and zero-points included: the mean over
    the layers a policy serves (:func:`~kvpolicy.policy.layer_budget.mean_bits`; 16 for ``full``,
    0 for evicted tokens), or what ``QuantizedCache`` stores per element of a 256-token prefill."""
    if contender.policy is not None:
        from kvpolicy.cache.layers import model_layers, model_name
        from kvpolicy.policy.layer_budget import mean_bits, served_layers

        specs = model_layers(model)
        settled = contender.policy.for_model(specs, model_name(model))
        served = served_layers(settled, specs, model_name(model))
        if not served:
            return 16.0
        return mean_bits({s.index: settled.for_layer(s.index, s.num_layers) for s in served}, served)
    from kvpolicy.cache.policy_cache import attention_layout

    _, kv_heads, head_dim = attention_layout(model)
    cache = contender.make_cache(model)
    keys = torch.randn(1, kv_heads, 256, head_dim, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    cache.update(keys, keys.clone(), 0)
    layer = cache.layers[0]
    return 8 * (_leaf_bytes(layer._quantized_keys) + _leaf_bytes(layer._quantized_values)) / (2 * keys.numel())


def replay_nbytes(contender: Contender, model: torch.nn.Module, prefill: int, steps: int, dtype=torch.bfloat16) -> dict:
    """Bytes the contender's cache holds after a prefill of ``prefill`` tokens and ``steps``
    single-token updates with ``dtype`` keys/values (what a 16-bit deployment holds),
    next to a 16-bit ``DynamicCache`` after the same updates."""
    from kvpolicy.cache.policy_cache import attention_layout

    num_layers, kv_heads, head_dim = attention_layout(model)
    cache = contender.make_cache(model)
    baseline = DynamicCache(config=model.config)  # sliding-window layers hold their window
    g = torch.Generator().manual_seed(0)
    for length in [prefill] + [1] * steps:
        for layer in range(num_layers):
            k = torch.randn(1, kv_heads, length, head_dim, generator=g).to(dtype)
            v = torch.randn(1, kv_heads, length, head_dim, generator=g).to(dtype)
            cache.update(k, v, layer)
            baseline.update(k, v, layer)
    held, base = cache_nbytes(cache), cache_nbytes(baseline)
    return {"kv_bytes": held, "baseline_16bit_bytes": base, "kv_ratio": held / base}
