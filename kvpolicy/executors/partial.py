"""Attention in pieces: partial softmax results over disjoint token sets, merged exactly.

For a set of tokens, :func:`partial` returns the normalized output ``o`` and the log-sum-exp
``lse`` of the scores of every query row. Two sets merge as
``o = Σ exp(lse_i - lse) o_i`` with ``lse = logsumexp(lse_i)`` (flash-decoding's split-K
merge), so the full-precision region, the packed region (chunk by chunk, or by a fused
kernel) and the new tokens can each be attended separately and combined without error
beyond rounding.

Queries are grouped by KV head: ``[B, H_kv, G*q, D]`` with row ``g*q + i`` holding query head
``h_kv*G + g`` at step ``i`` (transformers' ``repeat_kv`` mapping).
"""

from __future__ import annotations

import torch


def group_queries(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[B, H_q, q, D]`` -> ``[B, H_kv, G*q, D]``."""
    b, hq, q, d = query.shape
    return query.reshape(b, kv_heads, (hq // kv_heads) * q, d)


def ungroup_output(out: torch.Tensor, query_heads: int, q: int) -> torch.Tensor:
    """``[B, H_kv, G*q, D]`` -> transformers' attention output layout ``[B, q, H_q, D]``."""
    b, _, _, d = out.shape
    return out.reshape(b, query_heads, q, d).transpose(1, 2)


def group_bias(allowed: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    """Bool ``[B or 1, 1, q, n]`` (True = attend) -> additive float32 ``[B or 1, 1, G*q, n]``."""
    if allowed is None:
        return None
    b, _, q, n = allowed.shape
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
    bias.masked_fill_(~allowed, float("-inf"))
    return bias.unsqueeze(2).expand(b, 1, groups, q, n).reshape(b, 1, groups * q, n)


def partial(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)`` for grouped ``query`` ``[B, H, R, D]`` over ``keys``/``values`` ``[B, H, n, D]``.

    Computed in float32; ``o`` is ``[B, H, R, D]`` and ``lse`` ``[B, H, R]`` (``-inf`` where
    a row sees no token, with ``o`` zero there).
    """
    scores = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * scaling
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
    weights = torch.nan_to_num(weights, nan=0.0)
    return torch.matmul(weights, values.float()), lse


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine ``(o, lse)`` pairs over disjoint token sets into one."""
    if len(parts) == 1:
        return parts[0]
    return merge_stacked(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]), dim=0)


