"""Fused decode attention over the packed region (Triton), split-K with a log-sum-exp merge.

One program handles one (batch row, KV head) and a contiguous slice of the packed tokens:
it reads the 2/4/8-bit codes once, unpacks them plane by plane (see
:func:`kvpolicy.backends.native.pack_codes`) and keeps an online softmax for all query heads that
share the KV head (GQA without copying). Key scales are folded into the query and value
scales into the probabilities, so codes go to the matrix units as they are; nothing is
written to memory in 16-bit. A second kernel attends the full-precision tokens and merges
everything into the step's output (:func:`decode_attention`), so a decode step costs the
host two kernel launches per layer. The kernels live in :mod:`kvpolicy.fused_kernels`,
imported only where Triton is.

Used by :class:`FusedExecutor` for decode steps (one query token) on CUDA; every other case
(CPU, prefill) goes to the chunked executor.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, ClassVar

import attrs
import torch

from kvpolicy import partial_attention as pa
from kvpolicy.backends.native import NativePacked
from kvpolicy.errors import ConfigError
from kvpolicy.executors import ChunkedExecutor, allowed_columns
from kvpolicy.quantizers import Packed

# launch configuration (see benchmarks/NOTES.md for how these were chosen)
NUM_WARPS = 4
NUM_STAGES = 2
SPLIT_FACTOR = 16  # programs per SM to aim for when splitting the tokens
MERGE_BLOCK_S = 32
MAX_REGISTERS = 128  # per-thread register cap: 4 programs per SM instead of 3
BLOCK_TOKENS = 128  # tokens per block of the kernel's loop, by default
GROUPS_PER_BLOCK_CHOICES = (1, 2, 4)  # key groups per block, each on its own rows of the tiles
FULL_PRECISION_BLOCK = 32  # full-precision tokens per block of the finishing kernel
# the Gluon kernel (kvpolicy.fused_mma): one warp per program
MMA_BLOCK_TOKENS = 64  # tokens per block of its loop (at most: a key group when smaller)
MMA_SPLIT_FACTOR = 32  # programs per SM to aim for
MMA_MAX_REGISTERS: int | None = None
MMA_EXACT_KEYS = False  # subtract the key codes' offsets per code rather than once per row
MMA_STAGES = 2  # blocks in flight through shared memory (cp.async); 0: read straight into registers
KERNELS = ("mma", "triton")


@functools.cache
def _kernels():
    from kvpolicy import fused_kernels

    return fused_kernels.packed_decode, fused_kernels.merge_splits, fused_kernels.finish_decode


@functools.cache
def _mma_kernel():
    from kvpolicy import fused_mma

    return fused_mma.packed_decode_mma


@functools.cache
def gluon_available() -> bool:
    """Whether Triton has Gluon (3.5+) with the NVIDIA ``mma_v2`` this kernel needs."""
    try:
        from triton.experimental.gluon.language.nvidia.ampere import mma_v2  # noqa: F401
    except ImportError:
        return False
    return True


def mma_fusable(grouped: torch.Tensor, keys: NativePacked, values: NativePacked) -> bool:
    """Whether the Gluon kernel (:mod:`kvpolicy.fused_mma`) serves these shapes: a CUDA device
    with ``mma.sync`` (compute capability 8.0+), head dimension 128, 2-bit keys and values, up to
    8 query heads per KV head, value groups of 32, 64 or 128 channels (keys as :func:`fusable`)."""
    return (
        grouped.is_cuda
        and not _interpreted()
        and grouped.shape[-1] == 128
        and grouped.shape[-2] <= 8
        and keys.bits == 2
        and values.bits == 2
        and values.group_size in (32, 64, 128)
        and torch.cuda.get_device_capability(grouped.device) >= (8, 0)
        and gluon_available()
    )


def default_groups_per_block(group_size: int, heads_per_kv: int = 4) -> int:
    """Key groups per block of the kernel's loop: enough for blocks of :data:`BLOCK_TOKENS`
    tokens (4 groups of 32, 2 of 64, 1 of 128 or more), fewer where the group's rows
    (``heads_per_kv`` query heads, padded to a power of two) would not fit 16 rows."""
    rows = triton_next_power_of_2(heads_per_kv)
    wanted = max(1, min(BLOCK_TOKENS // group_size, 16 // rows))
    return max(r for r in GROUPS_PER_BLOCK_CHOICES if r <= wanted)


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
    value_rows: torch.Tensor | None = None,
    **launch: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)`` of one decode step over the packed region, float32 ``[B, H_kv, G, D]`` and ``[B, H_kv, G]``.

    ``grouped``: ``[B, H_kv, G, D]`` queries; ``bias``: additive float32 ``[B, N]`` or ``None``;
    keys per-channel (``axis="channel"``), values per-token (see :func:`fusable` for the
    shapes served), in the same token order or paired by ``value_rows`` (int32 ``[N]`` on the
    device: the value row of each key, ``-1`` to leave the key out; see
    :mod:`kvpolicy.pairing`). ``launch``: the settings of :func:`packed_splits` (``splits``,
    ``num_warps``, ``groups_per_block``, ...). A second kernel merges the splits.
    """
    b, hkv, g, d = grouped.shape
    out, lse = packed_splits(grouped, keys, values, scaling, bias, value_rows, **launch)
    merged = torch.empty(b, hkv, g, d, dtype=torch.float32, device=grouped.device)
    total = torch.empty(b, hkv, g, dtype=torch.float32, device=grouped.device)
    merge = _kernels()[1]
    merge[(b * hkv,)](
        out, lse, merged, total, out.shape[1], g, D=d, BLOCK_G=triton_next_power_of_2(g), BLOCK_S=MERGE_BLOCK_S
    )
    return merged, total


