"""Fused decode attention over the packed region (Triton), split-K with a log-sum-exp merge.

One program handles one (batch row, KV head) and a contiguous slice of the packed tokens:
it reads the 2/4/8-bit codes once, unpacks them plane by plane (see
:func:`kvpolicy.quantizers.pack_codes`) and keeps an online softmax for all query heads that
share the KV head (GQA without copying). Key scales are folded into the query and value
scales into the probabilities, so codes go to the matrix units as they are; nothing is
written to memory in 16-bit. A second kernel merges the slices; the executor merges that
with the full-precision region's result (:mod:`kvpolicy.partial_attention`). The kernels
live in :mod:`kvpolicy.fused_kernels`, imported only where Triton is.

Used by :class:`FusedExecutor` for decode steps (one query token) on CUDA; every other case
(CPU, prefill, keys and values stored in different orders) goes to the chunked executor.
"""

from __future__ import annotations

import functools
import math
import os
from typing import ClassVar

import torch

from kvpolicy.executors import ChunkedExecutor
from kvpolicy.quantizers import NativePacked, Packed

# launch configuration (see benchmarks/NOTES.md for how these were chosen)
NUM_WARPS = 4
NUM_STAGES = 2
SPLIT_FACTOR = 16  # programs per SM to aim for when splitting the tokens
MERGE_BLOCK_S = 32
MAX_REGISTERS = 128  # per-thread register cap: 4 programs per SM instead of 3
GROUPS_PER_BLOCK = 2  # key groups (of up to 64 tokens) per block of the kernel's loop


@functools.cache
def _kernels():
    from kvpolicy import fused_kernels

    return fused_kernels.packed_decode, fused_kernels.merge_splits


def default_groups_per_block(group_size: int) -> int:
    """Key groups per block of the kernel's loop: two for groups of up to 64 tokens, else one."""
    return GROUPS_PER_BLOCK if group_size <= 64 else 1


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (asked once: this runs every decode step)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter, which cannot run PTX."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
    split_factor: int = SPLIT_FACTOR,
    max_registers: int | None = MAX_REGISTERS,
    groups_per_block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)`` of one decode step over the packed region, float32 ``[B, H_kv, G, D]`` and ``[B, H_kv, G]``.

    ``grouped``: ``[B, H_kv, G, D]`` queries; ``bias``: additive float32 ``[B, N]`` or ``None``;
    keys per-channel (``axis="channel"``), values per-token, same token order (see
    :func:`fusable` for the shapes served). The tokens are split into blocks of
    ``groups_per_block`` key groups (1 or 2; default: 2 for groups of up to 64 tokens);
    ``splits`` programs per (row, KV head) each take a contiguous run of blocks, and a second
    kernel merges their partial results.
    """
    b, hkv, g, d = grouped.shape
    n = keys.num_tokens
    if groups_per_block is None:
        groups_per_block = default_groups_per_block(keys.group_size)
    if groups_per_block not in (1, 2):
        raise ValueError(f"groups_per_block must be 1 or 2, got {groups_per_block!r}")
    block_n = keys.group_size * groups_per_block
    if splits is None:
        sms = _multiprocessors(grouped.device) if grouped.is_cuda else 8
        splits = max(1, min(triton_cdiv(n, block_n), triton_cdiv(split_factor * sms, b * hkv)))
    tokens_per_split = triton_cdiv(triton_cdiv(n, splits), block_n) * block_n
    splits = triton_cdiv(n, tokens_per_split)
    block_g = max(16, triton_next_power_of_2(g))
    out = torch.empty(b * hkv, splits, g, d, dtype=torch.float32, device=grouped.device)
    lse = torch.empty(b * hkv, splits, g, dtype=torch.float32, device=grouped.device)
    has_bias = bias is not None
    decode, merge = _kernels()
    decode[(b * hkv, splits)](
        grouped.contiguous(),
        keys.codes.contiguous(), keys.scale.contiguous(), keys.zero.contiguous(),
        values.codes.contiguous(), values.scale.contiguous(), values.zero.contiguous(),
        bias.contiguous() if has_bias else out, out, lse,
        n, hkv, g, float(scaling) * math.log2(math.e), tokens_per_split,
        D=d, KBITS=keys.bits, VBITS=values.bits, VG=values.group_size,
        KG=keys.group_size, BLOCK_N=block_n, BLOCK_G=block_g, HAS_BIAS=has_bias, FAST=not _interpreted(),
        num_warps=num_warps, num_stages=num_stages, **({"maxnreg": max_registers} if max_registers else {}),
    )  # fmt: skip
    merged = torch.empty(b, hkv, g, d, dtype=torch.float32, device=grouped.device)
    total = torch.empty(b, hkv, g, dtype=torch.float32, device=grouped.device)
    merge[(b * hkv,)](out, lse, merged, total, splits, g, D=d, BLOCK_G=triton_next_power_of_2(g), BLOCK_S=MERGE_BLOCK_S)
    return merged, total


def fusable(grouped: torch.Tensor, keys: Packed, values: Packed) -> bool:
    """Whether :func:`packed_decode_attention` serves these shapes: native packing, keys
    per-channel in groups of 16 tokens or more (powers of two), values per-token, a
    power-of-two head dimension and at least 16 bytes of codes per token row."""
    if not (isinstance(keys, NativePacked) and isinstance(values, NativePacked)):
        return False
    d = grouped.shape[-1]
    return (
        keys.axis == "channel"
        and values.axis == "token"
        and _power_of_two(d)
        and d * keys.bits // 8 >= 16
        and d * values.bits // 8 >= 16
        and _power_of_two(keys.group_size)
        and keys.group_size >= 16
        and keys.num_tokens == values.num_tokens
    )


def _power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_next_power_of_2(x: int) -> int:
    return 1 << (x - 1).bit_length()


class FusedExecutor(ChunkedExecutor):
    """Decode steps read the packed bytes directly in a Triton kernel (CUDA); the rest is chunked.

    Supports the native backend with keys per-channel and values per-token (KIVI's layout),
    2/4/8 bits, key groups of 16 tokens or more, value groups that divide the head dimension,
    bf16/fp16/fp32 (see :func:`fusable`).
    """

    name: ClassVar[str] = "fused"

    def packed_attention(self, grouped, keys, values, positions, scaling, bias, q):
        if not (q == 1 and grouped.is_cuda and fusable(grouped, keys, values) and triton_available()):
            return super().packed_attention(grouped, keys, values, positions, scaling, bias, q)
        column_bias = bias(positions)  # [B or 1, 1, G, n] for a decode step, or None
        token_bias = None if column_bias is None else column_bias[:, 0, 0, :].expand(grouped.shape[0], -1)
        return packed_decode_attention(grouped, keys, values, scaling, token_bias)
