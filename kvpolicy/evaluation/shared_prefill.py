"""One 16-bit prefill per batch of prompts, then each contender's own ``generate()`` from it.

A prefill attends in full precision under every contender (a kvpolicy store demotes only
after the step's attention; transformers' ``QuantizedCache`` quantizes what it stores and
attends the originals), so what each contender's cache receives in a real prefill is the
keys and values of a plain ``DynamicCache`` prefill, and the first new token is the one that
prefill's last logits pick. :func:`generate_from` therefore hands a contender's fresh cache
those keys and values (one ``Cache.update`` per layer, as its own prefill would) and calls
``model.generate()`` with the prompt and that first token, so ``generate()`` runs every
later step on the contender's cache. The tokens equal ``model.generate(prompt, cache=...)``
with the contender from scratch (``tests/evaluation/test_generation_tasks.py`` checks each shipped
policy and ``QuantizedCache``), at one prefill per batch instead of one per contender:
on 2 CPU cores a 1.5B model prefills about 90 tokens/s, so this is most of the saving.

Prompts of one batch have equal lengths (the tasks cut them so): no padding, so nothing the
prefill's attention mask tells a cache (a padded row's sinks) is lost by the hand-over.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import Cache, DynamicCache

from kvpolicy.evaluation.decoding import ingest
from kvpolicy.generation import cache_kwargs, forward_cache_kwargs


@torch.no_grad()
def prefill_rows(model: torch.nn.Module, ids: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """``(cache, first)``: a ``DynamicCache`` holding every token of the equal-length prompts
    ``ids`` ``[B, L]`` and the greedy first new token of each row ``[B]``."""
    cache = DynamicCache()
    out = model(ids, **forward_cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1].argmax(-1)


class RowsStop(StoppingCriteria):
    """Stops a row once ``stop(new_tokens)`` holds for it (``new_tokens``: the row's tokens after
    the first ``prompt_length``), and calls ``on_step()`` after every step (progress)."""

    def __init__(
        self, prompt_length: int, stop: Callable[[list[int]], bool] | None, on_step: Callable[[], None] | None
    ):
        self.prompt_length = prompt_length
        self.stop = stop
        self.on_step = on_step

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.on_step is not None:
            self.on_step()
        rows = input_ids[:, self.prompt_length :].tolist()
        done = [self.stop(row) if self.stop is not None else False for row in rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def trim(tokens: list[int], stop: Callable[[list[int]], bool] | None, eos: Sequence[int]) -> list[int]:
    """``tokens`` up to (excluding) the first end-of-sequence token, or up to the first prefix
    for which ``stop`` holds (included): what the row generated before it was done."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[:i]
        if stop is not None and stop(tokens[: i + 1]):
            return tokens[: i + 1]
    return tokens


@torch.no_grad()
def generate_from(
    model: torch.nn.Module,
    cache: Cache,
    source: DynamicCache,
    ids: torch.Tensor,
    first: torch.Tensor,
    max_new_tokens: int,
    stop: Callable[[list[int]], bool] | None = None,
    eos_token_ids: Sequence[int] = (),
    on_step: Callable[[], None] | None = None,
) -> list[list[int]]:
    """Greedy new tokens of each row of ``ids`` ``[B, L]`` (at most ``max_new_tokens``, each cut at
    EOS or where ``stop`` first holds) with ``cache`` (fresh) serving every step after the prefill
    that ``source`` and ``first`` (from :func:`prefill_rows`) hold."""
    ingest(cache, source)
    length = ids.shape[1]
    tokens = torch.cat([ids, first[:, None]], dim=1)
    if max_new_tokens > 1:
        tokens = model.generate(
            tokens,
            attention_mask=torch.ones_like(tokens),
            **cache_kwargs(cache),
            max_new_tokens=max_new_tokens - 1,
            min_new_tokens=0,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=list(eos_token_ids) or None,
            pad_token_id=eos_token_ids[0] if eos_token_ids else 0,
            stopping_criteria=StoppingCriteriaList([RowsStop(length, stop, on_step)]),
        )
    return [trim(row, stop, eos_token_ids) for row in tokens[:, length:].tolist()]
