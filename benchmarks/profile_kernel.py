"""Launch the fused packed-region kernel a few times on one shape, for a profiler to attach to.

Nothing is timed here: run it under Nsight Compute, e.g. (the command behind
``results/ncu_v15_b74.txt``)::

    ncu --kernel-name packed_decode --launch-skip 2 --launch-count 1 --set full \\
        python3 -m benchmarks.profile_kernel --batch 74 --tokens 32768 --group 64

``--variant path.py`` profiles another version of ``packed_decode_attention`` instead (a file
like those ``fused_sweep --baseline`` takes).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.fused_sweep import load_baseline
from kvpolicy.config import QuantSpec
from kvpolicy.executors.kernels import packed_decode_attention
from kvpolicy.quantizers.native import NativeQuantizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=74)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--launches", type=int, default=4)
    parser.add_argument("--variant", help="a file with another packed_decode_attention")
    args = parser.parse_args()
    attend = load_baseline(args.variant) if args.variant else packed_decode_attention
    torch.manual_seed(0)
    hkv, g, d = 8, 4, 128  # a Llama-3.1-8B layer, as in fused_sweep
    backend = NativeQuantizer()
    k, v = torch.randn(2, args.batch, hkv, args.tokens, d, device="cuda", dtype=torch.bfloat16)
    keys = backend.quantize(k * 2, QuantSpec(bits=2, group_size=args.group, axis="channel"))
    values = backend.quantize(v, QuantSpec(bits=2, group_size=args.group, axis="token"))
    del k, v
    q = torch.randn(args.batch, hkv, g, d, device="cuda", dtype=torch.bfloat16)
    for _ in range(args.launches):
        attend(q, keys, values, d**-0.5, None)
    torch.cuda.synchronize()
    source = args.variant or "kvpolicy.executors.kernels"
    print(f"{args.launches} launches of {source} at batch {args.batch}, {args.tokens} tokens")


if __name__ == "__main__":
    main()
