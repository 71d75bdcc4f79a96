"""How ``generate()`` takes a cache in the installed transformers.

transformers renamed ``generate(past_key_values=...)`` to ``generate(cache=...)`` (the old
name warns and goes in transformers 6); older 5.x releases know only ``past_key_values``.
:func:`cache_kwargs` gives the keyword this installation expects, so our own documented
path never warns::

    out = model.generate(**inputs, **cache_kwargs(policy.make_cache(model)), max_new_tokens=32)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator

import torch

from kvpolicy.errors import NotSupportedError


@functools.cache
def cache_keyword() -> str:
    """``"cache"`` where the installed ``generate()`` takes it, else ``"past_key_values"``."""
    from transformers import GenerationMixin

    try:
        source = inspect.getsource(GenerationMixin.generate)
    except (OSError, TypeError):  # no source shipped: the keyword every 5.x release accepts
        return "past_key_values"
    return "cache" if 'new_name="cache"' in source else "past_key_values"


def cache_kwargs(cache) -> dict:
    """``{keyword: cache}`` for ``model.generate(...)`` (see :func:`cache_keyword`)."""
    return {cache_keyword(): cache}


def forward_cache_kwargs(model, cache) -> dict:
    """``{keyword: cache}`` for a model's own forward (``model(input_ids, **forward_cache_kwargs(model, cache))``):
    ``cache`` where its forward names that parameter, else ``past_key_values``."""
    try:
        parameters = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        parameters = {}
    return {"cache" if "cache" in parameters else "past_key_values": cache}


#: Tokens one prefill forward holds over all rows by default (rows x chunk). For a
#: Llama-3.1-8B-shaped model a forward of 8,192 tokens holds about 0.7 GB of MLP activations in
#: bf16, so the prefill of any batch peaks that little above the weights and the cache.
TOKENS_PER_FORWARD = 8192


def prefill_chunk_size(batch: int, tokens_per_forward: int = TOKENS_PER_FORWARD) -> int:
    """``generate(prefill_chunk_size=...)`` for a batch of ``batch`` prompts: prompt tokens per
    row in each prefill forward, so one forward holds at most ``tokens_per_forward`` tokens
    (at least one token per row).

    ``generate()`` prefills a batch in one forward unless told otherwise, and that forward's
    activations grow with ``batch x prompt length``: with a 2-bit cache the prefill, not the
    cache, then sets the largest batch that fits. With transformers' chunked prefill every
    chunk after the first is a multi-token step over the filled cache, which kvpolicy's
    executors attend a bounded piece at a time, so the prefill of a batch peaks a constant
    above the weights and the cache::

        ids = tokenizer(prompts, return_tensors="pt", padding=True)
        out = model.generate(**ids, **cache_kwargs(policy.make_cache(model)), max_new_tokens=1024,
                             prefill_chunk_size=prefill_chunk_size(ids["input_ids"].shape[0]))

    Later chunks attend the tokens earlier chunks stored, so a policy's quantized tokens are
    read in their stored form (as decode steps read them), not as one forward would see them.
    """
    for name, value in (("batch", batch), ("tokens_per_forward", tokens_per_forward)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"prefill_chunk_size: {name} must be a positive integer, got {value!r}")
    return max(1, tokens_per_forward // batch)


def prefill_rows(length: int, tokens_per_forward: int = TOKENS_PER_FORWARD) -> int:
    """Rows each forward of :func:`prefill` takes for prompts of ``length`` tokens (it prefills
    ``length - 1`` of them): as many as ``tokens_per_forward`` holds, one at the least."""
    return max(1, tokens_per_forward // max(1, length - 1))


def prefill(
    model,
    new_cache: Callable[[], object],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    tokens_per_forward: int = TOKENS_PER_FORWARD,
    progress: bool = False,
):
    """A cache holding all but the last token of each prompt of ``input_ids`` ``[B, T]``,
    prefilled a group of whole rows per forward (``tokens_per_forward // (T - 1)`` rows, one at
    the least), then joined row-wise; ``generate()`` goes on from it with the full prompt::

        cache = prefill(model, lambda: policy.make_cache(model), ids["input_ids"])
        out = model.generate(**ids, **cache_kwargs(cache), max_new_tokens=1024)

    Each forward is a first prefill of its rows, attended in full precision as in one
    ``generate()`` call (unlike a chunked prefill, whose later chunks read the tokens already
    quantized), so the prefill runs as fast as a plain one while its activations stay those of
    ``tokens_per_forward`` tokens: the largest batch is then set by the cache, which grows by one
    group's tokens at a time. The last prompt token is ``generate()``'s first step.

    ``new_cache``: makes an empty cache of the kind to fill (``policy.make_cache(model)``,
    ``DynamicCache(config=model.config)``), one per group; the first one is returned holding
    every row. Prompts must be unpadded and of one length (``attention_mask`` all ones).
    """
    groups = prefill_groups(model, new_cache, input_ids, attention_mask, tokens_per_forward, progress)
    caches = [cache for _, cache in groups]
    if input_ids.shape[-1] > 1 and len(caches) > 1:
        concat_batch(caches[0], caches[1:])
    return caches[0]


def prefill_groups(
    model,
    new_cache: Callable[[], object],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    tokens_per_forward: int = TOKENS_PER_FORWARD,
    progress: bool = False,
) -> Iterator[tuple[range, object]]:
    """The groups of :func:`prefill`, one at a time: ``(rows, cache)`` with ``cache`` (from
    ``new_cache``) holding all but the last token of those rows of ``input_ids``, filled by one
    forward. :func:`prefill` joins them; a caller holding its own per-row storage may copy each
    group in and drop it, so that one group's cache at a time is alive."""
    if isinstance(tokens_per_forward, bool) or not isinstance(tokens_per_forward, int) or tokens_per_forward < 1:
        raise ValueError(f"prefill: tokens_per_forward must be a positive integer, got {tokens_per_forward!r}")
    if input_ids.ndim != 2:
        raise ValueError(f"prefill: input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise NotSupportedError(
            "prefill() joins rows that saw prompts of one length: this batch is padded (its attention_mask has "
            "zeros); prefill it with generate(prefill_chunk_size=prefill_chunk_size(batch)) instead"
        )
    batch, length = input_ids.shape
    rows = prefill_rows(length, tokens_per_forward)
    groups = [range(start, min(batch, start + rows)) for start in range(0, batch, rows)]
    from tqdm.auto import tqdm

    for group in tqdm(groups, desc="prefill", unit="group", disable=not progress):
        cache = new_cache()
        if length > 1:
            with torch.no_grad():
                ids = input_ids[group.start : group.stop, :-1]
                model(input_ids=ids, use_cache=True, logits_to_keep=1, **forward_cache_kwargs(model, cache))
        yield group, cache


