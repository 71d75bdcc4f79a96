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
