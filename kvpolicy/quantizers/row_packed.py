"""A packed region held as a library's quantized blocks, one list per batch row.

Libraries such as optimum-quanto and HQQ reshape a tensor into groups before packing, so
their quantized tensors have no batch axis of their own. :class:`RowPacked` quantizes each
batch row separately and keeps the blocks in token order; beam reordering and batch
selection then move whole rows, without re-quantizing anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch

from kvpolicy.quantizers import QuantizerBackend


@attrs.frozen
class RowPacked:
    """``rows[b][i]``: block ``i`` of batch row ``b`` (a library object of ``lengths[i]`` tokens).

    ``decode(block) -> [H, n_i, D]`` and ``block_nbytes(block) -> (codes, scales)`` are
    supplied by the backend. ``trim`` drops tokens at the start/end of the joined blocks
    (used by :meth:`slice_tokens` when a slice does not fall on block boundaries).
    """

    rows: tuple[tuple[Any, ...], ...]
    lengths: tuple[int, ...]
    decode: Callable[[Any], torch.Tensor]
    block_nbytes: Callable[[Any], tuple[int, int]]
    trim: tuple[int, int] = (0, 0)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths) - self.trim[0] - self.trim[1]

    def dequantize(self) -> torch.Tensor:
        """``[B, H, n, D]`` in the cache dtype."""
        rows = [torch.cat([self.decode(block) for block in row], dim=1) for row in self.rows]
        out = torch.stack(rows)
        start, end = self.trim
        return out[:, :, start : out.shape[2] - end]

    def nbytes(self) -> dict[str, int]:
        codes = scales = 0
        for row in self.rows:
            for block in row:
                c, s = self.block_nbytes(block)
                codes, scales = codes + c, scales + s
        return {"codes": codes, "scales": scales}

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> RowPacked:
        # apply the batch operation to row indices, then move whole rows
        order = fn(torch.arange(len(self.rows))).tolist()
        return attrs.evolve(self, rows=tuple(self.rows[i] for i in order))

    def concat_batch(self, others: list[RowPacked]) -> RowPacked:
        if any(o.trim != self.trim or o.lengths != self.lengths for o in others):
            raise ValueError("concat_batch joins blocks of the same tokens (equal lengths and trim)")
        return attrs.evolve(self, rows=self.rows + tuple(row for o in others for row in o.rows))

    def dequantize_tokens(self, index: torch.Tensor) -> torch.Tensor:
        """Dequantizes the blocks spanning ``index`` (a library block decodes as a whole)."""
        first, last = int(index.min()), int(index.max())
        span = self.slice_tokens(first, last + 1).dequantize()
        return span.index_select(2, (index - first).to(span.device))

    def slice_tokens(self, start: int, stop: int) -> RowPacked:
        start, stop = start + self.trim[0], stop + self.trim[0]
        first = last = None
        offset = 0
        for i, n in enumerate(self.lengths):
            if first is None and start < offset + n:
                first, first_offset = i, offset
            if stop <= offset + n:
                last, last_end = i, offset + n
                break
            offset += n
        if first is None or last is None:
            raise IndexError(f"slice {start}:{stop} outside {sum(self.lengths)} packed tokens")
        return attrs.evolve(
            self,
            rows=tuple(row[first : last + 1] for row in self.rows),
            lengths=self.lengths[first : last + 1],
            trim=(start - first_offset, last_end - stop),
        )


class RowPackedBackend(QuantizerBackend):
    """A backend whose packed regions are :class:`RowPacked`: joins blocks row by row."""

    def concat(self, blocks: list[RowPacked]) -> RowPacked:
        if any(block.trim != (0, 0) for block in blocks):
            raise ValueError("cannot concatenate trimmed slices")
        return attrs.evolve(
            blocks[0],
            rows=tuple(sum(parts, ()) for parts in zip(*(b.rows for b in blocks), strict=True)),
            lengths=sum((b.lengths for b in blocks), ()),
        )


def as_grouped(x: torch.Tensor, axis: str) -> torch.Tensor:
    """One batch row ``[H, n, D]`` laid out so that groups run along the last dimension:
    ``[H, n, D]`` for per-token groups, ``[H, D, n]`` for per-channel groups; contiguous (a
    copy of one row where ``x`` is a view of a longer block)."""
    return x.contiguous() if axis == "token" else x.transpose(1, 2).contiguous()


def from_grouped(x: torch.Tensor, axis: str) -> torch.Tensor:
    """Inverse of :func:`as_grouped`."""
    return x if axis == "token" else x.transpose(1, 2)
