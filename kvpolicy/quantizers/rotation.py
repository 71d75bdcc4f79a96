"""Rotation before quantization: an orthonormal randomized Hadamard transform over head_dim.

Quantizing ``x @ R`` instead of ``x`` spreads an outlier channel's energy over every channel,
so a group's min/max range is set by typical values, not by the outlier (the idea behind
QuaRot and the KV-cache rotations of llama.cpp and vLLM). ``R`` is orthonormal, so
dequantized tokens are rotated back exactly (``y @ R.T``) and attention reads what the
model wrote, approximated.

Rotation is data: ``quant: {rotate: hadamard}`` makes the native backend pack ``x @ R`` and
record ``R`` in the packed block (:attr:`~kvpolicy.quantizers.native.NativePacked.rotation`),
whose dequantization rotates back, so the stores and the chunked and reference executors
need no change. The fused GPU kernels read the rotated codes unchanged: their decode step
runs in the rotated space (:func:`rotate`): the query and the full-precision keys are rotated
by the keys' ``R`` (``qR . kR = q . k``), the full-precision values by the values' ``R``, and
the output is rotated back once (``softmax(.) VR R^T = softmax(.) V``).
"""

from __future__ import annotations

import functools

import torch


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


@functools.cache
def hadamard_on(d: int, device: torch.device) -> torch.Tensor:
    """:func:`hadamard` ``(d)`` on ``device``: one copy per device, shared by every block rotated there."""
    return hadamard(d).to(device)


def rotation_for(rotate: str, d: int, device: torch.device) -> torch.Tensor | None:
    """The ``[d, d]`` matrix a resolved ``quant.rotate`` (``hadamard`` or ``none``) rotates by on ``device``."""
    return hadamard_on(d, torch.device(device)) if rotate == "hadamard" else None


def rotate(x: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """``x @ rotation`` (float32 arithmetic, ``x``'s dtype), or ``x`` itself when ``rotation`` is None."""
    return x if rotation is None else (x.float() @ rotation.to(x.device)).to(x.dtype)


def rotate_back(x: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """``x @ rotation.T``: tokens or an attention output of rotated values back in the model's
    space, or ``x`` itself when ``rotation`` is None."""
    return x if rotation is None else rotate(x, rotation.T)
