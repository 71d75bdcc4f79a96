"""The native backend: pure-torch asymmetric quantization with real bit-packing.

One scale and one zero (the low end of the group's range) per group, codes bit-packed into
``uint8`` along the head dimension (four 2-bit codes per byte, in planes: see
:func:`pack_codes`; 3-bit codes as a 2-bit and a 1-bit plane, no bit wasted); the format the
fused GPU kernels read (2, 4 and 8 bits; 3-bit codes are read by the chunked and reference
executors, and the fused kernels decline them). The range is the group's min and
max (``options: {fit: minmax}``, the default) or, with ``fit: mse``, each end pulled towards
the group's mean by the factors of :data:`MSE_SHRINK` chosen per group for the least squared
error (:func:`mse_range`): a few extreme values no longer widen every step of a 2-bit grid.
The stored format, and so the kernels, are the same either way.

* ``axis="token"`` (per-token, values): scale/zero shape ``[B, H, n, D // group_size]``.
* ``axis="channel"`` (per-channel, keys): scale/zero shape ``[B, H, n // group_size, D]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import attrs
import torch

from kvpolicy.config import ROTATIONS, QuantSpec
from kvpolicy.errors import ConfigError
from kvpolicy.quantizers import BackendOption, QuantizerBackend
from kvpolicy.quantizers.rotation import power_of_two, rotate, rotate_back, rotation_for
from kvpolicy.transfer import to_device

#: what ``quant.rotate`` is once resolved for a layer (``auto`` becomes one of them)
RESOLVED_ROTATIONS = ("none", "hadamard")

#: code widths that are split into planes of widths dividing 8 (``3 = 2 + 1``)
SPLIT_BITS = {3: (2, 1)}


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last dim into uint8: ``d * bits // 8``
    bytes per row of ``d`` codes.

    Planar layout: with ``W = d * bits // 8`` bytes, byte ``j`` holds channels ``j, j + W,
    j + 2W, ...`` at bit offsets ``0, bits, 2 * bits, ...``. Unpacking the ``i``-th code of every
    byte of a row therefore yields the contiguous channels ``i*W .. (i+1)*W - 1``, which is
    what lets the fused kernel work on whole channel slices without reordering.

    A width that does not divide 8 (3 bits) is stored as bit planes (:data:`SPLIT_BITS`): the
    low 2 bits of every code packed as 2-bit codes (``d // 4`` bytes), then the high bit as
    1-bit codes (``d // 8`` bytes), each plane in the layout above.
    """
    if bits in SPLIT_BITS:
        low, high = SPLIT_BITS[bits]
        codes = codes.to(torch.uint8)
        return torch.cat([pack_codes(codes & ((1 << low) - 1), low), pack_codes(codes >> low, high)], dim=-1)
    per_byte = 8 // bits
    *lead, d = codes.shape
    planes = codes.to(torch.uint8).reshape(*lead, per_byte, d // per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (planes << shifts[:, None]).sum(dim=-2, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`; returns uint8 codes, ``packed.shape[-1] * 8 // bits`` per row."""
    if bits in SPLIT_BITS:
        low, high = SPLIT_BITS[bits]
        d = packed.shape[-1] * 8 // bits
        low_bytes = d * low // 8
        return unpack_codes(packed[..., :low_bytes], low) | (unpack_codes(packed[..., low_bytes:], high) << low)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    planes = (packed.unsqueeze(-2) >> shifts[:, None]) & mask
    return planes.reshape(*packed.shape[:-1], packed.shape[-1] * (8 // bits))


@attrs.frozen
class NativePacked:
    """Bit-packed codes plus per-group scale and zero (the group minimum)."""

    codes: torch.Tensor  # uint8 [B, H, n, D * bits // 8]
    scale: torch.Tensor  # [B, H, n, D // G] (token axis) or [B, H, n // G, D] (channel axis)
    zero: torch.Tensor  # same shape as scale
    bits: int
    group_size: int
    axis: str
    #: ``[D, D]`` float32 matrix the tokens were rotated by before packing (``quant.rotate:
    #: hadamard``; :mod:`kvpolicy.quantizers.rotation`), shared by every block of a store; the
    #: codes hold ``x @ rotation``, and dequantizing rotates back. ``None``: unrotated.
    rotation: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[-2]

    def dequantize(self) -> torch.Tensor:
        return rotate_back(self.dequantize_stored(), self.rotation)

    def dequantize_stored(self) -> torch.Tensor:
        """The tokens as the codes hold them, ``[B, H, n, D]``: rotated where :attr:`rotation` is
        set (what a step in the rotated space reads), else what :meth:`dequantize` returns."""
        # arithmetic in float32, one rounding to the cache dtype at the end
        codes = unpack_codes(self.codes, self.bits).float()
        scale, zero = self.scale.float(), self.zero.float()
        b, h, n, d = codes.shape
        g = self.group_size
        if self.axis == "token":
            grouped = codes.reshape(b, h, n, d // g, g)
            out = grouped * scale.unsqueeze(-1) + zero.unsqueeze(-1)
        else:
            grouped = codes.reshape(b, h, n // g, g, d)
            out = grouped * scale.unsqueeze(-2) + zero.unsqueeze(-2)
        return out.reshape(b, h, n, d).to(self.scale.dtype)

    def nbytes(self) -> dict[str, int]:  # the rotation is one shared matrix per device, not per token
        scales = self.scale.numel() * self.scale.element_size() + self.zero.numel() * self.zero.element_size()
        return {"codes": self.codes.numel() * self.codes.element_size(), "scales": scales}

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> NativePacked:
        return attrs.evolve(self, codes=fn(self.codes), scale=fn(self.scale), zero=fn(self.zero))

    def concat_batch(self, others: list[NativePacked]) -> NativePacked:
        blocks = [self, *others]
        return attrs.evolve(self, **{k: torch.cat([getattr(b, k) for b in blocks]) for k in ("codes", "scale", "zero")})

    def slice_tokens(self, start: int, stop: int) -> NativePacked:
        a, b = (start, stop) if self.axis == "token" else (start // self.group_size, stop // self.group_size)
        return attrs.evolve(
            self, codes=self.codes[:, :, start:stop], scale=self.scale[:, :, a:b], zero=self.zero[:, :, a:b]
        )

    def dequantize_tokens(self, index: torch.Tensor) -> torch.Tensor:
        return rotate_back(self._dequantize_tokens(index), self.rotation)

    def allocate(self, capacity: int) -> NativePacked:
        """A zeroed block of ``capacity`` tokens in this block's layout (batch, heads, bits,
        groups, rotation): buffers that :meth:`write` and :meth:`write_rows` fill in place."""
        b, h, _, width = self.codes.shape
        scale_rows = capacity // self.group_size if self.axis == "channel" else capacity
        codes = self.codes.new_zeros(b, h, capacity, width)
        scale = self.scale.new_zeros(b, h, scale_rows, self.scale.shape[-1])
        return attrs.evolve(self, codes=codes, scale=scale, zero=torch.zeros_like(scale))

    def write(self, block: NativePacked, offset: int) -> None:
        """Copy ``block`` (this layout) in place at token ``offset`` (a multiple of a per-channel group)."""
        n = block.num_tokens
        self.codes[:, :, offset : offset + n].copy_(block.codes)
        start = offset // self.group_size if self.axis == "channel" else offset
        rows = block.scale.shape[2]
        self.scale[:, :, start : start + rows].copy_(block.scale)
        self.zero[:, :, start : start + rows].copy_(block.zero)

    def write_rows(self, src: NativePacked, src_index: torch.Tensor, dst_index: torch.Tensor) -> None:
        """Per-token rows ``src_index`` of ``src`` into rows ``dst_index`` of this block, in place
        (int64 on the device; per-token groups only)."""
        for name in ("codes", "scale", "zero"):
            getattr(self, name).index_copy_(2, dst_index, getattr(src, name).index_select(2, src_index))

    def _dequantize_tokens(self, index: torch.Tensor) -> torch.Tensor:
        # a token's codes are one row; its scale and zero are its own row (per-token groups)
        # or its group's row (per-channel groups)
        rows = to_device(index, self.codes.device)
        groups = rows if self.axis == "token" else torch.div(rows, self.group_size, rounding_mode="floor")
        codes = unpack_codes(self.codes.index_select(2, rows), self.bits).float()
        scale, zero = self.scale.index_select(2, groups).float(), self.zero.index_select(2, groups).float()
        if self.axis == "token":
            b, h, n, d = codes.shape
            grouped = codes.reshape(b, h, n, d // self.group_size, self.group_size)
            out = (grouped * scale.unsqueeze(-1) + zero.unsqueeze(-1)).reshape(b, h, n, d)
        else:
            out = codes * scale + zero
        return out.to(self.scale.dtype)


#: the factors ``fit: mse`` tries for each end of a group's range (1: the min or max itself)
MSE_SHRINK = (1.0, 0.85, 0.7, 0.55)
FITS = ("minmax", "mse")


def mse_range(work: torch.Tensor, dim: int, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` per group of ``work`` (float32, groups along ``dim``, kept as size 1): the
    pair among min/max pulled towards the mean by :data:`MSE_SHRINK` (each end on its own) whose
    ``levels``-step uniform grid reconstructs the group with the least squared error."""
    lo, hi = work.amin(dim=dim, keepdim=True), work.amax(dim=dim, keepdim=True)
    mean = work.mean(dim=dim, keepdim=True)
    best_lo, best_hi, best_err = lo, hi, None
    for lo_shrink in MSE_SHRINK:
        for hi_shrink in MSE_SHRINK:
            low, high = mean + (lo - mean) * lo_shrink, mean + (hi - mean) * hi_shrink
            step = ((high - low) / levels).clamp_min(torch.finfo(torch.float32).tiny)
            err = (((work - low) / step).round().clamp(0, levels) * step + low - work).square().sum(dim, keepdim=True)
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best_lo, best_hi = torch.where(better, low, best_lo), torch.where(better, high, best_hi)
            best_err = torch.where(better, err, best_err)
    return best_lo, best_hi


class NativeQuantizer(QuantizerBackend):
    """Pure-torch asymmetric quantization with real bit-packing (2, 3, 4 or 8 bits); each group's
    range is its min/max or, with ``fit: mse``, the least-squared-error range (:func:`mse_range`)."""

    name: ClassVar[str] = "native"
    supported_bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 8)
    rotations: ClassVar[tuple[str, ...]] = ROTATIONS
    options: ClassVar[dict[str, BackendOption]] = {
        "fit": BackendOption(
            "minmax",
            lambda v: v in FITS,
            " | ".join(FITS),
            "each group's range: `minmax` (its min and max) or `mse` (each end pulled towards the mean, the pair "
            "with the least squared error: lower error at 2 bits, the same format and kernels, slower to quantize)",
        )
    }

    def validate(self, spec: QuantSpec, head_dim: int, section: str) -> None:
        super().validate(spec, head_dim, section)
        if spec.rotate == "hadamard" and not power_of_two(head_dim):
            raise ConfigError(
                f"{section}.rotate",
                "hadamard",
                f"none for this model: a Hadamard rotation needs a power-of-two head_dim (it is {head_dim})",
            )
        per_row = 8 if spec.bits in SPLIT_BITS else 8 // spec.bits  # codes a packed row's unit holds
        if head_dim % per_row:
            raise ConfigError("head_dim", head_dim, f"a multiple of {per_row} to pack {spec.bits}-bit codes")

    #: float32 working bytes per slice of batch rows that :meth:`quantize` works on at a time:
    #: a long prefill's transient memory stays this small instead of several times its size
    slice_bytes: ClassVar[int] = 256 << 20

    def quantize(self, x: torch.Tensor, spec: QuantSpec) -> NativePacked:
        b, h, n, d = x.shape
        if spec.axis == "channel" and n % spec.group_size:
            raise ValueError(
                f"per-channel quantization needs a multiple of group_size={spec.group_size} tokens, got {n}"
            )
        if spec.rotate not in RESOLVED_ROTATIONS:
            raise ValueError(f"quant.rotate must be resolved for a layer (none or hadamard), got {spec.rotate!r}")
        rotation = rotation_for(spec.rotate, d, x.device)
        rows = max(1, self.slice_bytes // max(1, 4 * h * n * d))  # batch rows per slice
        if rows >= b:
            return self._quantize(x, spec, rotation)
        return _joined([self._quantize(x[i : i + rows], spec, rotation) for i in range(0, b, rows)], dim=0)

    def _quantize(self, x: torch.Tensor, spec: QuantSpec, rotation: torch.Tensor | None) -> NativePacked:
        """:meth:`quantize` of all of ``x`` at once: one float32 copy (never ``x`` itself, even in
        float32), worked on in place."""
        x = rotate(x, rotation)
        b, h, n, d = x.shape
        g = spec.group_size
        if spec.axis == "token":
            grouped = x.reshape(b, h, n, d // g, g)
            reduce_dim = -1
        else:
            grouped = x.reshape(b, h, n // g, g, d)
            reduce_dim = -2
        work = grouped.to(torch.float32, copy=True)
        levels = (1 << spec.bits) - 1
        if self.option(spec, "fit") == "mse":
            lo, hi = mse_range(work, reduce_dim, levels)
        else:
            lo, hi = work.amin(dim=reduce_dim, keepdim=True), work.amax(dim=reduce_dim, keepdim=True)
        # scale and zero are stored in the cache dtype; quantize against the stored values
        scale = ((hi - lo) / levels).clamp_min(torch.finfo(x.dtype).tiny).to(x.dtype)
        zero = lo.to(x.dtype)
        codes = work.sub_(zero.float()).div_(scale.float()).round_().clamp_(0, levels)
        packed = pack_codes(codes.reshape(b, h, n, d), spec.bits)
        return NativePacked(
            codes=packed,
            scale=scale.squeeze(reduce_dim),
            zero=zero.squeeze(reduce_dim),
            bits=spec.bits,
            group_size=g,
            axis=spec.axis,
            rotation=rotation,
        )

    def concat(self, blocks: list[NativePacked]) -> NativePacked:
        return _joined(blocks, dim=2)


def _joined(blocks: list[NativePacked], dim: int) -> NativePacked:
    """Packed blocks joined along ``dim`` of their codes, scales and zeros (0: batch rows,
    2: tokens); one block is returned as it is."""
    if len(blocks) == 1:
        return blocks[0]
    return attrs.evolve(
        blocks[0],
        codes=torch.cat([b.codes for b in blocks], dim=dim),
        scale=torch.cat([b.scale for b in blocks], dim=dim),
        zero=torch.cat([b.zero for b in blocks], dim=dim),
    )
