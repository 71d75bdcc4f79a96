"""The cache layer of a sliding-window (or chunked) attention layer, in full precision.

It is transformers' ``DynamicSlidingWindowLayer`` (it keeps the last ``window - 1`` tokens
and returns them with the step's new ones), so a hybrid model's sliding layers behave
exactly as under ``DynamicCache``; this class adds what kvpolicy's memory report reads.
Its keys and values are untagged, so the ``"kvpolicy"`` attention runs SDPA on them.
"""

from __future__ import annotations

from transformers.cache_utils import DynamicSlidingWindowLayer

from kvpolicy.generation import concat_dynamic_rows


class SlidingWindowLayer(DynamicSlidingWindowLayer):
    """Full-precision keys/values ``[B, H, min(seen, window - 1), D]`` of one sliding layer."""

    #: nothing in this layer is quantized or evicted by the policy (the window is the model's)
    demoted = False

    def __init__(self, window: int):
        super().__init__(sliding_window=window)

    def held_tokens(self) -> int:
        """Tokens held, as many as a ``DynamicCache``'s sliding layer holds."""
        return 0 if not self.is_initialized else self.keys.shape[-2]

    def concat_batch(self, others: list[SlidingWindowLayer]) -> None:
        """See :func:`kvpolicy.generation.concat_dynamic_rows`."""
        concat_dynamic_rows(self, others)

    def nbytes(self) -> dict[str, int]:
        if not self.is_initialized:
            return {"sliding_window": 0}
        return {"sliding_window": sum(t.numel() * t.element_size() for t in (self.keys, self.values))}
