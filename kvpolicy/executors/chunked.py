"""``chunked``: attention region by region, merged by log-sum-exp (the CPU default)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import attrs
import torch

from kvpolicy.config import _positive_int
from kvpolicy.executors import partial as pa
from kvpolicy.executors.base import (
    AttentionStep,
    Executor,
    allowed_columns,
    exact_attention,
    group_rows,
    in_position_order,
    is_plain_causal,
    repeat_heads,
)
from kvpolicy.executors.pairing import PairedRegions, Pairing
from kvpolicy.store import take_tokens
from kvpolicy.transfer import to_device


@attrs.define
class ChunkedExecutor(Executor):
    """Attention region by region, merged by log-sum-exp; never the whole cache in 16-bit.

    * Nothing demoted yet (a first prefill, a short prompt): plain SDPA, as ``DynamicCache``.
    * Multi-token steps over a filled cache (a chunked prefill, a second turn): every piece
      (the new tokens among themselves, the cached full-precision tokens, the packed tokens
      ``chunk_tokens`` at a time) goes through a FlashAttention-class kernel that returns its
      log-sum-exp (:func:`~kvpolicy.executors.partial.sdpa_partial`), a block of query rows
      at a time, so no score matrix is ever held.
    * Decode steps: the full-precision tokens and the packed chunks in float32.

    Keys and values stored in different orders (different retention for K and V) are paired
    first (:class:`~kvpolicy.executors.pairing.Pairing`).
    """

    name: ClassVar[str] = "chunked"
    chunk_tokens: int = attrs.field(
        default=4096,
        validator=_positive_int("executor.chunk_tokens"),
        metadata={"doc": "packed tokens dequantized at a time (bounds the step's transient memory)"},
    )
    #: remembers this layer's packed key/value pairs across steps
    pairing: Pairing = attrs.field(factory=Pairing, init=False, repr=False, eq=False)

    def nbytes(self) -> int:
        return self.pairing.nbytes()

    def reset(self) -> None:
        self.pairing = Pairing()

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
        """:meth:`attend` over the step's cached tokens, already paired (see :mod:`kvpolicy.executors.pairing`)."""
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
        values in float32 would pass :data:`~kvpolicy.executors.partial.PIECE_BYTES` (a large
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