def merge_stacked(out: torch.Tensor, lse: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge` for partial results stacked along ``dim`` of ``lse`` (``out`` has one more
    trailing dimension, the head dimension)."""
    total = torch.logsumexp(lse, dim=dim)
    safe = total.clamp_min(torch.finfo(torch.float32).min).unsqueeze(dim)
    weights = torch.nan_to_num(torch.exp(lse - safe))
    return (weights.unsqueeze(-1) * out).sum(dim=dim), total


#: float32 bytes of one piece's output ``[B, H, R, D]`` that a multi-token step aims to stay
#: under (its rows are split into blocks of this size; see :func:`row_block`)
PIECE_BYTES = 256 * 2**20


def row_block(batch: int, heads: int, head_dim: int, piece_bytes: int | None = None) -> int:
    """Query rows per block so that a float32 ``[batch, heads, rows, head_dim]`` piece stays
    under ``piece_bytes`` (default :data:`PIECE_BYTES`; at least 16 rows)."""
    return max(16, (piece_bytes or PIECE_BYTES) // (4 * batch * heads * head_dim))


def sdpa_partial(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    allowed: torch.Tensor | None = None,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`partial` through a FlashAttention-class kernel: no score matrix in memory.

    ``query`` ``[B, H, R, D]``, ``keys``/``values`` ``[B, H, n, D]`` (same ``H``); ``allowed``:
    bool ``[B or 1, 1, R, n]`` (True = attend) or ``None`` (every row sees every token, or a
    causal square with ``is_causal``). Returns float32 ``o`` ``[B, H, R, D]`` and natural-log
    ``lse`` ``[B, H, R]`` (``-inf`` and zeros for a row that sees no token).

    PyTorch's SDPA kernels that also return the log-sum-exp: flash attention on CUDA (fp16/bf16,
    no mask), memory-efficient attention on CUDA (any mask), the CPU flash kernel (any mask).
    Elsewhere, or where a kernel refuses the shapes, :func:`partial` in bounded row blocks.
    """
    if allowed is not None and allowed.all():
        allowed = None  # a mask that allows everything (no padding) costs the kernels time
    result = _kernel_partial(query, keys, values, scaling, allowed, is_causal)
    if result is None:
        return _blocked_partial(query, keys, values, scaling, allowed, is_causal)
    out, lse = result
    out, lse = out.float(), lse[..., : query.shape[2]].float()
    if allowed is not None:  # rows that see nothing: the kernels disagree on what they return
        seen = allowed.any(-1)  # [B or 1, 1, R]
        if not bool(seen.all()):
            lse = lse.masked_fill(~seen, float("-inf"))
            out = out.masked_fill(~seen.unsqueeze(-1), 0.0)
    return out, lse


def _kernel_partial(query, keys, values, scaling, allowed, is_causal):
    """``(o, lse)`` from one of PyTorch's SDPA kernels, or ``None`` where none serves."""
    aten = torch.ops.aten
    scale = float(scaling)
    try:
        if query.device.type == "cpu":
            bias = None if allowed is None else _additive(allowed, query.dtype, query.shape, keys.shape[2])
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
                query, keys, values, 0.0, is_causal, attn_mask=bias, scale=scale
            )
            return out, lse
        if query.device.type != "cuda":
            return None
        head_dim = query.shape[-1]
        if allowed is None and query.dtype in (torch.float16, torch.bfloat16) and head_dim <= 256 and head_dim % 8 == 0:
            result = aten._scaled_dot_product_flash_attention(query, keys, values, 0.0, is_causal, False, scale=scale)
            return result[0], result[1]
        if head_dim % 8 == 0:
            bias = None if allowed is None else _additive(allowed, query.dtype, query.shape, keys.shape[2], align=16)
            result = aten._scaled_dot_product_efficient_attention(
                query, keys, values, bias, True, 0.0, is_causal, scale=scale
            )
            return result[0], result[1]
    except (RuntimeError, NotImplementedError):
        return None
    return None


def _additive(allowed: torch.Tensor, dtype: torch.dtype, query_shape, n: int, align: int = 1) -> torch.Tensor:
    """Bool ``[B or 1, 1, R, n]`` -> additive ``[B, H, R, n]`` (0 / -inf) in ``dtype``, the last
    dimension's storage padded to a multiple of ``align`` (what the CUDA kernel reads)."""
    b, h, r, _ = query_shape
    padded = -(-n // align) * align
    bias = torch.zeros(allowed.shape[0], 1, r, padded, dtype=dtype, device=allowed.device)[..., :n]
    bias.masked_fill_(~allowed, float("-inf"))
    return bias.expand(b, h, r, n)


def _blocked_partial(query, keys, values, scaling, allowed, is_causal):
    """:func:`partial` a block of query rows at a time (scores ``[B, H, rows, n]`` in float32)."""
    b, h, r, _ = query.shape
    n = keys.shape[2]
    rows = max(1, (64 * 2**20) // (4 * b * h * max(n, 1)))
    outs, lses = [], []
    for start in range(0, r, rows):
        stop = min(r, start + rows)
        block_allowed = None if allowed is None else allowed[:, :, start:stop]
        if is_causal:  # a causal square: row i sees tokens 0..i
            causal = (
                torch.arange(n, device=query.device)[None, :] <= torch.arange(start, stop, device=query.device)[:, None]
            )
            block_allowed = causal[None, None] if block_allowed is None else block_allowed & causal
        bias = None if block_allowed is None else group_bias(block_allowed, 1)
        o, lse = partial(query[:, :, start:stop], keys, values, scaling, bias)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)
