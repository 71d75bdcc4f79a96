"""Decode steps replayed from a CUDA graph: the whole model's step issued by one host call.

At batch 1 a decode step is bound by the host (``benchmarks/profile_step.py``). A policy's
bookkeeping is host logic a compiled graph cannot hold, while its step's device work, on
:class:`~kvpolicy.graphs.static_cache.RingBuffers`, has the same shapes and pointers at every
step; so the step is captured once and replayed. :func:`install` wraps ``model.forward``: the
prefill runs eagerly; the first decode step moves the tokens into the buffers, runs once
(compiling the kernels) and is captured; later steps copy the token id and position into the
captured inputs, replay, and book the token on the host (capturing again after the packed
buffers grow). On a CPU the same steps run eagerly, which is how CI checks them.
"""

from __future__ import annotations

import functools

import torch

_CACHE_KEYS = ("cache", "past_key_values")
#: decode-step arguments a replay reproduces or may ignore (everything else is refused)
_IGNORED = {"attention_mask", "position_ids", "cache_position", "use_cache", "return_dict", "logits_to_keep"}


class GraphedDecoding:
    """The decode steps of one cache: capture on the first, replay on the rest."""

    def __init__(self, cache):
        self.cache = cache
        self.graph: torch.cuda.CUDAGraph | None = None
        self.input_ids: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def drop(self) -> None:
        """Forget the captured step (its buffers were replaced or handed back)."""
        self.graph = self.logits = None

    def __call__(self, forward, args: tuple, kwargs: dict):
        cache = self.cache
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        known = {*_IGNORED, *_CACHE_KEYS, "input_ids"}
        unexpected = sorted(k for k, v in kwargs.items() if v is not None and v is not False and k not in known)
        one_token = (
            isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[1] == 1
            and not unexpected and len(args) <= 1
        )  # fmt: skip
        if not cache.adopted:
            if not (one_token and cache.may_adopt(kwargs.get("attention_mask"))):
                return forward(*args, **kwargs)  # a prefill, a new turn, or a cache that stays eager
            cache.adopt()
            if not cache.adopted:  # adoption found no fused kernel for these shapes and handed back
                return forward(*args, **kwargs)
        elif not one_token:
            cache.release(
                "a CUDA-graph cache replays decode steps of one token id per row "
                f"(got input_ids of shape {None if input_ids is None else tuple(input_ids.shape)}"
                + (f" and {', '.join(unexpected)}" if unexpected else "")
                + "); build the cache without cuda_graphs for other calls"
            )
            return forward(*args, **kwargs)
        key = next(k for k in _CACHE_KEYS if k in kwargs)
        logits = self._decode(forward, input_ids, key, kwargs.get("logits_to_keep"))
        cache.book_step()
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)

    def _decode(self, forward, input_ids: torch.Tensor, key: str, logits_to_keep) -> torch.Tensor:
        if self.input_ids is None or self.input_ids.shape != input_ids.shape:
            self.input_ids = torch.zeros_like(input_ids)
            self.positions = torch.zeros_like(input_ids)
            self.drop()
        self.input_ids.copy_(input_ids)
        self.positions.fill_(self.cache.get_seq_length())
        call = {"input_ids": self.input_ids, "position_ids": self.positions, key: self.cache, "use_cache": True}
        if logits_to_keep is not None:
            call["logits_to_keep"] = logits_to_keep
        if not input_ids.is_cuda:
            return forward(**call).logits
        if self.graph is not None:
            self.graph.replay()
            return self.logits.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # the real first step, which also compiles every kernel
            logits = forward(**call).logits
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not run: the warm-up already made this step
            self.logits = forward(**call).logits
        self.graph = graph
        return logits


def install(model) -> None:
    """Wrap ``model.forward`` so that calls with a CUDA-graph cache go through its
    :class:`GraphedDecoding` (idempotent; other caches reach the original forward unchanged)."""
    if getattr(model, "_kvpolicy_graphed", False):
        return
    original = model.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        cache = next((kwargs[k] for k in _CACHE_KEYS if kwargs.get(k) is not None), None)
        decoding = getattr(cache, "decoding", None)
        if decoding is None:
            return original(*args, **kwargs)
        return decoding(original, args, kwargs)

    model.forward = forward
    model._kvpolicy_graphed = True
