"""The ``quanto`` backend: optimum-quanto's packed ``qint2``/``qint4`` tensors.

Uses the same calls as transformers' ``QuantoQuantizedLayer`` (``MaxOptimizer`` for
scale and shift, then ``quantize_weight``), so codes are really bit-packed into uint8.
Needs ``pip install 'kvpolicy[quanto]'``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvpolicy.config import QuantSpec
from kvpolicy.errors import MissingDependencyError
from kvpolicy.quantizers.row_packed import RowPacked, RowPackedBackend, as_grouped, from_grouped


def _quanto():
    try:
        from optimum import quanto
    except ImportError:
        raise MissingDependencyError("quantizer backend 'quanto'", "optimum-quanto", "quanto") from None
    return quanto


def _leaf_tensors(t) -> list[tuple[str, torch.Tensor]]:
    """``(name, plain tensor)`` for every tensor inside a (possibly nested) tensor subclass."""
    if not hasattr(t, "__tensor_flatten__"):
        return [("", t)]
    names, _ = t.__tensor_flatten__()
    return [(f"{name}{sub}", leaf) for name in names for sub, leaf in _leaf_tensors(getattr(t, name))]


class QuantoQuantizer(RowPackedBackend):
    """optimum-quanto ``qint2``/``qint4`` with min/max (``MaxOptimizer``) scales."""

    name: ClassVar[str] = "quanto"
    supported_bits: ClassVar[tuple[int, ...]] = (2, 4)

    def validate(self, spec: QuantSpec, head_dim: int, section: str) -> None:
        super().validate(spec, head_dim, section)
        _quanto()

    def quantize(self, x: torch.Tensor, spec: QuantSpec) -> RowPacked:
        quanto = _quanto()
        qtype = quanto.qint2 if spec.bits == 2 else quanto.qint4
        optimizer = quanto.MaxOptimizer()
        rows = []
        for row in x:
            grouped = as_grouped(row, spec.axis)
            scale, shift = optimizer(grouped, qtype, 0, spec.group_size)
            rows.append((quanto.quantize_weight(grouped, qtype, 0, scale, shift, spec.group_size),))
        return RowPacked(
            rows=tuple(rows),
            lengths=(x.shape[2],),
            decode=lambda block, axis=spec.axis: from_grouped(block.dequantize(), axis),
            block_nbytes=_block_nbytes,
        )


def _block_nbytes(block) -> tuple[int, int]:
    codes = scales = 0
    for name, leaf in _leaf_tensors(block):
        n = leaf.numel() * leaf.element_size()
        if name.startswith("_data"):
            codes += n
        else:
            scales += n
    return codes, scales
