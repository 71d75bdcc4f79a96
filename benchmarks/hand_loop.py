"""Baselines driven by hand, the fastest way transformers documents, for the benchmarks.

``generate()`` adds work of its own to each step (the attention mask, logits processors,
stopping criteria), and how much depends on how it is called; the hand loops below are the
floor a user of a 16-bit cache can reach without it:

* ``dynamic-loop``: a ``DynamicCache``, the prompt prefilled ``chunk`` tokens per row at a time
  (each forward keeps only the last position's logits), then greedy one-token forwards;
* ``static-loop``: a ``StaticCache`` of the prompt plus the new tokens, the same prefill run
  uncompiled, then one-token forwards through ``torch.compile(model.forward,
  mode="reduce-overhead", fullgraph=True)`` (transformers' documented static-cache recipe),
  a step boundary marked before each replay; a first untimed call pays the compilation.

Both hand the same clock as ``generate()`` gets a stamp after the prompt and after each token.
"""

from __future__ import annotations

import torch

LOOPS = ("dynamic-loop", "static-loop")


def _compiled_forward(model):
    """``model.forward`` of the model's class compiled once per model (reduce-overhead)."""
    compiled = model.__dict__.get("_benchmark_compiled_forward")
    if compiled is None:
        compiled = torch.compile(type(model).forward.__get__(model), mode="reduce-overhead", fullgraph=True)
        model.__dict__["_benchmark_compiled_forward"] = compiled
    return compiled


def run_loop(
    model, name: str, ids: torch.Tensor, new_tokens: int, chunk: int | None, clock, prefilled=None
) -> tuple[torch.Tensor, object]:
    """Greedy decoding of ``new_tokens`` tokens after ``ids`` (``batch x context``, no padding)
    with the hand loop ``name``; returns ``(new token ids, cache)``. ``prefilled``: a function
    returning a cache that holds all but the last prompt token (``dynamic-loop``, see
    :func:`kvpolicy.generation.prefill`), run after the first stamp; the last token is then the
    prefill's one forward."""
    from transformers import DynamicCache, StaticCache

    from kvpolicy.generation import forward_cache_kwargs

    if name not in LOOPS:
        raise ValueError(f"unknown hand loop {name!r}; allowed: {', '.join(LOOPS)}")
    batch, context = ids.shape
    device = ids.device
    forward = type(model).forward.__get__(model)  # the model's own forward, whatever wraps it
    if prefilled is not None and name != "dynamic-loop":
        raise ValueError(f"a prefilled cache serves the dynamic-loop, not {name!r}")
    if name == "dynamic-loop":
        cache = DynamicCache(config=model.config)
        step = forward
    else:
        cache = StaticCache(config=model.config, max_cache_len=context + new_tokens)
        step = _compiled_forward(model)
    clock.put(ids)
    first = 0
    if prefilled is not None:
        cache, first, chunk = prefilled(), context - 1, 1
    kw = forward_cache_kwargs(model, cache)
    chunk = chunk or context
    for start in range(first, context, chunk):
        end = min(context, start + chunk)
        positions = torch.arange(start, end, device=device).expand(batch, -1)
        out = forward(input_ids=ids[:, start:end], position_ids=positions, use_cache=True, logits_to_keep=1, **kw)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    del out
    tokens = [token]
    clock.put(token)
    for i in range(1, new_tokens):
        position = torch.full((batch, 1), context + i - 1, device=device)
        if name == "static-loop":
            torch.compiler.cudagraph_mark_step_begin()
        logits = step(input_ids=token, position_ids=position, use_cache=True, logits_to_keep=1, **kw).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        clock.put(token)
    return torch.cat(tokens, 1), cache
