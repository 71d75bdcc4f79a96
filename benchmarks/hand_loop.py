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

Either loop may start from a prompt prefilled by whole rows (``prefilled``, the bounded
prefill of the largest-batch runs): :func:`kvpolicy.generation.prefill` for the
``DynamicCache``, :func:`static_prefill` for the ``StaticCache``.

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


def static_prefill(model, ids: torch.Tensor, tokens_per_forward: int, max_cache_len: int):
    """A ``StaticCache`` of ``max_cache_len`` tokens per row holding all but the last token of
    ``ids`` (``batch x context``, no padding), filled a group of whole rows at a time: each
    group of :func:`kvpolicy.generation.prefill_groups` (one forward into a ``DynamicCache`` of
    its own) is copied into its rows of the static tensors (allocated once, for every row, by
    ``early_initialization``) and dropped. The prefill's peak is then the static tensors plus
    one group's forward, as with the row-wise prefill of the other caches."""
    from transformers import DynamicCache, StaticCache

    from kvpolicy.cache.layers import model_layers
    from kvpolicy.generation import prefill_groups

    batch, context = ids.shape
    length = context - 1
    specs = model_layers(model)
    if any(s.type != "full_attention" for s in specs):
        raise ValueError("static_prefill fills StaticCache layers of full attention only")
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    dtype = next(model.parameters()).dtype
    cache.early_initialization(batch, [s.kv_heads for s in specs], [s.head_dim for s in specs], dtype, ids.device)
    new_cache = lambda: DynamicCache(config=model.config)  # noqa: E731
    for rows, group in prefill_groups(model, new_cache, ids, tokens_per_forward=tokens_per_forward):
        if length:
            for static, filled in zip(cache.layers, group.layers, strict=True):
                static.keys[rows.start : rows.stop, :, :length].copy_(filled.keys)
                static.values[rows.start : rows.stop, :, :length].copy_(filled.values)
        del group
    for static in cache.layers:
        static.cumulative_length.fill_(length)  # what update() would have counted
    return cache


def run_loop(
    model, name: str, ids: torch.Tensor, new_tokens: int, chunk: int | None, clock, prefilled=None
) -> tuple[torch.Tensor, object]:
    """Greedy decoding of ``new_tokens`` tokens after ``ids`` (``batch x context``, no padding)
    with the hand loop ``name``; returns ``(new token ids, cache)``. ``prefilled``: a function
    returning a cache that holds all but the last prompt token (a ``DynamicCache`` from
    :func:`kvpolicy.generation.prefill` for ``dynamic-loop``, a ``StaticCache`` from
    :func:`static_prefill` for ``static-loop``), run after the first stamp; the last token is
    then the prefill's one forward."""
    from transformers import DynamicCache, StaticCache

    from kvpolicy.generation import forward_cache_kwargs

    if name not in LOOPS:
        raise ValueError(f"unknown hand loop {name!r}; allowed: {', '.join(LOOPS)}")
    batch, context = ids.shape
    device = ids.device
    forward = type(model).forward.__get__(model)  # the model's own forward, whatever wraps it
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
