"""A decode step in kernels: the packed region by the first kernel that serves it, then one
Triton kernel that attends the full-precision tokens and merges everything (log-sum-exp), so
a decode step costs the host two launches per layer and no 16-bit copy of the cache."""

from __future__ import annotations

import math

import torch

from kvpolicy.executors.kernels.common import PackedKernel, next_power_of_2
from kvpolicy.executors.kernels.mma_splits import MmaSplits
from kvpolicy.executors.kernels.triton_splits import NUM_WARPS, TritonSplits, device_kernels
from kvpolicy.quantizers.native import NativePacked

#: the packed-region kernels, asked in this order whether they serve a step (adding a
#: kernel: one module with a :class:`PackedKernel`, and its entry here)
PACKED_KERNELS: tuple[PackedKernel, ...] = (MmaSplits(), TritonSplits())
KERNEL_NAMES = tuple(k.name for k in PACKED_KERNELS)
_BY_NAME = {k.name: k for k in PACKED_KERNELS}
MERGE_BLOCK_S = 32  # partial results merged at a time
FULL_PRECISION_BLOCK = 32  # full-precision tokens per block of the finishing kernel


def choose_kernel(grouped: torch.Tensor, keys: NativePacked, values: NativePacked, kernel: str | None) -> PackedKernel:
    """The kernel named ``kernel`` (an error where it does not serve these tensors), or with
    ``None`` the first of :data:`PACKED_KERNELS` that serves them."""
    if kernel is None:
        return next(k for k in PACKED_KERNELS if k.serves(grouped, keys, values))
    if kernel not in _BY_NAME:
        raise ValueError(f"kernel must be one of {KERNEL_NAMES} or None, got {kernel!r}")
    chosen = _BY_NAME[kernel]
    if not chosen.serves(grouped, keys, values):
        raise ValueError(f"kernel={kernel!r} does not serve these shapes (see {type(chosen).__name__}.serves)")
    return chosen


def launch_settings(kernel: str, **settings):
    """The launch settings of the kernel named ``kernel`` (its ``Launch`` class) from keyword
    arguments, e.g. ``launch_settings("triton", num_warps=8)`` (sweeps and tests)."""
    if kernel not in _BY_NAME:
        raise ValueError(f"kernel must be one of {KERNEL_NAMES}, got {kernel!r}")
    return _BY_NAME[kernel].Launch(**settings)


def packed_splits(
    grouped: torch.Tensor,
    keys: NativePacked,
    values: NativePacked,
    scaling: float,
    bias: torch.Tensor | None,
    value_rows: torch.Tensor | None = None,
    kernel: str | None = None,
    launch=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed region's unmerged partial results: float32 ``o`` ``[B*H_kv, P, G, D]`` and
    base-e ``lse`` ``[B*H_kv, P, G]`` (shapes as :func:`packed_decode_attention`).

    ``kernel``: a name of :data:`KERNEL_NAMES`, or ``None`` for the first that serves (see
    :func:`choose_kernel`); ``launch``: that kernel's launch settings (its ``Launch`` class;
    ``None``: the defaults).
    """
    chosen = choose_kernel(grouped, keys, values, kernel)
    if launch is None:
        launch = chosen.Launch()
    elif not isinstance(launch, chosen.Launch):
        raise TypeError(f"the {chosen.name!r} kernel takes {chosen.Launch.__name__} settings, got {launch!r}")
    return chosen.splits(grouped, keys, values, scaling, bias, value_rows, launch)


def packed_decode_attention(
    grouped: torch.Tensor,
    keys: NativePacked,
    values: NativePacked,
    scaling: float,
    bias: torch.Tensor | None,
    value_rows: torch.Tensor | None = None,
    kernel: str | None = None,
    launch=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)`` of one decode step over the packed region, float32 ``[B, H_kv, G, D]`` and ``[B, H_kv, G]``.

    ``grouped``: ``[B, H_kv, G, D]`` queries; ``bias``: additive float32 ``[B, N]`` or ``None``;
    keys per-channel (``axis="channel"``), values per-token (see
    :func:`~kvpolicy.executors.kernels.common.fusable`), in the same token order or paired by
    ``value_rows`` (int32 ``[N]`` on the device: the value row of each key, ``-1`` to leave the
    key out; see :mod:`kvpolicy.executors.pairing`). ``kernel``, ``launch``: as
    :func:`packed_splits`. A second kernel merges the splits.
    """
    b, hkv, g, d = grouped.shape
    out, lse = packed_splits(grouped, keys, values, scaling, bias, value_rows, kernel, launch)
    merged = torch.empty(b, hkv, g, d, dtype=torch.float32, device=grouped.device)
    total = torch.empty(b, hkv, g, dtype=torch.float32, device=grouped.device)
    device_kernels()[1][(b * hkv,)](
        out, lse, merged, total, out.shape[1], g, D=d, BLOCK_G=next_power_of_2(g), BLOCK_S=MERGE_BLOCK_S
    )
    return merged, total


