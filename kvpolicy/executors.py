"""Attention executors: attention for one step over the stored regions plus the new tokens.

An executor receives the store as it was before this step (:class:`~kvpolicy.store.TensorView`
for keys and values) and the step's new keys/values in full precision. New tokens always
take part with their original values, so a prefill attends in full precision before any
demotion. Cached tokens may be stored in any order; attention over them is
order-independent, and each region's positions select the right columns of the mask.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, ClassVar

import attrs
import torch

from kvpolicy import partial_attention as pa
from kvpolicy.config import _positive_int
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


@attrs.define
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
        out, _ = sdpa_attention(module, query, keys, values, mask, **kwargs)
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


def in_position_order(step: AttentionStep) -> bool:
    """Whether every cached token is still in full precision, in position order (nothing was
    demoted or evicted yet): then attention is plain SDPA over the concatenation, exactly what
    a ``DynamicCache`` computes."""
    keys, values = step.keys, step.values
    return (
        keys.packed is None
        and values.packed is None
        and keys.staging is None
        and values.staging is None
        and len(keys.fp_pos) == len(values.fp_pos) == step.past_length
    )


def exact_attention(module, query, step: AttentionStep, attention_mask, **kwargs) -> torch.Tensor:
    """transformers' SDPA attention over the cached full-precision tokens plus the new ones
    (only where :func:`in_position_order` holds): a first prefill reads no cache at all."""
    if step.keys.fp is None:
        keys, values = step.new_keys, step.new_values
    else:
        keys = torch.cat([step.keys.fp, step.new_keys], dim=2)
        values = torch.cat([step.values.fp, step.new_values], dim=2)
    q, n = query.shape[2], keys.shape[2]
    if attention_mask is None and q > 1 and n > q:  # SDPA's is_causal would align to the top left
        attention_mask = allowed_columns(None, torch.arange(n), n - q, q, query.device)
    out, _ = sdpa_attention(module, query, keys, values, attention_mask, **kwargs)
    return out


def sdpa_attention(module, query, keys, values, attention_mask, **kwargs):
    """transformers' SDPA attention function (imported on first use: transformers is slow to
    import, and ``kvpolicy list``/``show`` never attend)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, keys, values, attention_mask, **kwargs)


