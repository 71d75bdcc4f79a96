"""Does the replayed decode step serve this? Each check returns why not, as a sentence a
refusal can quote (``None``: served). :func:`auto_refusal` decides whether
``cuda_graphs="auto"`` tries the graph path (one CUDA device, no tensor parallelism, then
:func:`setting_refusal`: executor ``auto``, Triton installed); :func:`serving_refusal` whether
the step serves a policy on a model (every layer full attention, then :func:`stores_refusal`
of each: stores retained alike or paired, native codes, a budget or a ``max_cache_len``).
``Policy.decode_summary`` asks the settings and a sample layer's stores. A padded batch and
shapes no fused kernel serves are known once decoding starts (``StaticPolicyCache``).
"""

from __future__ import annotations

from collections.abc import Sequence


def setting_refusal(policy) -> str | None:
    """Why ``policy``'s settings keep its decode steps eager whatever the model (``None``: they need not)."""
    from kvpolicy.executors.kernels import triton_available

    if policy.config.executor.type != "auto":
        return f"executor {policy.config.executor.type!r} was chosen; graphs come with 'auto'"
    if not triton_available():
        return "CUDA graphs replay the Triton kernels, and Triton is not installed"
    return None


def auto_refusal(policy, model) -> str | None:
    """Why ``cuda_graphs="auto"`` does not try the graph path for ``policy`` on ``model``: its
    placement (one CUDA device, one rank), then :func:`setting_refusal`."""
    import torch

    from kvpolicy.distributed import rank_and_world

    if not isinstance(model, torch.nn.Module):
        return "the model is not a torch module"
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return "CUDA graphs need a model on one CUDA device"
    if rank_and_world()[1] > 1:
        return "CUDA graphs are not used under tensor parallelism"
    return setting_refusal(policy)


def stores_refusal(policy_name: str, keys, values, max_cache_len: int | None) -> str | None:
    """Why the replayed step cannot serve a layer whose key and value stores are ``keys`` and
    ``values`` (:class:`~kvpolicy.store.TensorStore`)."""
    from kvpolicy.quantizers.native import NativeQuantizer
    from kvpolicy.store import aligned

    if not aligned(keys, values):
        paired = (
            keys.demote == values.demote == "quantize"
            and keys.unbound_selector.budget is not None
            and values.unbound_selector.budget is not None
            and values.spec.axis == "token"
        )
        if not paired:
            return (
                f"policy {policy_name!r} retains keys and values differently and its values are not quantized per "
                "token with a budget on both sides; the replayed step pairs a token's key and value across regions "
                "only for such policies (e.g. partial_logquant)"
            )
    for store, side in ((keys, "keys"), (values, "values")):
        backend = store.backend
        if backend is not None and type(backend) is not NativeQuantizer:
            return (
                f"{side} are quantized by {type(backend).__name__} (backend {store.spec.backend!r}); the replayed "
                "step reads the native backend's codes"
            )
    if keys.unbound_selector.budget is None and max_cache_len is None:
        return f"policy {policy_name!r} keeps every token in full precision, so its ring needs a max_cache_len"
    return None


def serving_refusal(policy, model, specs: Sequence, max_cache_len: int | None, layers=None) -> str | None:
    """Why the replayed step cannot serve ``policy`` (settled for the model) on ``model``, whose
    decoder layers are ``specs``: a layer that is not full attention, then each layer's
    :func:`stores_refusal`. ``layers``: the cache layers of ``specs`` if the caller built them."""
    from kvpolicy.cache.layers import model_name
    from kvpolicy.cache.policy_cache import KVPolicyLayer

    sliding = sorted({s.type for s in specs if s.type != "full_attention"})
    if sliding:
        return (
            f"{model_name(model)} has {', '.join(sliding)} layers, whose cache grows and slides by concatenation; "
            "the replayed step serves models whose every layer is full attention"
        )
    for layer in layers if layers is not None else policy.build_layers(model, specs):
        if not isinstance(layer, KVPolicyLayer):
            kind = type(layer).__name__
            return f"policy {policy.name!r} builds a {kind} layer; the replayed step serves KVPolicyLayer layers"
        refusal = stores_refusal(policy.name, layer.key_store, layer.value_store, max_cache_len)
        if refusal is not None:
            return refusal
    return None
