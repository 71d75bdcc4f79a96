"""The Gluon decode kernel's correctness cases and their float64 oracle (CUDA).

Fresh random cases (batch, KV heads, query heads per KV head 1-8, key groups 16-128, value
groups 32-128, padding bias, values paired by rows, several splits, bf16 and fp16), each
against float64 attention over the dequantized tokens. Used by ``tests/executors/test_fused.py`` and by
``benchmarks/mma_sweep.py``, which checks every kernel variant before timing it.
"""

from __future__ import annotations

import itertools

import torch

from kvpolicy.config import QuantSpec
from kvpolicy.executors.kernels import launch_settings, packed_decode_attention
from kvpolicy.quantizers.native import NativeQuantizer

# batch, kv heads, query heads per kv head, tokens, key group, value group, padded, paired by rows, splits, dtype
CASES = [
    (2, 2, 4, 1024, 64, 64, False, False, None, torch.bfloat16),
    (1, 3, 3, 512, 32, 32, True, False, 3, torch.bfloat16),
    (2, 1, 8, 768, 128, 128, True, True, 2, torch.float16),
    (1, 2, 1, 256, 16, 64, False, True, 5, torch.bfloat16),
    (3, 2, 5, 640, 64, 32, True, False, 4, torch.float16),
    (1, 1, 4, 4096, 64, 64, False, False, 1, torch.bfloat16),
    (2, 2, 7, 192, 64, 128, False, True, None, torch.bfloat16),
]


def float64_reference(q, kp, vp, scale, bias, rows):
    k, v = kp.dequantize().double(), vp.dequantize().double()
    if rows is not None:
        v = v[:, :, rows.clamp_min(0).long()]
    s = torch.einsum("bhgd,bhnd->bhgn", q.double(), k) * scale
    if bias is not None:
        s = s + bias.double()[:, None, None, :]
    if rows is not None:
        s = s.masked_fill((rows < 0)[None, None, None, :], float("-inf"))
    return torch.einsum("bhgn,bhnd->bhgd", torch.softmax(s, -1), v)


def check(variants: list[dict], gen: torch.Generator, device: str = "cuda", kernel: str = "mma") -> list[dict]:
    """Relative error of every variant on every case, fresh data each time."""
    backend = NativeQuantizer()
    results = []
    for case, variant in itertools.product(CASES, variants):
        b, hkv, g, n, kg, vg, padded, paired, splits, dtype = case
        d, scale = 128, 128**-0.5
        k = torch.randn(b, hkv, n, d, generator=gen).to(dtype).to(device) * 3 + torch.randn(d, generator=gen).to(device)
        kp = backend.quantize(k.to(dtype), QuantSpec(bits=2, group_size=kg, axis="channel"))
        nv = n + 37 if paired else n
        vp = backend.quantize(
            torch.randn(b, hkv, nv, d, generator=gen).to(dtype).to(device),
            QuantSpec(bits=2, group_size=vg, axis="token"),
        )
        rows = None
        if paired:
            rows = torch.randperm(nv, generator=gen)[:n].int()
            rows[::5] = -1
        bias = None
        if padded:
            bias = torch.zeros(b, n)
            bias[0, : n // 3] = float("-inf")
            bias = bias.to(device)
        q = torch.randn(b, hkv, g, d, generator=gen).to(dtype).to(device)
        expected = float64_reference(q, kp, vp, scale, bias, rows.to(device) if rows is not None else None)
        out, _ = packed_decode_attention(
            q,
            kp,
            vp,
            scale,
            bias,
            rows.to(device) if rows is not None else None,
            kernel=kernel,
            launch=launch_settings(kernel, splits=splits, **variant),
        )
        rel = float((out.double() - expected).norm() / expected.norm())
        results.append(
            {"case": [str(c) for c in case], **variant, "rel_err": rel, "finite": bool(out.isfinite().all())}
        )
    return results