@attrs.define
class ChunkedExecutor(Executor):
    """Attention region by region, merged by log-sum-exp; never the whole cache in 16-bit.

    * Nothing demoted yet (a first prefill, a short prompt): plain SDPA, as ``DynamicCache``.
    * Multi-token steps over a filled cache (a chunked prefill, a second turn): every piece
      (the new tokens among themselves, the cached full-precision tokens, the packed tokens
      ``chunk_tokens`` at a time) goes through a FlashAttention-class kernel that returns its
      log-sum-exp (:func:`~kvpolicy.partial_attention.sdpa_partial`), a block of query rows
      at a time, so no score matrix is ever held.
    * Decode steps: the full-precision tokens and the packed chunks in float32.

    Keys and values stored in different orders (different retention for K and V) are paired
    first (:class:`~kvpolicy.pairing.Pairing`).
    """

    name: ClassVar[str] = "chunked"
    chunk_tokens: int = attrs.field(
        default=4096,
        validator=_positive_int("executor.chunk_tokens"),
        metadata={"doc": "packed tokens dequantized at a time (bounds the step's transient memory)"},
    )
    #: remembers this layer's packed key/value pairs across steps
    pairing: Pairing = attrs.field(factory=Pairing, init=False, repr=False, eq=False)

    def attend(self, module, query, step, attention_mask, scaling=None, **kwargs):
        if in_position_order(step):
            return exact_attention(module, query, step, attention_mask, scaling=scaling, **kwargs)
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
        if query.shape[2] > 1:
            return self.attend_many(query, regions, step, attention_mask, scaling)
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
        for k, v, positions in self.packed_chunks(regions):
            result = pa.merge([result, pa.partial(grouped, k, v, scaling, bias(positions))])
        return pa.ungroup_output(result[0], hq, q).to(query.dtype)

    def attend_many(
        self,
        query: torch.Tensor,
        regions: PairedRegions,
        step: AttentionStep,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
    ) -> torch.Tensor:
        """A multi-token step ``[B, H_q, q, D]`` over a filled cache, in blocks of query rows.

        For the rows ``s..e`` of a block the pieces are: the new tokens ``s..e`` among themselves
        (causal), the new tokens before ``s`` and the cached full-precision tokens; then each
        chunk of packed tokens, dequantized once, is attended by every block. Each piece is one
        SDPA kernel call with its log-sum-exp, merged as it comes. Cached tokens precede every
        new one, so without a mask every row sees all of them.
        """
        b, hq, q, d = query.shape
        kv_heads = step.new_keys.shape[1]
        groups = hq // kv_heads
        scaling = scaling if scaling is not None else d**-0.5
        past = step.past_length
        attention_mask = None if is_plain_causal(attention_mask, past, q) else attention_mask
        new_keys, new_values = step.new_keys, step.new_values
        fp_keys = fp_values = None
        if regions.full_precision:
            fp_keys = torch.cat([k for k, _ in regions.full_precision], 2)
            fp_values = torch.cat([v for _, v in regions.full_precision], 2)
        fp_pos = regions.full_precision_pos.to(torch.int64)
        rows = pa.row_block(b, hq, d)
        blocks = [(s, min(q, s + rows)) for s in range(0, q, rows)]

        def allowed(s: int, e: int, positions: torch.Tensor) -> torch.Tensor | None:
            if attention_mask is None:
                return None
            columns = attention_mask[:, :, s:e].index_select(-1, to_device(positions, attention_mask.device))
            return group_rows(columns, groups)

        results = []
        for s, e in blocks:
            grouped = pa.group_queries(query[:, :, s:e], kv_heads)
            if attention_mask is None:  # the block's own tokens, causal: heads as the kernels take them
                square = pa.sdpa_partial(
                    query[:, :, s:e],
                    repeat_heads(new_keys[:, :, s:e], groups),
                    repeat_heads(new_values[:, :, s:e], groups),
                    scaling,
                    is_causal=True,
                )
                result = (pa.group_queries(square[0], kv_heads), square[1].reshape(b, kv_heads, -1))
            else:
                own = torch.arange(past + s, past + e)
                result = pa.sdpa_partial(
                    grouped, new_keys[:, :, s:e], new_values[:, :, s:e], scaling, allowed(s, e, own)
                )
            pieces = [(fp_keys, fp_values, fp_pos)] if fp_keys is not None else []
            if s:
                pieces.append((new_keys[:, :, :s], new_values[:, :, :s], torch.arange(past, past + s)))
            for k, v, positions in pieces:
                result = pa.merge([result, pa.sdpa_partial(grouped, k, v, scaling, allowed(s, e, positions))])
            results.append(result)
        for k, v, positions in self.packed_chunks(regions):  # each chunk dequantized once
            positions = positions.to(torch.int64)
            for i, (s, e) in enumerate(blocks):
                grouped = pa.group_queries(query[:, :, s:e], kv_heads)
                part = pa.sdpa_partial(grouped, k, v, scaling, allowed(s, e, positions))
                results[i] = pa.merge([results[i], part])
        outputs = [pa.ungroup_output(o, hq, e - s).to(query.dtype) for (o, _), (s, e) in zip(results, blocks)]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def tokens_per_chunk(self, keys) -> int:
        """Packed tokens dequantized at a time: ``chunk_tokens``, fewer where a chunk's keys and
        values in float32 would pass :data:`~kvpolicy.partial_attention.PIECE_BYTES` (a large
        batch), a whole number of per-channel groups."""
        b, h, _, width = keys.codes.shape if hasattr(keys, "codes") else (1, 1, 0, 0)
        d = width * 8 // getattr(keys, "bits", 8) if width else 128
        tokens = min(self.chunk_tokens, max(1, pa.PIECE_BYTES // (2 * 4 * b * h * d)))
        group = keys.group_size if getattr(keys, "axis", "token") == "channel" else 1
        return max(group, tokens // group * group)

    def packed_chunks(self, regions: PairedRegions) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The packed keys paired with packed values, ``chunk_tokens`` keys at a time, dequantized:
        ``(keys, values, positions)`` with ``[B, H_kv, n, D]`` tensors and int32 host positions."""
        keys, values, rows = regions.packed_keys, regions.packed_values, regions.value_rows
        if keys is None:
            return
        chunk = self.tokens_per_chunk(keys)
        for start in range(0, keys.num_tokens, chunk):
            stop = min(keys.num_tokens, start + chunk)
            k, positions = keys.slice_tokens(start, stop).dequantize(), regions.packed_pos[start:stop]
            if rows is None:
                v = values.slice_tokens(start, stop).dequantize()
            else:
                paired = (rows[start:stop] >= 0).nonzero().squeeze(-1)
                if not len(paired):
                    continue
                k, positions = take_tokens(k, paired), positions[paired]
                v = values.dequantize_tokens(rows[start:stop][paired])
            yield k, v, positions


def is_plain_causal(attention_mask: torch.Tensor | None, past: int, q: int) -> bool:
    """Whether ``attention_mask`` (``[B or 1, 1, q, past+q]``, True = attend) is the plain causal
    mask of a step after ``past`` cached tokens, with no padding: then the kernels run without a
    mask (what transformers hands a chunked prefill or a second turn without padding)."""
    if attention_mask is None:
        return True
    if attention_mask.shape[-1] != past + q or attention_mask.shape[-2] != q:
        return False
    causal = torch.ones(q, q, dtype=torch.bool, device=attention_mask.device).tril_()
    return bool(attention_mask[..., :past].all()) and bool((attention_mask[..., past:] == causal).all())


def repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, H_kv, n, D]`` -> ``[B, H_kv*groups, n, D]``, query head ``h`` reading KV head
    ``h // groups`` (transformers' ``repeat_kv``)."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def group_rows(allowed: torch.Tensor, groups: int) -> torch.Tensor:
    """Bool ``[B or 1, 1, q, n]`` -> ``[B or 1, 1, groups*q, n]``, the rows of grouped queries
    (see :func:`kvpolicy.partial_attention.group_queries`)."""
    if groups == 1:
        return allowed
    b, _, q, n = allowed.shape
    return allowed.unsqueeze(2).expand(b, 1, groups, q, n).reshape(b, 1, groups * q, n)
