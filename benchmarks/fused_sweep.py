"""Sweep the fused kernel's launch configuration at one shape; prints the fastest first.

python benchmarks/fused_sweep.py --batch 8 --context 32768
"""

from __future__ import annotations

import argparse
import functools
import itertools

import torch

from benchmarks.attention_bench import bench
from kvpolicy.config import QuantSpec
from kvpolicy.fused import packed_decode_attention
from kvpolicy.quantizers import NativeQuantizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=32768)
    args = parser.parse_args()
    b, n, hkv, g, d = args.batch, args.context, 8, 4, 128
    backend = NativeQuantizer()
    kp = backend.quantize(
        torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16), QuantSpec(bits=2, group_size=64, axis="channel")
    )
    vp = backend.quantize(
        torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16), QuantSpec(bits=2, group_size=64, axis="token")
    )
    q = torch.randn(b, hkv, g, d, device="cuda", dtype=torch.bfloat16)
    nbytes = sum(kp.nbytes().values()) + sum(vp.nbytes().values())
    rows = []
    configs = itertools.product([True, False], [64, 128], [4, 8], [2, 3, 4], [8, 16])
    for fold, block_n, warps, stages, factor in configs:
        if fold and block_n != 64:
            continue  # folding uses blocks of one key group
        try:
            run = functools.partial(
                packed_decode_attention,
                q, kp, vp, 0.1, None,
                block_n=block_n, num_warps=warps, num_stages=stages, split_factor=factor, fold=fold,
            )  # fmt: skip
            ms = bench(run, warmup=3, reps=20)
        except Exception as err:  # a configuration that does not compile (registers, shared memory)
            print(f"fold={fold} block_n={block_n} warps={warps} stages={stages}: {type(err).__name__}: {err}"[:300])
            continue
        rows.append((ms, fold, block_n, warps, stages, factor))
    rows.sort()
    print(f"{'ms':>7} {'GB/s':>6}  fold block_n warps stages split_factor")
    for ms, fold, block_n, warps, stages, factor in rows[:14]:
        print(f"{ms:>7.3f} {nbytes / ms / 1e6:>6.0f} {fold!s:>5} {block_n:>7} {warps:>5} {stages:>6} {factor:>12}")
    # check the fastest against the default configuration's output
    best = dict(zip(("fold", "block_n", "num_warps", "num_stages", "split_factor"), rows[0][1:], strict=True))
    o1, _ = packed_decode_attention(q, kp, vp, 0.1, None, **best)
    o2, _ = packed_decode_attention(q, kp, vp, 0.1, None)
    print("fastest vs default output, relative difference:", float((o1 - o2).norm() / o2.norm()))


if __name__ == "__main__":
    main()
