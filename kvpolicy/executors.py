"""Attention executors: attention for one step over the stored regions plus the new tokens.

An executor receives the store as it was before this step (:class:`~kvpolicy.store.TensorView`
for keys and values) and the step's new keys/values in full precision. New tokens always
take part with their original values, so a prefill attends in full precision before any
demotion. Cached tokens may be stored in any order; attention over them is
order-independent, and each region's positions select the right columns of the mask.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import attrs
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvpolicy import partial_attention as pa
from kvpolicy.pairing import PairedRegions, Pairing
from kvpolicy.store import TensorView, take_tokens
from kvpolicy.transfer import to_device

if TYPE_CHECKING:
    from kvpolicy.row_sinks import RowSinks


@attrs.frozen
class AttentionStep:
    """What one attention call of one layer sees.

    ``new_keys``/``new_values``: ``[B, H_kv, q, D]`` at positions ``past_length .. past_length+q-1``.
    """

    keys: TensorView
    values: TensorView
    new_keys: torch.Tensor
    new_values: torch.Tensor
    past_length: int
    #: per-row sink placement to apply to the mask (a left-padded batch, after its prefill)
    row_sinks: RowSinks | None = None
    #: called with the prefill's mask once attention is done (places per-row sinks)
    after_prefill: Callable[[torch.Tensor], None] | None = None
    #: keys and values are known to hold the same positions in the same order (their stores
    #: retain and demote alike), so executors need not compare the views' positions
    aligned: bool = False


class Executor(ABC):
    """Computes attention for one layer and one step."""

    name: ClassVar[str]

    @abstractmethod
    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        step: AttentionStep,
        attention_mask: torch.Tensor | None,
        **kwargs,
    ) -> torch.Tensor:
        """Return the attention output ``[B, q, H_q, D]`` for ``query`` ``[B, H_q, q, D]``.

        ``attention_mask`` is transformers' boolean mask over positions ``0 .. past_length+q-1``
        (``[B or 1, 1, q, past_length+q]``, True = attend) or ``None`` (plain causal).
        """


def _in_position_order(view: TensorView) -> tuple[torch.Tensor | None, torch.Tensor]:
    tensor, positions = view.materialize()
    if tensor is None:
        return None, positions
    order = torch.argsort(positions)
    return take_tokens(tensor, order), positions[order]


class ReferenceExecutor(Executor):
    """Dequantize every region, restore position order and call transformers' SDPA attention.

    Correct on any device; materializes the whole cache in the model dtype, so it is the
    yardstick that fast executors are checked against, not the fast path.
    """

    name: ClassVar[str] = "reference"

    def attend(self, module, query, step, attention_mask, **kwargs):
        cached_k, pos_k = _in_position_order(step.keys)
        cached_v, pos_v = _in_position_order(step.values)
        if not torch.equal(pos_k, pos_v):
            raise RuntimeError("key and value stores hold different positions; eviction must match")
        q = query.shape[2]
        new_pos = torch.arange(step.past_length, step.past_length + q)  # host bookkeeping, like the stores
        if cached_k is None:
            keys, values, positions = step.new_keys, step.new_values, new_pos
        else:
            keys = torch.cat([cached_k, step.new_keys], dim=2)
            values = torch.cat([cached_v, step.new_values], dim=2)
            positions = torch.cat([pos_k.to(torch.int64), new_pos])
        mask = select_mask_columns(attention_mask, positions, step.past_length + q, q, query.device)
        out, _ = sdpa_attention_forward(module, query, keys, values, mask, **kwargs)
        return out


def select_mask_columns(
    attention_mask: torch.Tensor | None,
    positions: torch.Tensor,
    full_length: int,
    q: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """The mask restricted to the kept ``positions`` (sorted, the last ``q`` being the new tokens).

    With nothing evicted the mask is returned untouched (so ``full`` matches DynamicCache
    bit for bit). Otherwise see :func:`allowed_columns`; SDPA's ``is_causal`` cannot be used
    when cached tokens precede a multi-token step, since it aligns to the top-left corner.
    """
    n = len(positions)
    if n == full_length and (attention_mask is not None or q == 1 or n == q):
        return attention_mask
    return allowed_columns(attention_mask, positions, full_length - q, q, device)


def allowed_columns(
    attention_mask: torch.Tensor | None,
    positions: torch.Tensor,
    past_length: int,
    q: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """Bool ``[B or 1, 1, q, n]`` saying which query rows may see the tokens at ``positions``,
    or ``None`` when all may (a decode step without padding)."""
    positions = positions.to(torch.int64)
    if attention_mask is not None:
        return attention_mask.index_select(-1, to_device(positions, attention_mask.device))
    if q == 1:
        return None
    query_pos = torch.arange(past_length, past_length + q, device=positions.device)
    return (positions[None, :] <= query_pos[:, None])[None, None].to(device)


class ChunkedExecutor(Executor):
    """Attention region by region, the packed region a chunk at a time, merged by log-sum-exp.

    Never holds more than ``chunk_tokens`` dequantized tokens at once (per layer), so peak
    memory stays far below a 16-bit copy of the cache. Keys and values stored in different
    orders (different retention for K and V) are paired first (:class:`~kvpolicy.pairing.Pairing`).
    """

    name: ClassVar[str] = "chunked"
    chunk_tokens: int = 4096

    def __init__(self) -> None:
        self.pairing = Pairing()  # remembers this layer's packed key/value pairs across steps

    def attend(self, module, query, step, attention_mask, scaling=None, **kwargs):
        regions = self.pairing(step.keys, step.values, step.aligned)
        return self.attend_regions(query, regions, step, attention_mask, scaling)

    def attend_regions(
        self,
        query: torch.Tensor,
        regions: PairedRegions,
        step: AttentionStep,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
    ) -> torch.Tensor:
        """:meth:`attend` over the step's cached tokens, already paired (see :mod:`kvpolicy.pairing`)."""
        b, hq, q, d = query.shape
        kv_heads = step.new_keys.shape[1]
        groups = hq // kv_heads
        scaling = scaling if scaling is not None else d**-0.5
        grouped = pa.group_queries(query, kv_heads)
        past = step.past_length

        def bias(positions: torch.Tensor) -> torch.Tensor | None:
            return pa.group_bias(allowed_columns(attention_mask, positions, past, q, query.device), groups)

        # full-precision tokens: kept, staged (or gathered) and new
        new_pos = torch.arange(past, past + q, dtype=torch.int32)
        fp_keys = [k for k, _ in regions.full_precision] + [step.new_keys]
        fp_values = [v for _, v in regions.full_precision] + [step.new_values]
        fp_pos = torch.cat([regions.full_precision_pos, new_pos])
        result = pa.partial(grouped, torch.cat(fp_keys, 2), torch.cat(fp_values, 2), scaling, bias(fp_pos))
        if regions.packed_keys is not None:
            result = pa.merge([result, self.packed_attention(grouped, regions, scaling, bias)])
        return pa.ungroup_output(result[0], hq, q).to(query.dtype)

    def packed_attention(
        self, grouped: torch.Tensor, regions: PairedRegions, scaling: float, bias: Callable
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(o, lse)`` over the packed keys paired with packed values, ``chunk_tokens`` keys
        at a time (``bias(positions)``: the additive bias of those positions' columns)."""
        keys, values, rows = regions.packed_keys, regions.packed_values, regions.value_rows
        parts = []
        for start in range(0, keys.num_tokens, self.chunk_tokens):
            stop = min(keys.num_tokens, start + self.chunk_tokens)
            k, positions = keys.slice_tokens(start, stop).dequantize(), regions.packed_pos[start:stop]
            if rows is None:
                v = values.slice_tokens(start, stop).dequantize()
            else:
                paired = (rows[start:stop] >= 0).nonzero().squeeze(-1)
                if not len(paired):
                    continue
                k, positions = take_tokens(k, paired), positions[paired]
                v = values.dequantize_tokens(rows[start:stop][paired])
            part = pa.partial(grouped, k, v, scaling, bias(positions))
            parts = [pa.merge([*parts, part])]
        return parts[0]
