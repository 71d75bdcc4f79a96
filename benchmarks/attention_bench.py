"""Decode attention over a Llama-3.1-8B-shaped layer: fused packed codes vs bf16 SDPA vs dequantize+SDPA.

One layer, one decode step (one query token), 32 query heads sharing 8 KV heads of 128, for
each code width of ``--bits`` and each packed-region kernel of ``--kernels`` (``auto``: Gluon
where it serves, else Triton; ``triton``; ``mma``: Gluon only, 2 bits). Prints a table last and
writes JSON. Ratios are against bf16 SDPA over a bf16 cache (what a DynamicCache does each
step), measured in the same run.

    python benchmarks/attention_bench.py --out benchmarks/results/attention_h100.json
    python benchmarks/attention_bench.py --contexts 32768 --batches 1 8 --bits 2 3 4 --kernels auto triton
"""

from __future__ import annotations

import argparse
import functools
import json
import platform

import torch
import torch.nn.functional as F

from kvpolicy.config import QuantSpec
from kvpolicy.executors.kernels import packed_decode_attention
from kvpolicy.quantizers.native import NativeQuantizer


def bench(fn, warmup=5, reps=30) -> float:
    """Median milliseconds, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def bench_graph(fn, warmup=5, reps=30) -> float:
    """Median milliseconds of ``fn`` replayed from a CUDA graph: its kernels back to back, with
    no Python or launch gaps before or between them (the device time of the call)."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay, warmup, reps)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), warmup=3, reps=10)
    return 2 * nbytes / (ms / 1e3)


def measure(n: int, b: int, copy_bw: float, kernel: str | None = None, bits: int = 2) -> dict:
    """Time one decode step's attention over ``n`` cached tokens for batch ``b``, keys and
    values in ``bits``-bit codes (``kernel``: the packed region's, see
    :func:`kvpolicy.executors.kernels.packed_splits`)."""
    kv_heads, groups, d = 8, 4, 128
    backend = NativeQuantizer()
    k = torch.randn(b, kv_heads, n, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, kv_heads, n, d, device="cuda", dtype=torch.bfloat16)
    query = torch.randn(b, kv_heads * groups, 1, d, device="cuda", dtype=torch.bfloat16)
    grouped = query.reshape(b, kv_heads, groups, d)
    kp = backend.quantize(k, QuantSpec(bits=bits, group_size=64, axis="channel"))
    vp = backend.quantize(v, QuantSpec(bits=bits, group_size=64, axis="token"))
    scale = d**-0.5
    packed_bytes = sum(kp.nbytes().values()) + sum(vp.nbytes().values())
    bf16_bytes = 2 * k.numel() * 2

    t_sdpa = bench(lambda: F.scaled_dot_product_attention(query, k, v, scale=scale, enable_gqa=True))
    fused = functools.partial(packed_decode_attention, grouped, kp, vp, scale, None, kernel=kernel)
    t_fused = bench(fused)
    t_graph = bench_graph(fused)

    def dequant_sdpa():
        F.scaled_dot_product_attention(query, kp.dequantize(), vp.dequantize(), scale=scale, enable_gqa=True)

    t_deq = bench(dequant_sdpa, warmup=2, reps=10)
    # correctness against the same dequantized tokens in float32
    o, _ = fused()
    ref = F.scaled_dot_product_attention(
        query.float(), kp.dequantize().float(), vp.dequantize().float(), scale=scale, enable_gqa=True
    ).reshape(b, kv_heads, groups, d)
    return {
        "context": n,
        "batch": b,
        "bits": bits,
        "kernel": kernel or "auto",
        "sdpa_bf16_ms": t_sdpa,
        "fused_ms": t_fused,
        "fused_graph_ms": t_graph,
        "dequant_sdpa_ms": t_deq,
        "fused_speedup_vs_sdpa": t_sdpa / t_fused,
        "fused_speedup_vs_dequant": t_deq / t_fused,
        "bytes_ratio": packed_bytes / bf16_bytes,
        "fused_read_GBps": packed_bytes / (t_fused / 1e3) / 1e9,
        "sdpa_read_GBps": bf16_bytes / (t_sdpa / 1e3) / 1e9,
        "copy_GBps": copy_bw / 1e9,
        "fused_frac_of_copy": packed_bytes / (t_fused / 1e3) / copy_bw,
        "rel_error_vs_fp32": float((o - ref).norm() / ref.norm()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[8])
    parser.add_argument("--bits", type=int, nargs="+", default=[2], help="code widths of keys and values")
    parser.add_argument("--kernels", nargs="+", default=["auto"], choices=("auto", "triton", "mma"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    rows = []
    for n in args.contexts:
        for b in args.batches:
            for bits in args.bits:
                for kernel in args.kernels:
                    if kernel == "mma" and bits != 2:
                        continue  # the Gluon kernel reads 2-bit codes only
                    rows.append(measure(n, b, copy_bw, None if kernel == "auto" else kernel, bits))
                    torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "host": platform.node(), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"device: {result['device']}  copy bandwidth (read+write): {copy_bw / 1e9:.0f} GB/s")
    head = f"{'ctx':>6} {'batch':>5} {'bits':>4} {'kernel':>6}"
    head += f" {'sdpa bf16 ms':>12} {'fused ms':>9} {'graph ms':>9} {'deq+sdpa ms':>11}"
    head += f" {'x sdpa':>7} {'x deq':>6}"
    head += f" {'bytes':>6} {'fused GB/s':>10} {'% copy':>7} {'rel err':>8}"
    print(head)
    for r in rows:
        print(
            f"{r['context']:>6} {r['batch']:>5} {r['bits']:>4} {r['kernel']:>6}"
            f" {r['sdpa_bf16_ms']:>12.3f} {r['fused_ms']:>9.3f} {r['fused_graph_ms']:>9.3f}"
            f" {r['dequant_sdpa_ms']:>11.3f}"
            f" {r['fused_speedup_vs_sdpa']:>7.2f} {r['fused_speedup_vs_dequant']:>6.1f} {r['bytes_ratio']:>6.3f}"
            f" {r['fused_read_GBps']:>10.0f} {100 * r['fused_frac_of_copy']:>6.1f}% {r['rel_error_vs_fp32']:>8.1e}"
        )


if __name__ == "__main__":
    main()
