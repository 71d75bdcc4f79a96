"""Run the fused Triton kernel on a set of cases against float64 attention; one JSON line each.

``TRITON_INTERPRET=1 python -m tests.kernel_cases`` runs it in Triton's CPU interpreter (the
variable must be set before the kernels are defined); ``--device cuda`` on a GPU, e.g. under
``compute-sanitizer``. Cases cover 2/4/8 bits,
both value paths (scale folded or per-channel), key groups of 32 and 64, padding, several
splits with a last split that ends past the region, and GQA group sizes that are not powers
of two.
"""

from __future__ import annotations

import argparse
import json

import torch

from kvpolicy.config import QuantSpec
from kvpolicy.fused import packed_decode_attention
from kvpolicy.quantizers import NativeQuantizer

# batch, kv heads, query heads per kv head, head dim, tokens, key bits, value bits, key group,
# value group, padded, splits
CASES = [
    (2, 2, 4, 128, 128, 2, 2, 64, 64, False, None),
    (1, 3, 3, 64, 96, 2, 2, 32, 32, True, 2),
    (2, 1, 4, 64, 192, 4, 2, 64, 32, True, 2),
    (1, 2, 1, 64, 64, 4, 4, 32, 64, False, 1),
    (1, 1, 5, 128, 256, 8, 8, 64, 64, True, 3),
    (1, 2, 2, 128, 320, 2, 4, 64, 16, False, 4),
    (2, 1, 2, 64, 448, 2, 2, 64, 16, True, 3),
]


def float64_attention(query, keys, values, scaling, bias):
    k, v = keys.dequantize().double(), values.dequantize().double()
    scores = torch.einsum("bhgd,bhnd->bhgn", query.double(), k) * scaling
    if bias is not None:
        scores = scores + bias.double()[:, None, None, :]
    return torch.einsum("bhgn,bhnd->bhgd", torch.softmax(scores, -1), v), torch.logsumexp(scores, -1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--groups-per-block", type=int, help="key groups per kernel block (default: the kernel's)")
    args = parser.parse_args()
    device = args.device
    backend = NativeQuantizer()
    for seed, (b, hkv, g, d, n, kbits, vbits, kgroup, vgroup, padded, splits) in enumerate(CASES):
        gen = torch.Generator().manual_seed(seed)
        keys = backend.quantize(
            (torch.randn(b, hkv, n, d, generator=gen) * 2).half(),
            QuantSpec(bits=kbits, group_size=kgroup, axis="channel"),
        )
        values = backend.quantize(
            torch.randn(b, hkv, n, d, generator=gen).half(), QuantSpec(bits=vbits, group_size=vgroup, axis="token")
        )
        query = torch.randn(b, hkv, g, d, generator=gen).half()
        bias = None
        if padded:
            bias = torch.zeros(b, n)
            bias[0, : n // 3] = float("-inf")
        on_device = [t.to(device) if t is not None else None for t in (query, bias)]
        keys_d, values_d = (x.map_batch(lambda t: t.to(device)) for x in (keys, values))
        out, lse = packed_decode_attention(
            on_device[0], keys_d, values_d, d**-0.5, on_device[1], splits=splits, groups_per_block=args.groups_per_block
        )
        out, lse = out.cpu(), lse.cpu()
        expected, expected_lse = float64_attention(query, keys, values, d**-0.5, bias)
        print(
            json.dumps(
                {
                    "case": [b, hkv, g, d, n, kbits, vbits, kgroup, vgroup, padded, splits],
                    "shape_ok": list(out.shape) == [b, hkv, g, d] and list(lse.shape) == [b, hkv, g],
                    "rel_err": float((out.double() - expected).norm() / expected.norm()),
                    "lse_err": float((lse.double() - expected_lse).abs().max()),
                }
            )
        )


if __name__ == "__main__":
    main()
