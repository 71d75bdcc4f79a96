"""The ``hqq`` backend: Half-Quadratic Quantization (HQQ) with its own bit-packing.

HQQ optimizes each group's zero point to minimize the reconstruction error (no
calibration data), and packs 2-bit codes four to a byte (``2bit_u8``). Scales and zeros
are kept in the cache dtype. Needs ``pip install 'kvpolicy[hqq]'``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvpolicy.config import QuantSpec
from kvpolicy.errors import MissingDependencyError
from kvpolicy.quantizers import BackendOption
from kvpolicy.quantizers.row_packed import RowPacked, RowPackedBackend, as_grouped, from_grouped


def _quantizer():
    try:
        from hqq.core.quantize import Quantizer
    except ImportError:
        raise MissingDependencyError("quantizer backend 'hqq'", "hqq", "hqq") from None
    return Quantizer


class HQQQuantizer(RowPackedBackend):
    """HQQ (optimized zero points) at 2 or 4 bits."""

    name: ClassVar[str] = "hqq"
    supported_bits: ClassVar[tuple[int, ...]] = (2, 4)
    options: ClassVar[dict[str, BackendOption]] = {
        "optimize": BackendOption(
            True,
            lambda v: isinstance(v, bool),
            "true | false",
            "optimize each group's zero point (HQQ's half-quadratic solver); false: plain min/max, faster",
        )
    }

    def validate(self, spec: QuantSpec, head_dim: int, section: str) -> None:
        super().validate(spec, head_dim, section)
        _quantizer()

    def quantize(self, x: torch.Tensor, spec: QuantSpec) -> RowPacked:
        quantizer = _quantizer()
        rows = []
        for row in x:
            grouped = as_grouped(row, spec.axis)
            codes, meta = quantizer.quantize(
                grouped.reshape(-1, spec.group_size),
                nbits=spec.bits,
                group_size=spec.group_size,
                axis=1,
                optimize=self.option(spec, "optimize"),
                compute_dtype=torch.float32,
                device=str(x.device),
            )
            meta["scale"] = meta["scale"].to(x.dtype)
            meta["zero"] = meta["zero"].to(x.dtype)
            rows.append(((codes, meta, tuple(grouped.shape)),))
        return RowPacked(
            rows=tuple(rows),
            lengths=(x.shape[2],),
            decode=lambda block, axis=spec.axis, dtype=x.dtype: _decode(quantizer, block, axis, dtype),
            block_nbytes=_block_nbytes,
        )


def _decode(quantizer, block, axis: str, dtype: torch.dtype) -> torch.Tensor:
    codes, meta, shape = block
    # dequantize in float32 from the stored (cache-dtype) scale and zero
    meta = {**meta, "scale": meta["scale"].float(), "zero": meta["zero"].float()}
    return from_grouped(quantizer.dequantize(codes, meta).reshape(shape).to(dtype), axis)


def _block_nbytes(block) -> tuple[int, int]:
    codes, meta, _ = block
    scales = sum(meta[k].numel() * meta[k].element_size() for k in ("scale", "zero"))
    return codes.numel() * codes.element_size(), scales
