"""Rotation before quantization: an orthonormal randomized Hadamard transform over head_dim.

Quantizing ``x @ R`` instead of ``x`` spreads an outlier channel's energy over every channel,
so a group's min/max range is set by typical values, not by the outlier (the idea behind
QuaRot and the KV-cache rotations of llama.cpp and vLLM). ``R`` is orthonormal, so
dequantized tokens are rotated back exactly (``y @ R.T``) and attention reads what the
model wrote, approximated.

:class:`RotatingBackend` wraps any quantizer backend: it rotates each block before packing
and its packed objects (:class:`RotatedPacked`) rotate back on every dequantization, so the
stores and the chunked and reference executors need no change. The fused GPU kernels read
the rotated codes unchanged: their decode step runs in the rotated space
(:func:`unwrap_rotation`, :func:`rotate`): the query and the full-precision keys are rotated by
the keys' ``R`` (``qR . kR = q . k``), the full-precision values by the values' ``R``, and the
output is rotated back once (``softmax(.) VR R^T = softmax(.) V``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import attrs
import torch

from kvpolicy.config import QuantSpec
from kvpolicy.quantizers import Packed, QuantizerBackend


def power_of_two(x: int) -> bool:
    """Whether ``x`` is a positive power of two (the head sizes a Hadamard rotation serves)."""
    return x > 0 and x & (x - 1) == 0


#: the random signs are fixed: a cache's rotation is the same in every run and every layer
SEED = 0x5EED


@functools.cache
def hadamard(d: int, seed: int = SEED) -> torch.Tensor:
    """Orthonormal randomized Hadamard matrix ``[d, d]`` (float32): random signs on the rows
    of Sylvester's Hadamard matrix, scaled by ``1/sqrt(d)``. ``d`` must be a power of two.
    Made once per ``(d, seed)``: every store rotating by it shares the one matrix (never
    written to), so a cache holds one copy, not one per layer."""
    if not power_of_two(d):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head_dim (it is {d})")
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (d,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return signs[:, None].float() * h / d**0.5


def _rotated(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """``x @ rotation`` computed in float32, returned in ``x``'s dtype."""
    return (x.float() @ rotation.to(x.device)).to(x.dtype)


@attrs.frozen
class RotatedPacked:
    """A packed block of rotated tokens; every dequantization rotates back.

    ``inner`` holds ``x @ rotation``; ``rotation`` is ``[D, D]`` float32."""

    inner: Packed
    rotation: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.inner.num_tokens

    @property
    def axis(self) -> str:
        return getattr(self.inner, "axis", "token")

    @property
    def group_size(self) -> int:
        return getattr(self.inner, "group_size", 1)

    def dequantize(self) -> torch.Tensor:
        return _rotated(self.inner.dequantize(), self.rotation.T)

    def dequantize_tokens(self, index: torch.Tensor) -> torch.Tensor:
        return _rotated(self.inner.dequantize_tokens(index), self.rotation.T)

    def nbytes(self) -> dict[str, int]:
        return self.inner.nbytes()  # the rotation is one shared [D, D] matrix per store, not per token

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> RotatedPacked:
        return attrs.evolve(self, inner=self.inner.map_batch(fn))

    def slice_tokens(self, start: int, stop: int) -> RotatedPacked:
        return attrs.evolve(self, inner=self.inner.slice_tokens(start, stop))


class RotatingBackend(QuantizerBackend):
    """``backend`` applied to tokens rotated by ``rotation`` (``[D, D]``, orthonormal)."""

    def __init__(self, backend: QuantizerBackend, rotation: torch.Tensor):
        self.backend = backend
        self.rotation = rotation
        self.name = backend.name
        self.supported_bits = backend.supported_bits
        self.options = backend.options
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def matrices(self) -> list[torch.Tensor]:
        """Every copy of the matrix this backend keeps (the original and one per device used)."""
        return [self.rotation, *self._on_device.values()]

    def _rotation_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._on_device:
            self._on_device[device] = self.rotation.to(device)
        return self._on_device[device]

    def quantize(self, x: torch.Tensor, spec: QuantSpec) -> RotatedPacked:
        rotation = self._rotation_on(x.device)
        return RotatedPacked(self.backend.quantize(_rotated(x, rotation), spec), rotation)

    def concat(self, blocks: list[RotatedPacked]) -> RotatedPacked:
        return RotatedPacked(self.backend.concat([b.inner for b in blocks]), blocks[0].rotation)


def unwrap_rotation(packed) -> tuple[torch.Tensor | None, object]:
    """``(rotation [D, D] or None, the codes' own packed block)``: a rotated block's matrix and
    inner block, or ``(None, packed)`` for anything else (``None`` included)."""
    if isinstance(packed, RotatedPacked):
        return packed.rotation, packed.inner
    return None, packed


def rotate(x: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """``x @ rotation`` (float32 arithmetic, ``x``'s dtype), or ``x`` itself when ``rotation`` is None."""
    return x if rotation is None else _rotated(x, rotation)


def rotate_back(x: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """``x @ rotation.T``: an attention output of rotated values back in the model's space, or
    ``x`` itself when ``rotation`` is None."""
    return x if rotation is None else _rotated(x, rotation.T)


def backend_rotation(backend, device: torch.device) -> torch.Tensor | None:
    """The ``[D, D]`` matrix a :class:`RotatingBackend` rotates by, on ``device``; ``None`` for any other backend."""
    return backend._rotation_on(device) if isinstance(backend, RotatingBackend) else None


def as_stored(packed, rotation: torch.Tensor | None):
    """Native codes of rotated tokens as their store holds them: wrapped in :class:`RotatedPacked`
    when ``rotation`` is given (the inverse of :func:`unwrap_rotation`)."""
    return packed if rotation is None or packed is None else RotatedPacked(packed, rotation)


def unrotated_backend(backend):
    """The backend that packs the codes: a :class:`RotatingBackend`'s own, or ``backend`` itself."""
    return backend.backend if isinstance(backend, RotatingBackend) else backend
