"""Fused decode attention over the packed region (Triton), split-K with a log-sum-exp merge.

One program handles one (batch row, KV head) and a contiguous slice of the packed tokens:
it reads the 2/4/8-bit codes and their scales/zeros, dequantizes a block of keys and values
in registers, and keeps an online softmax for all query heads that share the KV head
(GQA without copying). Nothing is written to memory in 16-bit except the tiny per-split
partial results, which :mod:`kvpolicy.partial_attention` merges with the full-precision
region's result.

Used by :class:`FusedExecutor` for decode steps (one query token) on CUDA; every other case
(CPU, prefill, keys and values stored in different orders) goes to the chunked executor.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch

from kvpolicy import partial_attention as pa
from kvpolicy.executors import ChunkedExecutor
from kvpolicy.quantizers import NativePacked

# launch configuration (see benchmarks/NOTES.md for how these were chosen)
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 3
SPLIT_FACTOR = 16  # programs per SM to aim for when splitting the tokens
FOLD_KEY_SCALE = True  # blocks of one key group; scale folded into the query; fp16 dots


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def packed_decode(
        Q, KC, KS, KZ, VC, VS, VZ, BIAS, OUT, LSE,
        N, HKV, G, scaling, tokens_per_split,
        D: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, KG: tl.constexpr, VG: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, HAS_BIAS: tl.constexpr, FOLD: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(0)
        split = tl.program_id(1)
        splits = tl.num_programs(1)
        b = bh // HKV
        KPB: tl.constexpr = 8 // KBITS
        VPB: tl.constexpr = 8 // VBITS
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        k_bytes = tl.arange(0, D // KPB)
        v_bytes = tl.arange(0, D // VPB)
        k_shift = tl.arange(0, KPB) * KBITS
        v_shift = tl.arange(0, VPB) * VBITS
        k_groups = tl.arange(0, BLOCK_N // KG)
        v_groups = tl.arange(0, D // VG)
        q = tl.load(Q + (bh * G + offs_g[:, None]) * D + offs_d[None, :], mask=offs_g[:, None] < G, other=0.0)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        denom = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        start = split * tokens_per_split
        end = tl.minimum(start + tokens_per_split, N)
        for i in range(0, tokens_per_split, BLOCK_N):
            first = start + i  # a multiple of BLOCK_N, hence of KG
            n = first + offs_n
            live = n < end
            # keys: each byte holds KPB codes of consecutive channels; one scale row per KG tokens
            kb = tl.load(KC + (bh * N + n[:, None]) * (D // KPB) + k_bytes[None, :], mask=live[:, None], other=0)
            kcode = tl.reshape(
                (kb.to(tl.int32)[:, :, None] >> k_shift[None, None, :]) & ((1 << KBITS) - 1), [BLOCK_N, D]
            )
            if FOLD:
                # one key group per block: q.(c*s + z) = (q*s).c + q.z, so keys are never dequantized
                krow = (bh * (N // KG) + first // KG) * D + offs_d
                ks = tl.load(KS + krow, mask=(offs_d < D) & (first < end), other=0.0).to(tl.float32)
                kz = tl.load(KZ + krow, mask=(offs_d < D) & (first < end), other=0.0).to(tl.float32)
                qs = (q * ks[None, :]).to(tl.float16)
                qz = tl.sum(q * kz[None, :], 1)
                s = (tl.dot(qs, tl.trans(kcode.to(tl.float16))) + qz[:, None]) * scaling
            else:
                grp = first // KG + k_groups
                kidx = (bh * (N // KG) + grp[:, None]) * D + offs_d[None, :]
                ks = tl.load(KS + kidx, mask=(grp < N // KG)[:, None], other=0.0).to(tl.float32)
                kz = tl.load(KZ + kidx, mask=(grp < N // KG)[:, None], other=0.0).to(tl.float32)
                k = tl.reshape(kcode.to(tl.float32), [BLOCK_N // KG, KG, D]) * ks[:, None, :] + kz[:, None, :]
                s = tl.dot(q, tl.trans(tl.reshape(k, [BLOCK_N, D]))) * scaling
            if HAS_BIAS:
                s += tl.load(BIAS + b * N + n, mask=live, other=float("-inf"))[None, :]
            s = tl.where(live[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            p = tl.exp(s - m_safe[:, None])
            denom = denom * alpha + tl.sum(p, 1)
            # values: per token, one scale per VG channels
            vb = tl.load(VC + (bh * N + n[:, None]) * (D // VPB) + v_bytes[None, :], mask=live[:, None], other=0)
            vcode = tl.reshape(
                (vb.to(tl.int32)[:, :, None] >> v_shift[None, None, :]) & ((1 << VBITS) - 1), [BLOCK_N, D]
            )
            vidx = (bh * N + n[:, None]) * (D // VG) + v_groups[None, :]
            vs = tl.load(VS + vidx, mask=live[:, None], other=0.0).to(tl.float32)
            vz = tl.load(VZ + vidx, mask=live[:, None], other=0.0).to(tl.float32)
            v = tl.reshape(vcode.to(tl.float32), [BLOCK_N, D // VG, VG]) * vs[:, :, None] + vz[:, :, None]
            if FOLD:
                pv = tl.dot(p.to(tl.float16), tl.reshape(v, [BLOCK_N, D]).to(tl.float16))
            else:
                pv = tl.dot(p, tl.reshape(v, [BLOCK_N, D]))
            acc = acc * alpha[:, None] + pv
            m = m_new
        safe = tl.where(denom > 0, denom, 1.0)
        out = acc / safe[:, None]
        lse = tl.where(denom > 0, m + tl.log(safe), float("-inf"))
        row = (bh * splits + split) * G + offs_g
        tl.store(OUT + row[:, None] * D + offs_d[None, :], out, mask=offs_g[:, None] < G)
        tl.store(LSE + row, lse, mask=offs_g < G)

    return packed_decode


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def packed_decode_attention(
    grouped: torch.Tensor,
    keys: NativePacked,
    values: NativePacked,
    scaling: float,
    bias: torch.Tensor | None,
    splits: int | None = None,
    block_n: int = BLOCK_N,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
    split_factor: int = SPLIT_FACTOR,
    fold: bool = FOLD_KEY_SCALE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)`` of one decode step over the packed region.

    ``grouped``: ``[B, H_kv, G, D]`` queries; ``bias``: additive float32 ``[B, N]`` or ``None``;
    keys per-channel (``axis="channel"``), values per-token, same token order.
    """
    b, hkv, g, d = grouped.shape
    n = keys.num_tokens
    block_n = keys.group_size if fold else max(block_n, keys.group_size)
    if splits is None:
        sms = torch.cuda.get_device_properties(grouped.device).multi_processor_count if grouped.is_cuda else 8
        splits = max(1, min(triton_cdiv(n, block_n), triton_cdiv(split_factor * sms, b * hkv)))
    tokens_per_split = triton_cdiv(triton_cdiv(n, splits), block_n) * block_n
    splits = triton_cdiv(n, tokens_per_split)
    out = torch.empty(b * hkv, splits, g, d, dtype=torch.float32, device=grouped.device)
    lse = torch.empty(b * hkv, splits, g, dtype=torch.float32, device=grouped.device)
    has_bias = bias is not None
    _kernel()[(b * hkv, splits)](
        grouped.float().contiguous(),
        keys.codes.contiguous(), keys.scale.contiguous(), keys.zero.contiguous(),
        values.codes.contiguous(), values.scale.contiguous(), values.zero.contiguous(),
        bias.contiguous() if has_bias else out, out, lse,
        n, hkv, g, float(scaling), tokens_per_split,
        D=d, KBITS=keys.bits, VBITS=values.bits, KG=keys.group_size, VG=values.group_size,
        BLOCK_N=block_n, BLOCK_G=max(16, triton_next_power_of_2(g)), HAS_BIAS=has_bias,
        FOLD=fold, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    merged, total = pa.merge_stacked(out, lse, dim=1)  # [B*H, S, G] -> [B*H, G]
    return merged.reshape(b, hkv, g, d), total.reshape(b, hkv, g)


def _power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_next_power_of_2(x: int) -> int:
    return 1 << (x - 1).bit_length()


class FusedExecutor(ChunkedExecutor):
    """Decode steps read the packed bytes directly in a Triton kernel (CUDA); the rest is chunked.

    Supports the native backend with keys per-channel and values per-token (KIVI's layout),
    2/4/8 bits, any group sizes that divide the head dimension for values, bf16/fp16/fp32.
    """

    name: ClassVar[str] = "fused"

    def packed_attention(self, grouped, keys, values, positions, scaling, bias, q):
        fusable = (
            q == 1
            and grouped.is_cuda
            and isinstance(keys, NativePacked)
            and isinstance(values, NativePacked)
            and keys.axis == "channel"
            and values.axis == "token"
            and _power_of_two(grouped.shape[-1])
            and _power_of_two(keys.group_size)
            and _power_of_two(grouped.shape[-1] // values.group_size)
            and triton_available()
        )
        if not fusable:
            return super().packed_attention(grouped, keys, values, positions, scaling, bias, q)
        column_bias = bias(positions)  # [B or 1, 1, G, n] for a decode step, or None
        token_bias = None if column_bias is None else column_bias[:, 0, 0, :].expand(grouped.shape[0], -1)
        return packed_decode_attention(grouped, keys, values, scaling, token_bias)
