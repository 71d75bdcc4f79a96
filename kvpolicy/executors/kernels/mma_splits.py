"""The Gluon packed-region kernel (:func:`~kvpolicy.executors.kernels.mma_device.packed_decode_mma`).

One warp per program: codes go from registers to the tensor cores' ``mma.sync`` without a
pass through shared memory. It serves the shapes of the common case (head dimension 128,
2-bit keys and values, up to 8 query heads per KV head, value groups of 32/64/128) on GPUs
with compute capability 8.0+, and is asked before the Triton kernel.
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar

import attrs
import torch

from kvpolicy.executors.kernels.common import PackedKernel, gluon_available, interpreted, split_tokens

BLOCK_TOKENS = 64  # tokens per block of its loop (at most: a key group when smaller)
SPLIT_FACTOR = 32  # programs per SM to aim for
MAX_REGISTERS: int | None = None
EXACT_KEYS = False  # subtract the key codes' offsets per code rather than once per row
STAGES = 2  # blocks in flight through shared memory (cp.async); 0: read straight into registers


@attrs.frozen
class MmaLaunch:
    """Launch settings of the Gluon kernel.

    ``splits``: programs per (row, KV head) (``None``: about ``split_factor`` per SM), each over
    a contiguous run of blocks of ``min(block_tokens, key group)`` tokens; ``stages``: blocks in
    flight through shared memory (value groups of 128 channels read straight into registers).
    """

    splits: int | None = None
    block_tokens: int = BLOCK_TOKENS
    split_factor: int = SPLIT_FACTOR
    max_registers: int | None = MAX_REGISTERS
    exact_keys: bool = EXACT_KEYS
    stages: int = STAGES


@functools.cache
def _compiled():
    from kvpolicy.executors.kernels import mma_device

    return mma_device.packed_decode_mma


class MmaSplits(PackedKernel):
    """The Gluon kernel: one partial result per program, ``P = splits``."""

    name: ClassVar[str] = "mma"
    Launch: ClassVar[type] = MmaLaunch

    @staticmethod
    def device_kernel():
        """The compiled Gluon function (a benchmark may launch an earlier copy in its place)."""
        return _compiled()

    def serves(self, grouped, keys, values) -> bool:
        return (
            grouped.is_cuda
            and not interpreted()
            and grouped.shape[-1] == 128
            and grouped.shape[-2] <= 8
            and keys.bits == 2
            and values.bits == 2
            and values.group_size in (32, 64, 128)
            and torch.cuda.get_device_capability(grouped.device) >= (8, 0)
            and gluon_available()
        )

    def splits(self, grouped, keys, values, scaling, bias, value_rows, launch: MmaLaunch):
        b, hkv, g, d = grouped.shape
        n = keys.num_tokens
        block_n = min(launch.block_tokens, keys.group_size)
        splits, tokens_per_split = split_tokens(n, block_n, b * hkv, grouped.device, launch.splits, launch.split_factor)
        out = torch.empty(b * hkv, splits, g, d, dtype=torch.float32, device=grouped.device)
        lse = torch.empty(b * hkv, splits, g, dtype=torch.float32, device=grouped.device)
        has_bias, gather = bias is not None, value_rows is not None
        registers = {"maxnreg": launch.max_registers} if launch.max_registers else {}
        self.device_kernel()[(b * hkv, splits)](
            grouped.contiguous(),
            keys.codes.contiguous().view(torch.int32), keys.scale.contiguous(), keys.zero.contiguous(),
            values.codes.contiguous().view(torch.int32), values.scale.contiguous(), values.zero.contiguous(),
            value_rows if gather else out, bias.contiguous() if has_bias else out, out, lse,
            n, values.num_tokens, hkv, g, float(scaling) * math.log2(math.e), tokens_per_split,
            KG=keys.group_size, VG=values.group_size, BLOCK_N=block_n, HAS_BIAS=has_bias, GATHER=gather,
            EXACT_KEYS=launch.exact_keys, STAGES=launch.stages if values.group_size <= 64 else 0,
            num_warps=1, **registers,
        )  # fmt: skip
        return out, lse
