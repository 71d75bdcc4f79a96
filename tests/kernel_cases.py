"""Run the fused Triton kernels on a set of cases against float64 attention; one JSON line each.

Each case checks :func:`~kvpolicy.executors.kernels.packed_decode_attention` (the packed region alone:
``rel_err``, ``lse_err``) and :func:`~kvpolicy.executors.kernels.decode_attention` (a whole decode step:
full-precision segments of kept, staged and new tokens plus the packed region, ``step_err``;
``fp_only_err`` without a packed region; ``gather_err``: the packed region with its values
stored in another order and paired by value rows).

``TRITON_INTERPRET=1 python -m tests.kernel_cases`` runs it in Triton's CPU interpreter (the
variable must be set before the kernels are defined); ``--device cuda`` on a GPU, e.g. under
``compute-sanitizer``. Cases cover 2, 3, 4 and 8 bits,
both value paths (scale folded or per-channel), key groups of 32 and 64, padding, several
splits with a last split that ends past the region, and GQA group sizes that are not powers
of two.
"""

from __future__ import annotations

import argparse
import json

import torch

from kvpolicy.config import QuantSpec
from kvpolicy.executors.kernels import TritonLaunch, decode_attention, packed_decode_attention
from kvpolicy.quantizers.native import NativeQuantizer

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
    (1, 2, 4, 128, 192, 3, 3, 64, 32, True, 2),
    (2, 1, 3, 128, 160, 3, 2, 32, 64, False, 3),
    (1, 2, 2, 128, 256, 2, 3, 32, 16, False, 2),
]


def float64_attention(query, k, v, scaling, bias):
    """Softmax attention in float64 of grouped ``query`` over dense ``k``/``v``: ``(out, lse)``."""
    k, v = k.double(), v.double()
    scores = torch.einsum("bhgd,bhnd->bhgn", query.double(), k) * scaling
    if bias is not None:
        scores = scores + bias.double()[:, None, None, :]
    return torch.einsum("bhgn,bhnd->bhgd", torch.softmax(scores, -1), v), torch.logsumexp(scores, -1)


def gather_error(query, keys, backend, vbits, vgroup, scaling, bias, gen, device) -> float:
    """Relative error of the packed region with values in another order (and more of them):
    packed key ``i`` pairs with value row ``rows[i]``, every fifth key with none (``-1``)."""
    b, hkv, n, d = keys.codes.shape[0], keys.codes.shape[1], keys.num_tokens, query.shape[-1]
    values = backend.quantize(
        torch.randn(b, hkv, n + 37, d, generator=gen).half(), QuantSpec(bits=vbits, group_size=vgroup, axis="token")
    )
    rows = torch.randperm(n + 37, generator=gen)[:n]
    rows[::5] = -1
    out, _ = packed_decode_attention(
        query.to(device),
        keys.map_batch(lambda t: t.to(device)),
        values.map_batch(lambda t: t.to(device)),
        scaling,
        None if bias is None else bias.to(device),
        rows.to(torch.int32).to(device),
    )
    paired = rows >= 0
    k, v = keys.dequantize()[:, :, paired], values.dequantize()[:, :, rows[paired]]
    expected, _ = float64_attention(query, k, v, scaling, None if bias is None else bias[:, paired])
    return float((out.cpu().double() - expected).norm() / expected.norm())


def full_precision_segments(b, hkv, d, seed, gen):
    """Kept, staged (absent in some cases) and new tokens: ``[(keys, values)]`` of ``[B, H_kv, n, D]``.
    The kept tokens are a slice of a longer region (a window that moved on), the new token a
    transposed view (as a model's projection gives it): both are read in place by stride."""
    kept, staged = 40 + 7 * seed, 5 * (seed % 3)
    segments = [tuple(torch.randn(2, b, hkv, kept + 3, d, generator=gen).half()[:, :, :, 3:])]
    if staged:
        segments.append(tuple(torch.randn(2, b, hkv, staged, d, generator=gen).half()))
    new = torch.randn(2, b, 1, hkv, d, generator=gen).half().transpose(2, 3)
    segments.append((new[0], new[1]))
    return segments


def float64_step(query, segments, keys, values, scaling, fp_bias, packed_bias):
    """Output ``[B, 1, H_q, D]`` of softmax attention over the segments and the packed tokens."""
    k = torch.cat([s[0] for s in segments], 2).double()
    v = torch.cat([s[1] for s in segments], 2).double()
    if keys is not None:
        k = torch.cat([k, keys.dequantize().double()], 2)
        v = torch.cat([v, values.dequantize().double()], 2)
    b, hq, _, d = query.shape
    grouped = query.reshape(b, k.shape[1], hq // k.shape[1], d)
    biases = [x for x in (fp_bias, packed_bias if keys is not None else None) if x is not None]
    out, _ = float64_attention(grouped, k, v, scaling, torch.cat(biases, 1) if biases else None)
    return out.reshape(b, 1, hq, d)


def step_error(query, segments, keys, values, scaling, fp_bias, packed_bias, device) -> float:
    def move(t):
        return None if t is None else t.to(device)

    got = decode_attention(
        move(query),
        [(move(k), move(v)) for k, v in segments],
        None if keys is None else keys.map_batch(move),
        None if values is None else values.map_batch(move),
        scaling,
        move(fp_bias),
        move(packed_bias),
    ).cpu()
    expected = float64_step(query, segments, keys, values, scaling, fp_bias, packed_bias)
    assert got.shape == expected.shape and got.dtype == query.dtype, (got.shape, expected.shape)
    return float((got.double() - expected).norm() / expected.norm())


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
        launch = TritonLaunch(splits=splits, groups_per_block=args.groups_per_block)
        out, lse = packed_decode_attention(
            on_device[0], keys_d, values_d, d**-0.5, on_device[1], kernel="triton", launch=launch
        )
        out, lse = out.cpu(), lse.cpu()
        expected, expected_lse = float64_attention(query, keys.dequantize(), values.dequantize(), d**-0.5, bias)
        segments = full_precision_segments(b, hkv, d, seed, gen)
        fp_bias = None
        if padded:
            fp_bias = torch.zeros(b, sum(k.shape[2] for k, _ in segments))
            fp_bias[0, :3] = float("-inf")
        step_query = query.reshape(b, hkv * g, 1, d)
        step_args = (step_query, segments, keys, values, d**-0.5, fp_bias, bias, device)
        step_err = step_error(*step_args)
        fp_only_err = step_error(step_query, segments, None, None, d**-0.5, fp_bias, None, device)
        gather_err = gather_error(query, keys, backend, vbits, vgroup, d**-0.5, bias, gen, device)
        print(
            json.dumps(
                {
                    "case": [b, hkv, g, d, n, kbits, vbits, kgroup, vgroup, padded, splits],
                    "shape_ok": list(out.shape) == [b, hkv, g, d] and list(lse.shape) == [b, hkv, g],
                    "rel_err": float((out.double() - expected).norm() / expected.norm()),
                    "lse_err": float((lse.double() - expected_lse).abs().max()),
                    "step_err": step_err,
                    "fp_only_err": fp_only_err,
                    "gather_err": gather_err,
                }
            )
        )


if __name__ == "__main__":
    main()
