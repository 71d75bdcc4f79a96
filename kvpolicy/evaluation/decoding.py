"""Shared prefill, then token-by-token decoding on each contender's cache.

A prefill attends in full precision for every contender (kvpolicy stores demote only
after the step's attention), so it is computed once with a ``DynamicCache`` and its
keys/values are handed to each contender's cache through ``Cache.update``, exactly what
that cache's own prefill would have received. What follows, the prompt's last tokens
and the answer, is decoded one token at a time, so every contender's differences show.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from transformers.cache_utils import Cache, DynamicCache

from kvpolicy.generation import forward_cache_kwargs


@torch.no_grad()
def prefill(model: torch.nn.Module, ids: list[int], logits_to_keep: int = 0) -> tuple[DynamicCache, torch.Tensor]:
    """``(cache, float32 logits [n, V])`` of a full-precision forward over ``ids``; ``n`` is
    ``len(ids)``, or the last ``logits_to_keep`` positions when that is set.

    The cache keeps every token of every layer, sliding-window layers included (the model's
    mask still limits what they attend), so that :func:`ingest` can hand any prefix on."""
    cache = DynamicCache()
    out = model(
        torch.tensor([ids]), **forward_cache_kwargs(model, cache), use_cache=True, logits_to_keep=logits_to_keep
    )
    return cache, out.logits[0].float()


def ingest(cache: Cache, source: DynamicCache, length: int | None = None) -> Cache:
    """Hand the first ``length`` tokens of ``source`` to ``cache`` as one prefill update per layer."""
    for index, layer in enumerate(source.layers):
        keys = layer.keys if length is None else layer.keys[:, :, :length]
        values = layer.values if length is None else layer.values[:, :, :length]
        cache.update(keys, values, index)
    return cache


@torch.no_grad()
def step(model: torch.nn.Module, cache: Cache, token: int) -> torch.Tensor:
    """Logits ``[V]`` (float32) after feeding one token."""
    out = model(torch.tensor([[token]]), **forward_cache_kwargs(model, cache), use_cache=True)
    return out.logits[0, -1].float()


def feed(model: torch.nn.Module, cache: Cache, tokens: Iterable[int]) -> torch.Tensor:
    """Feed ``tokens`` one at a time; the logits after the last one."""
    logits = None
    for token in tokens:
        logits = step(model, cache, token)
    if logits is None:
        raise ValueError("feed() needs at least one token")
    return logits


def greedy(
    model: torch.nn.Module,
    cache: Cache,
    logits: torch.Tensor,
    max_new_tokens: int,
    stop: Callable[[list[int]], bool] | None = None,
    eos_token_id: int | None = None,
) -> list[int]:
    """Greedy continuation from ``logits``; stops at ``max_new_tokens``, EOS or when ``stop(tokens)``."""
    tokens: list[int] = []
    while len(tokens) < max_new_tokens:
        token = int(logits.argmax())
        tokens.append(token)
        if token == eos_token_id or (stop is not None and stop(tokens)) or len(tokens) == max_new_tokens:
            break
        logits = step(model, cache, token)
    return tokens


def continue_on(
    model: torch.nn.Module,
    cache: Cache,
    source: DynamicCache,
    prefix: int,
    tail: list[int],
    max_new_tokens: int,
    stop: Callable[[list[int]], bool] | None = None,
    eos_token_id: int | None = None,
) -> list[int]:
    """Ingest ``prefix`` prefilled tokens, feed ``tail`` one by one, then decode greedily."""
    ingest(cache, source, prefix)
    return greedy(model, cache, feed(model, cache, tail), max_new_tokens, stop, eos_token_id)
