"""Attention sinks per batch row in a left-padded batch.

A sink selector keeps positions ``0 .. n-1`` for good. In a left-padded batch those are
padding for every row but the longest. After the prefill, the cache writes row ``b``'s first
``m_b = min(n, real prefill tokens)`` real tokens (positions ``pad_b ..``) into that row's
sink slots, and each later step's attention mask is rewritten to match:

* slots ``0 .. m_b-1`` are visible to row ``b`` (they hold its sinks);
* the prefill's other slots, ``m_b .. min(n, q)-1`` (``q``: the prefill's width), are hidden
  (padding of row ``b``, or its tokens already copied into a slot); a slot past the prefill
  (``q .. n-1``, when the prompt is narrower than the sinks) holds a token that every row
  decoded itself and stays visible;
* the tokens copied into the slots stay stored at their own positions too (quantized or
  evicted when the selector drops them); positions ``max(n, pad_b) .. pad_b+m_b-1`` are
  hidden from row ``b`` so that no token is seen twice.

Unpadded rows (``pad_b = 0``) are left exactly as they are. When the prompt is narrower than
the sinks (``q < n``), a padded row keeps as sinks its ``m_b`` prompt tokens and the decoded
tokens at positions ``q .. n-1``: ``n - (q - m_b)`` tokens, its padding fewer than the same
prompt alone keeps once the policy starts demoting (until then every token is attended, as
with a ``DynamicCache``). Every executor reads the mask
through the same positions, so this works for all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch

from kvpolicy.store import TensorStore
from kvpolicy.transfer import to_device


@attrs.frozen
class RowSinks:
    """Per-row sink placement: ``pad`` and ``count`` are int64 CPU tensors ``[B]``; ``width``: the
    prefill's length ``q``."""

    size: int
    pad: torch.Tensor
    count: torch.Tensor
    width: int

    @classmethod
    def from_prefill_mask(cls, attention_mask: torch.Tensor, size: int) -> RowSinks | None:
        """Read each row's padding from the prefill's bool mask ``[B, 1, q, q]``; ``None`` when no row is padded."""
        last_row = attention_mask[:, 0, -1, :].to("cpu")  # the last query sees every real token of its row
        q = last_row.shape[-1]
        pad = torch.where(last_row.any(-1), last_row.to(torch.int64).argmax(-1), torch.full((len(last_row),), q))
        if not bool((pad > 0).any()):
            return None
        return cls(size=size, pad=pad, count=(q - pad).clamp(min=0, max=size), width=q)

    def place(self, store: TensorStore, prefill: torch.Tensor) -> None:
        """Write each padded row's first real tokens of ``prefill`` ``[B, H, q, D]`` (positions
        ``0 .. q-1``) into the sink slots of ``store``'s full-precision region."""
        slots = (store.fp_pos < self.size).nonzero().squeeze(-1)
        if store.fp is None or not len(slots):
            return
        sink_pos = store.fp_pos[slots].to(torch.int64)  # [S] the slot positions j
        take = (self.pad[:, None] > 0) & (sink_pos[None, :] < self.count[:, None])  # [B, S]
        source = (self.pad[:, None] + sink_pos[None, :]).clamp(max=prefill.shape[2] - 1)  # [B, S]
        device = store.fp.device
        b, h, _, d = prefill.shape
        index = to_device(source, device)[:, None, :, None].expand(b, h, len(slots), d)
        moved = torch.gather(prefill, 2, index)
        slots = to_device(slots, device)
        old = store.fp.index_select(2, slots)
        store.overwrite_full_precision(
            slots, torch.where(to_device(take, device)[:, None, :, None], moved.to(old.dtype), old)
        )

    def remap(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The step's bool mask ``[B, 1, q, L]`` with each padded row's sink slots shown and
        the copied tokens' own positions hidden (see the module docstring)."""
        if attention_mask is None:
            return None
        width = min(attention_mask.shape[-1], self.size + int(self.pad.max()))
        cols = torch.arange(width)[None, :]
        pad, count = self.pad[:, None], self.count[:, None]
        show = cols < count
        prefill_slots = min(self.size, self.width)
        hide = ((cols >= count) & (cols < prefill_slots)) | ((cols >= pad.clamp(min=self.size)) & (cols < pad + count))
        override = (pad > 0) & (show | hide)  # [B, width]
        device = attention_mask.device
        head = attention_mask[..., :width].expand(len(pad), *attention_mask.shape[1:-1], width)
        head = torch.where(override.to(device)[:, None, None, :], show.to(device)[:, None, None, :], head)
        tail = attention_mask[..., width:].expand(len(pad), *attention_mask.shape[1:-1], -1)
        return torch.cat([head, tail], dim=-1)

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> RowSinks:
        """The same rows after a beam reorder or batch selection (``fn`` acts on dim 0)."""
        return RowSinks(self.size, fn(self.pad[:, None])[:, 0].cpu(), fn(self.count[:, None])[:, 0].cpu(), self.width)
