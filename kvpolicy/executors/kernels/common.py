"""What every packed-region kernel shares: the contract, the layout they read, host helpers.

A packed-region kernel attends one decode step's query over the packed tokens and returns
unmerged partial results, one per slice of tokens (split-K), which
:func:`kvpolicy.executors.kernels.decode.decode_attention` merges with the full-precision
tokens by log-sum-exp. Each kernel is one module holding a :class:`PackedKernel` (can it
serve these tensors? launch it) and its typed launch settings; the executor asks the
kernels of :data:`kvpolicy.executors.kernels.PACKED_KERNELS` in order.
"""

from __future__ import annotations

import functools
import os
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from kvpolicy.quantizers import Packed
from kvpolicy.quantizers.native import NativePacked
from kvpolicy.quantizers.rotation import power_of_two


class PackedKernel(ABC):
    """One kernel for a decode step's packed region (see the module docstring)."""

    #: how configs and ``packed_splits(kernel=...)`` name it
    name: ClassVar[str]
    #: its launch settings (an attrs class whose every field has a default)
    Launch: ClassVar[type]

    @abstractmethod
    def serves(self, grouped: torch.Tensor, keys: NativePacked, values: NativePacked) -> bool:
        """Whether it runs these tensors (already known to be :func:`fusable`)."""

    @abstractmethod
    def splits(
        self,
        grouped: torch.Tensor,
        keys: NativePacked,
        values: NativePacked,
        scaling: float,
        bias: torch.Tensor | None,
        value_rows: torch.Tensor | None,
        launch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 ``o`` ``[B*H_kv, P, G, D]`` and base-e ``lse`` ``[B*H_kv, P, G]``: ``P``
        partial results per (row, KV head), for ``grouped`` queries ``[B, H_kv, G, D]``."""


#: code widths the packed-region kernels read (3 bits: a 2-bit and a 1-bit plane)
KERNEL_BITS = (2, 3, 4, 8)


def plane_bytes(d: int, bits: int) -> int:
    """Bytes of a token row's codes one plane tile covers (3 bits: the 2-bit plane's)."""
    return d * (2 if bits == 3 else bits) // 8


def fusable(grouped: torch.Tensor, keys: Packed, values: Packed, paired_by_rows: bool = False) -> bool:
    """Whether the packed region is in the layout the kernels read: native packing of 2, 3, 4
    or 8 bits, keys per-channel in groups of 16 tokens or more (powers of two), values
    per-token, a power-of-two head dimension, at least 16 bytes of codes per plane tile of a
    token row (3-bit codes: head size 128 or more, so that their 1-bit plane has 16 bytes),
    and as many keys as values unless they are ``paired_by_rows``."""
    if not (isinstance(keys, NativePacked) and isinstance(values, NativePacked)):
        return False
    d = grouped.shape[-1]
    return (
        keys.axis == "channel"
        and values.axis == "token"
        and keys.bits in KERNEL_BITS
        and values.bits in KERNEL_BITS
        and power_of_two(d)
        and plane_bytes(d, keys.bits) >= 16
        and plane_bytes(d, values.bits) >= 16
        and (3 not in (keys.bits, values.bits) or d >= 128)  # 3 bits: a 1-bit plane of 16 bytes or more
        and power_of_two(keys.group_size)
        and keys.group_size >= 16
        and (paired_by_rows or keys.num_tokens == values.num_tokens)
    )


def decode_fusable(
    query: torch.Tensor, value_head_dim: int, keys: Packed | None, values: Packed | None, paired_by_rows: bool = False
) -> bool:
    """Whether :func:`~kvpolicy.executors.kernels.decode.decode_attention` serves a decode step
    of ``query`` ``[B, H_q, 1, D]`` (any device; the caller checks it): one query token, a
    power-of-two head size of 16 or more (the matrix units' smallest inner dimension) that keys
    and values share, and no packed region or one the kernels read (:func:`fusable`). Asked by
    the fused executor at each step and by the CUDA-graph buffers once, at adoption."""
    d = query.shape[-1]
    return (
        query.shape[2] == 1
        and power_of_two(d)
        and d >= 16
        and value_head_dim == d
        and (keys is None or fusable(query, keys, values, paired_by_rows))
    )


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def gluon_available() -> bool:
    """Whether Triton has Gluon (3.5+) with the NVIDIA ``mma_v2`` the Gluon kernel needs."""
    try:
        from triton.experimental.gluon.language.nvidia.ampere import mma_v2  # noqa: F401
    except ImportError:
        return False
    return True


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter, which cannot run PTX."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (asked once: this runs every decode step)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_tokens(
    n: int, block_n: int, rows: int, device: torch.device, splits: int | None, split_factor: int
) -> tuple[int, int]:
    """``(splits, tokens per split)`` for ``n`` tokens in blocks of ``block_n`` over ``rows``
    (batch rows times KV heads): ``splits`` if given, else about ``split_factor`` programs
    per SM; every split but the last holds a whole number of blocks."""
    if splits is None:
        sms = multiprocessors(device) if device.type == "cuda" else 8
        splits = max(1, min(cdiv(n, block_n), cdiv(split_factor * sms, rows)))
    tokens_per_split = cdiv(cdiv(n, splits), block_n) * block_n
    return cdiv(n, tokens_per_split), tokens_per_split


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(x: int) -> int:
    return 1 << (x - 1).bit_length()
