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