def split_tokens(
    n: int, block_n: int, rows: int, device: torch.device, splits: int | None, split_factor: int
) -> tuple[int, int]:
    """``(splits, tokens per split)`` for ``n`` tokens in blocks of ``block_n`` over ``rows``
    (batch rows times KV heads): ``splits`` if given, else about ``split_factor`` programs
    per SM; every split but the last holds a whole number of blocks."""
    if splits is None:
        sms = _multiprocessors(device) if device.type == "cuda" else 8
        splits = max(1, min(triton_cdiv(n, block_n), triton_cdiv(split_factor * sms, rows)))
    tokens_per_split = triton_cdiv(triton_cdiv(n, splits), block_n) * block_n
    return triton_cdiv(n, tokens_per_split), tokens_per_split


def packed_splits(
    grouped: torch.Tensor,
    keys: NativePacked,
    values: NativePacked,
    scaling: float,
    bias: torch.Tensor | None,
    value_rows: torch.Tensor | None = None,
    splits: int | None = None,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
    split_factor: int = SPLIT_FACTOR,
    max_registers: int | None = MAX_REGISTERS,
    groups_per_block: int | None = None,
    kernel: str | None = None,
    **mma: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed region's unmerged partial results: float32 ``o`` ``[B*H_kv, P, G, D]`` and
    base-e ``lse`` ``[B*H_kv, P, G]`` (shapes as :func:`packed_decode_attention`).

    The tokens are split into blocks of ``groups_per_block`` key groups (1, 2 or 4; default:
    :func:`default_groups_per_block`); ``splits`` programs per (row, KV head) each take a
    contiguous run of blocks (default: about ``split_factor`` programs per SM). A program
    gives each of its block's key groups its own rows of the matrix-unit tiles, so it writes
    ``groups_per_block`` partial results: ``P = splits * groups_per_block``.

    ``kernel``: ``"mma"`` (:func:`mma_splits`; an error where not :func:`mma_fusable`),
    ``"triton"`` (this one's own), ``None``: ``"mma"`` where it serves the shapes, else
    ``"triton"``; ``mma``: the Gluon kernel's settings.
    """
    if kernel not in (None, *KERNELS):
        raise ValueError(f"kernel must be one of {KERNELS} or None, got {kernel!r}")
    if kernel == "mma" or (kernel is None and mma_fusable(grouped, keys, values)):
        if not mma_fusable(grouped, keys, values):
            raise ValueError("kernel='mma' does not serve these shapes (see kvpolicy.fused.mma_fusable)")
        return mma_splits(grouped, keys, values, scaling, bias, value_rows, splits=splits, **mma)
    b, hkv, g, d = grouped.shape
    n = keys.num_tokens
    if groups_per_block is None:
        groups_per_block = default_groups_per_block(keys.group_size, g)
    if groups_per_block not in GROUPS_PER_BLOCK_CHOICES:
        raise ValueError(f"groups_per_block must be one of {GROUPS_PER_BLOCK_CHOICES}, got {groups_per_block!r}")
    block_n = keys.group_size * groups_per_block
    splits, tokens_per_split = split_tokens(n, block_n, b * hkv, grouped.device, splits, split_factor)
    block_g = max(16, groups_per_block * triton_next_power_of_2(g))
    out = torch.empty(b * hkv, splits * groups_per_block, g, d, dtype=torch.float32, device=grouped.device)
    lse = torch.empty(b * hkv, splits * groups_per_block, g, dtype=torch.float32, device=grouped.device)
    has_bias, gather = bias is not None, value_rows is not None
    decode = _kernels()[0]
    decode[(b * hkv, splits)](
        grouped.contiguous(),
        keys.codes.contiguous(), keys.scale.contiguous(), keys.zero.contiguous(),
        values.codes.contiguous(), values.scale.contiguous(), values.zero.contiguous(),
        value_rows if gather else out, bias.contiguous() if has_bias else out, out, lse,
        n, values.num_tokens, hkv, g, float(scaling) * math.log2(math.e), tokens_per_split,
        D=d, KBITS=keys.bits, VBITS=values.bits, VG=values.group_size,
        KG=keys.group_size, BLOCK_N=block_n, BLOCK_G=block_g, HAS_BIAS=has_bias, GATHER=gather,
        FAST=not _interpreted(),
        num_warps=num_warps, num_stages=num_stages, **({"maxnreg": max_registers} if max_registers else {}),
    )  # fmt: skip
    return out, lse


def mma_splits(
    grouped: torch.Tensor,
    keys: NativePacked,
    values: NativePacked,
    scaling: float,
    bias: torch.Tensor | None,
    value_rows: torch.Tensor | None = None,
    splits: int | None = None,
    block_tokens: int = MMA_BLOCK_TOKENS,
    split_factor: int = MMA_SPLIT_FACTOR,
    max_registers: int | None = MMA_MAX_REGISTERS,
    exact_keys: bool = MMA_EXACT_KEYS,
    stages: int = MMA_STAGES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`packed_splits` through the Gluon kernel (:mod:`kvpolicy.fused_mma`): one warp per
    program, ``splits`` programs per (row, KV head) (default: about ``split_factor`` programs
    per SM), each over a contiguous run of blocks of ``min(block_tokens, key group)`` tokens;
    one partial result per program, ``P = splits``. ``stages``: blocks in flight through shared
    memory (``cp.async``; value groups of 128 channels read straight into registers, 0)."""
    b, hkv, g, d = grouped.shape
    n = keys.num_tokens
    block_n = min(block_tokens, keys.group_size)
    splits, tokens_per_split = split_tokens(n, block_n, b * hkv, grouped.device, splits, split_factor)
    out = torch.empty(b * hkv, splits, g, d, dtype=torch.float32, device=grouped.device)
    lse = torch.empty(b * hkv, splits, g, dtype=torch.float32, device=grouped.device)
    has_bias, gather = bias is not None, value_rows is not None
    _mma_kernel()[(b * hkv, splits)](
        grouped.contiguous(),
        keys.codes.contiguous().view(torch.int32), keys.scale.contiguous(), keys.zero.contiguous(),
        values.codes.contiguous().view(torch.int32), values.scale.contiguous(), values.zero.contiguous(),
        value_rows if gather else out, bias.contiguous() if has_bias else out, out, lse,
        n, values.num_tokens, hkv, g, float(scaling) * math.log2(math.e), tokens_per_split,
        KG=keys.group_size, VG=values.group_size, BLOCK_N=block_n, HAS_BIAS=has_bias, GATHER=gather,
        EXACT_KEYS=exact_keys, STAGES=stages if values.group_size <= 64 else 0,
        num_warps=1, **({"maxnreg": max_registers} if max_registers else {}),
    )  # fmt: skip
    return out, lse


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
    ``kernel``: the packed region's kernel (see :func:`packed_splits`). The packed region is
    split as in :func:`packed_decode_attention`; one more kernel attends the full-precision
    tokens and merges everything, so no 16-bit copy and no float32 partial result leaves the
    GPU's kernels.
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
        out, lse = packed_splits(grouped, keys, values, scaling, packed_bias, value_rows, kernel=kernel)
    else:
        out = lse = grouped  # not read: no splits
    segments = [_segment(k, v) for k, v in full_precision]
    while len(segments) < 3:
        segments.append((*segments[0][:2], 0, 0, 0, 0))
    output = torch.empty(b, 1, hq, d, dtype=query.dtype, device=query.device)
    has_bias = full_precision_bias is not None
    finish = _kernels()[2]
    finish[(b * hkv,)](
        grouped.contiguous(), *segments[0], *segments[1], *segments[2],
        full_precision_bias.contiguous() if has_bias else output, out, lse, out.shape[1] if keys is not None else 0,
        hkv, g, float(scaling) * math.log2(math.e), output,
        D=d, BLOCK_G=max(16, triton_next_power_of_2(g)), BLOCK_T=FULL_PRECISION_BLOCK, BLOCK_S=MERGE_BLOCK_S,
        HAS_BIAS=has_bias,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return output


def _segment(keys: torch.Tensor, values: torch.Tensor) -> tuple:
    """``(keys, values, n, batch stride, head stride, token stride)`` of a full-precision pair
    ``[B, H_kv, n, D]``: views are read in place when both share strides with contiguous
    channels, otherwise copied."""
    if keys.stride() != values.stride() or keys.stride(-1) != 1:
        keys, values = keys.contiguous(), values.contiguous()
    return keys, values, keys.shape[2], keys.stride(0), keys.stride(1), keys.stride(2)


def fusable(grouped: torch.Tensor, keys: Packed, values: Packed, paired_by_rows: bool = False) -> bool:
    """Whether :func:`packed_decode_attention` serves these shapes: native packing, keys
    per-channel in groups of 16 tokens or more (powers of two), values per-token, a
    power-of-two head dimension, at least 16 bytes of codes per token row, and as many keys
    as values unless they are ``paired_by_rows``."""
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
        and (paired_by_rows or keys.num_tokens == values.num_tokens)
    )


def _power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_next_power_of_2(x: int) -> int:
    return 1 << (x - 1).bit_length()


KERNEL_CHOICES = ("auto", *KERNELS)


def _kernel_choice(instance, attribute, value) -> None:
    if value not in KERNEL_CHOICES:
        raise ConfigError("executor.kernel", value, " | ".join(KERNEL_CHOICES))


@attrs.define
class FusedExecutor(ChunkedExecutor):
    """Decode steps read the packed bytes directly in Triton/Gluon kernels (CUDA); the rest is chunked.

    A decode step is two kernels: :func:`packed_splits` over the packed region and one that
    attends the full-precision tokens (kept, staged, new) and merges both into the output
    (:func:`decode_attention`). Supports the native backend with keys per-channel and values
    per-token (KIVI's layout), 2/4/8 bits, key groups of 16 tokens or more, value groups that
    divide the head dimension, bf16/fp16/fp32 (see :func:`fusable`). Keys and values stored in
    different orders are paired first (:mod:`kvpolicy.pairing`): the kernel reads each packed
    key's value row where it is. Multi-token steps, CPU tensors and shapes the kernels do not
    serve go to the chunked executor's path.

    ``kernel``: the packed region's kernel: ``auto`` (Gluon where it serves the shapes, see
    :func:`mma_fusable`, else Triton), ``mma`` (Gluon only) or ``triton``.
    """

    name: ClassVar[str] = "fused"
    kernel: str = attrs.field(
        default="auto",
        validator=_kernel_choice,
        metadata={"doc": "packed-region kernel of decode steps: `auto`, `mma` (Gluon) or `triton`"},
    )

    def kernels_serve(self, query: torch.Tensor) -> bool:
        """Whether this step's tensors may go to the kernels at all (device and Triton)."""
        return (query.is_cuda or _interpreted()) and triton_available()

    def attend_regions(self, query, regions, step, attention_mask, scaling):
        keys, values = regions.packed_keys, regions.packed_values
        paired_by_rows = regions.value_rows is not None
        if not (
            query.shape[2] == 1
            and self.kernels_serve(query)
            and _power_of_two(query.shape[-1])
            and query.shape[-1] >= 16  # the matrix units' smallest inner dimension
            and step.new_values.shape[-1] == query.shape[-1]  # the kernels read keys and values of one head size
            and (keys is None or fusable(query, keys, values, paired_by_rows))
        ):
            return super().attend_regions(query, regions, step, attention_mask, scaling)
        b, _, _, d = query.shape
        scaling = scaling if scaling is not None else d**-0.5
        full = [*regions.full_precision, (step.new_keys, step.new_values)]
        fp_bias = packed_bias = None
        if attention_mask is not None:
            past = step.past_length
            fp_pos = torch.cat([regions.full_precision_pos, torch.tensor([past], dtype=torch.int32)])
            fp_bias = token_bias(pa.group_bias(allowed_columns(attention_mask, fp_pos, past, 1, query.device), 1), b)
            if keys is not None:
                allowed = allowed_columns(attention_mask, regions.packed_pos, past, 1, query.device)
                packed_bias = token_bias(pa.group_bias(allowed, 1), b)
        value_rows = regions.value_rows_on(query.device)
        kernel = None if self.kernel == "auto" else self.kernel
        return decode_attention(query, full, keys, values, scaling, fp_bias, packed_bias, value_rows, kernel)


@attrs.define
class FusedTritonExecutor(FusedExecutor):
    """The fused executor with the Triton kernel by default (``fused`` with ``kernel: triton``).

    Kept as a name of its own for configs written before executors took parameters."""

    name: ClassVar[str] = "fused-triton"
    kernel: str = attrs.field(default="triton", validator=_kernel_choice, metadata={"doc": "as `fused`"})


@attrs.define
class AutoExecutor(FusedExecutor):
    """The default: the fused kernels on CUDA where they serve the step, else the chunked path.

    The chunked path serves CPU tensors, multi-token steps and shapes the kernels do not;
    unlike ``fused`` it never runs Triton's CPU interpreter."""

    name: ClassVar[str] = "auto"

    def kernels_serve(self, query: torch.Tensor) -> bool:
        return query.is_cuda and triton_available()

    @staticmethod
    def resolves_to(device: str | torch.device | None = None) -> str:
        """What ``auto`` runs on ``device`` (default: the first CUDA device if any, else CPU)."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type != "cuda":
            return f"chunked (device {device.type}: no fused kernels)"
        if not triton_available():
            return "chunked (CUDA without Triton: install triton for the fused kernels)"
        name = torch.cuda.get_device_name(device)
        gluon = gluon_available() and torch.cuda.get_device_capability(device) >= (8, 0)
        kernel = "Gluon where it serves the shapes, else Triton" if gluon else "Triton"
        return f"fused on {name} ({kernel}); multi-token steps chunked through SDPA kernels"


def token_bias(column_bias: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """A decode step's additive bias ``[B or 1, 1, R, n]`` (every row alike, see
    :func:`kvpolicy.partial_attention.group_bias`) -> ``[B, n]``, as the kernels read it."""
    return None if column_bias is None else column_bias[:, 0, 0, :].expand(batch, -1)