def decode_attention(
    query: torch.Tensor,
    full_precision: list[tuple[torch.Tensor, torch.Tensor]],
    keys: NativePacked | None,
    values: NativePacked | None,
    scaling: float,
    full_precision_bias: torch.Tensor | None = None,
    packed_bias: torch.Tensor | None = None,
    value_rows: torch.Tensor | None = None,
    kernel: str | None = None,
) -> torch.Tensor:
    """One decode step's attention output ``[B, 1, H_q, D]`` in ``query``'s dtype.

    ``query``: ``[B, H_q, 1, D]``; ``full_precision``: up to three ``(keys, values)`` pairs of
    ``[B, H_kv, n_i, D]`` (kept, staged and new tokens: any order, they are one set);
    ``keys``/``values``: the packed region or ``None``; biases: additive float32 ``[B, Σ n_i]``
    over the full-precision tokens in that order and ``[B, N]`` over the packed ones, or ``None``;
    ``value_rows``: pairs packed keys with value rows (see :func:`packed_decode_attention`);
    ``kernel``: the packed region's kernel (see :func:`packed_splits`). One more kernel attends
    the full-precision tokens and merges everything, so no 16-bit copy and no float32 partial
    result leaves the GPU's kernels.
    """
    b, hq, q, d = query.shape
    if q != 1 or len(full_precision) > 3:
        raise ValueError(
            "decode_attention takes one query token and at most 3 full-precision pairs, "
            f"got {q} and {len(full_precision)}"
        )
    hkv = full_precision[0][0].shape[1]
    g = hq // hkv
    grouped = query.reshape(b, hkv, g, d)
    if keys is not None:
        out, lse = packed_splits(grouped, keys, values, scaling, packed_bias, value_rows, kernel)
    else:
        out = lse = grouped  # not read: no splits
    segments = [_segment(k, v) for k, v in full_precision]
    while len(segments) < 3:
        segments.append((*segments[0][:2], 0, 0, 0, 0))
    output = torch.empty(b, 1, hq, d, dtype=query.dtype, device=query.device)
    has_bias = full_precision_bias is not None
    device_kernels()[2][(b * hkv,)](
        grouped.contiguous(), *segments[0], *segments[1], *segments[2],
        full_precision_bias.contiguous() if has_bias else output, out, lse, out.shape[1] if keys is not None else 0,
        hkv, g, float(scaling) * math.log2(math.e), output,
        D=d, BLOCK_G=max(16, next_power_of_2(g)), BLOCK_T=FULL_PRECISION_BLOCK, BLOCK_S=MERGE_BLOCK_S,
        HAS_BIAS=has_bias, num_warps=NUM_WARPS,
    )  # fmt: skip
    return output


def _segment(keys: torch.Tensor, values: torch.Tensor) -> tuple:
    """``(keys, values, n, batch stride, head stride, token stride)`` of a full-precision pair
    ``[B, H_kv, n, D]``: views are read in place when both share strides with contiguous
    channels, otherwise copied."""
    if keys.stride() != values.stride() or keys.stride(-1) != 1:
        keys, values = keys.contiguous(), values.contiguous()
    return keys, values, keys.shape[2], keys.stride(0), keys.stride(1), keys.stride(2)
