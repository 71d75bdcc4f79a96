"""The Triton packed-region kernel (:func:`~kvpolicy.executors.kernels.triton_device.packed_decode`).

One program handles one (batch row, KV head) and a contiguous slice of the packed tokens:
it reads the 2, 3, 4 or 8-bit codes once, unpacks them plane by plane (see
:func:`kvpolicy.quantizers.native.pack_codes`) and keeps an online softmax for all query heads
that share the KV head (GQA without copying). Key scales are folded into the query and
value scales into the probabilities, so codes go to the matrix units as they are; nothing
is written to memory in 16-bit. It serves every :func:`~kvpolicy.executors.kernels.common.fusable`
layout (2, 3, 4 or 8 bits, any GPU Triton runs on, and Triton's CPU interpreter).
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar

import attrs
import torch

from kvpolicy.executors.kernels.common import PackedKernel, interpreted, next_power_of_2, split_tokens

# launch defaults (see benchmarks/NOTES.md for how these were chosen)
NUM_WARPS = 4
NUM_STAGES = 2
SPLIT_FACTOR = 16  # programs per SM to aim for when splitting the tokens
MAX_REGISTERS = 128  # per-thread register cap: 4 programs per SM instead of 3 (3-bit codes: none, see register_cap)
BLOCK_TOKENS = 128  # tokens per block of the kernel's loop, by default
GROUPS_PER_BLOCK_CHOICES = (1, 2, 4)  # key groups per block, each on its own rows of the tiles


def default_groups_per_block(group_size: int, heads_per_kv: int = 4) -> int:
    """Key groups per block of the kernel's loop: enough for blocks of :data:`BLOCK_TOKENS`
    tokens (4 groups of 32, 2 of 64, 1 of 128 or more), fewer where the group's rows
    (``heads_per_kv`` query heads, padded to a power of two) would not fit 16 rows."""
    rows = next_power_of_2(heads_per_kv)
    wanted = max(1, min(BLOCK_TOKENS // group_size, 16 // rows))
    return max(r for r in GROUPS_PER_BLOCK_CHOICES if r <= wanted)


def _groups_choice(instance, attribute, value) -> None:
    if value is not None and value not in GROUPS_PER_BLOCK_CHOICES:
        raise ValueError(f"groups_per_block must be one of {GROUPS_PER_BLOCK_CHOICES} or None, got {value!r}")


@attrs.frozen
class TritonLaunch:
    """Launch settings of the Triton kernel.

    ``splits``: programs per (row, KV head) (``None``: about ``split_factor`` per SM);
    ``groups_per_block``: key groups per block of the loop, each on its own rows of the tiles
    (``None``: :func:`default_groups_per_block`); ``max_registers``: per-thread cap, ``None``
    for none, or ``"auto"`` (:func:`register_cap`).
    """

    splits: int | None = None
    num_warps: int = NUM_WARPS
    num_stages: int = NUM_STAGES
    split_factor: int = SPLIT_FACTOR
    max_registers: int | None | str = "auto"
    groups_per_block: int | None = attrs.field(default=None, validator=_groups_choice)


def register_cap(launch: TritonLaunch, key_bits: int, value_bits: int) -> int | None:
    """The per-thread register cap of a launch: its own, or under ``"auto"`` :data:`MAX_REGISTERS`
    except for 3-bit keys and values, whose second byte tile per side spills under it (one
    Llama-3.1-8B layer at 32K, H100, batch 1: 0.30 ms capped, 0.25 ms not; batch 8 the same;
    ``benchmarks/results/attention_bits_h100_v2.json``)."""
    if launch.max_registers != "auto":
        return launch.max_registers
    return None if key_bits == value_bits == 3 else MAX_REGISTERS


@functools.cache
def device_kernels():
    """``(packed_decode, merge_splits, finish_decode)``, compiled on first use (Triton is imported here)."""
    from kvpolicy.executors.kernels import triton_device

    return triton_device.packed_decode, triton_device.merge_splits, triton_device.finish_decode


class TritonSplits(PackedKernel):
    """The Triton kernel: ``P = splits * groups_per_block`` partial results per (row, KV head)."""

    name: ClassVar[str] = "triton"
    Launch: ClassVar[type] = TritonLaunch

    def serves(self, grouped, keys, values) -> bool:
        return True

    def splits(self, grouped, keys, values, scaling, bias, value_rows, launch: TritonLaunch):
        b, hkv, g, d = grouped.shape
        n = keys.num_tokens
        groups_per_block = launch.groups_per_block or default_groups_per_block(keys.group_size, g)
        block_n = keys.group_size * groups_per_block
        splits, tokens_per_split = split_tokens(n, block_n, b * hkv, grouped.device, launch.splits, launch.split_factor)
        block_g = max(16, groups_per_block * next_power_of_2(g))
        out = torch.empty(b * hkv, splits * groups_per_block, g, d, dtype=torch.float32, device=grouped.device)
        lse = torch.empty(b * hkv, splits * groups_per_block, g, dtype=torch.float32, device=grouped.device)
        has_bias, gather = bias is not None, value_rows is not None
        cap = register_cap(launch, keys.bits, values.bits)
        registers = {"maxnreg": cap} if cap else {}
        device_kernels()[0][(b * hkv, splits)](
            grouped.contiguous(),
            keys.codes.contiguous(), keys.scale.contiguous(), keys.zero.contiguous(),
            values.codes.contiguous(), values.scale.contiguous(), values.zero.contiguous(),
            value_rows if gather else out, bias.contiguous() if has_bias else out, out, lse,
            n, values.num_tokens, hkv, g, float(scaling) * math.log2(math.e), tokens_per_split,
            D=d, KBITS=keys.bits, VBITS=values.bits, VG=values.group_size,
            KG=keys.group_size, BLOCK_N=block_n, BLOCK_G=block_g, HAS_BIAS=has_bias, GATHER=gather,
            FAST=not interpreted(), num_warps=launch.num_warps, num_stages=launch.num_stages, **registers,
        )  # fmt: skip
        return out, lse