def concat_batch(cache, others: list) -> None:
    """Take the rows of ``others`` after ``cache``'s: a kvpolicy cache's own ``concat_batch``,
    or, for transformers' caches of full-precision layers (``DynamicCache``), each layer's
    keys and values joined (:func:`concat_dynamic_rows`)."""
    if hasattr(cache, "concat_batch"):
        cache.concat_batch(others)
        return
    from transformers.cache_utils import DynamicLayer

    layers = [cache.layers, *(other.layers for other in others)]
    if not all(isinstance(layer, DynamicLayer) for layer in (x for group in layers for x in group)):
        kinds = sorted({type(x).__name__ for group in layers for x in group})
        raise NotSupportedError(
            f"prefill() joins kvpolicy caches and caches of DynamicLayer layers (DynamicCache); got {kinds}"
        )
    for i, layer in enumerate(cache.layers):
        concat_dynamic_rows(layer, [other.layers[i] for other in others])


def concat_dynamic_rows(layer, others: list) -> None:
    """Take the rows of ``others`` after ``layer``'s: transformers' full-precision layers
    (``DynamicLayer`` and its sliding kind) that saw prompts of the same length. The rows move:
    ``others`` hold no tensors afterwards."""
    lengths = {getattr(x, "cumulative_length", None) or x.get_seq_length() for x in (layer, *others)}
    if len(lengths) != 1 or not all(x.is_initialized for x in (layer, *others)):
        raise ValueError(f"concat_batch joins layers that saw prompts of one length; they saw {sorted(lengths)}")
    layer.keys = torch.cat([layer.keys] + [o.keys for o in others])
    layer.values = torch.cat([layer.values] + [o.values for o in others])
    for other in others:
        other.keys = other.values = None
