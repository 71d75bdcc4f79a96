"""Check the Gluon kernel (``kernel="mma"``) against float64 and time it against the Triton kernel.

1. Correctness: fresh random cases (batch, KV heads, query heads per KV head 1-8, key groups
   16-128, value groups 32-128, padding bias, values paired by rows, several splits, bf16 and
   fp16), each against float64 attention over the dequantized tokens, for every variant
   (block of 32/64 tokens, key offsets exact or per row, register caps).
2. Speed, per shape (a Llama-3.1-8B layer: 8 KV heads of 128, 4 query heads each), in one
   process: the read-only kernel and a device copy (the yardsticks of ``fused_sweep``), the
   Triton kernel at its defaults (timed first and last: the drift), every Gluon variant, and
   with ``--baseline`` an earlier version of the Gluon kernel at the defaults (timed before and
   after the variants), so that a change is judged against its predecessor in the same run.

Prints a table last and writes JSON.

    python -m benchmarks.mma_sweep --out benchmarks/results/mma_sweep_h200.json
    git show HEAD~1:kvpolicy/executors/kernels/mma_device.py > /tmp/mma_device_before.py
    python -m benchmarks.mma_sweep --baseline /tmp/mma_device_before.py --stages 2 ...
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
from collections.abc import Callable, Iterator

import torch

from benchmarks.attention_bench import bench, bench_graph, copy_bandwidth
from benchmarks.fused_sweep import layer_data, load_module, time_read_only
from kvpolicy.executors.kernels import MmaSplits, launch_settings, packed_decode_attention
from tests.mma_cases import check

SHAPES = [(8, 32768, 64), (32, 32768, 64), (74, 32768, 64), (128, 32768, 64), (8, 32768, 32), (74, 32768, 32),
          (32, 4096, 64)]  # fmt: skip


def load_kernel(path: str) -> Callable:
    """``packed_decode_mma`` of a copy of ``kvpolicy/executors/kernels/mma_device.py`` (e.g. from ``git show``)."""
    return load_module(path, "fused_mma_baseline").packed_decode_mma


@contextlib.contextmanager
def launching(kernel: Callable | None) -> Iterator[None]:
    """The Gluon executor launches ``kernel`` (None: the current one) inside the block."""
    current = MmaSplits.device_kernel
    if kernel is not None:
        MmaSplits.device_kernel = staticmethod(lambda: kernel)
    try:
        yield
    finally:
        MmaSplits.device_kernel = current


def time_shape(b, n, group, variants, copy_bw, sms, baseline: Callable | None = None) -> dict:
    hkv = 8
    q, kp, vp, scale, nbytes, expected = layer_data(b, n, group, hkv)

    def timed(kernel: str, **settings):
        """(ms per call, its kernels' ms from a CUDA graph, relative error)."""
        launch = launch_settings(kernel, **settings)
        run = functools.partial(packed_decode_attention, q, kp, vp, scale, None, kernel=kernel, launch=launch)
        out = run()[0].reshape(expected.shape)
        err = float((out - expected).norm() / expected.norm())
        return bench(run, warmup=3, reps=20), bench_graph(run, warmup=3, reps=20), err

    row = {"batch": b, "tokens": n, "group": group, "bytes": nbytes, "copy_GBps": copy_bw / 1e9}
    row["read_only_ms"] = time_read_only(kp, vp, b, hkv, n, group, sms)
    row["triton_ms"], row["triton_graph_ms"], row["triton_err"] = timed(kernel="triton")
    if baseline is not None:
        with launching(baseline):
            row["baseline_ms"], row["baseline_graph_ms"], row["baseline_err"] = timed(kernel="mma")
    row["mma"] = []
    for variant in variants:
        ms, graph_ms, err = timed(kernel="mma", **variant)
        row["mma"].append({**variant, "ms": ms, "graph_ms": graph_ms, "rel_err": err})
    if baseline is not None:
        with launching(baseline):
            row["baseline_again_ms"], row["baseline_again_graph_ms"], _ = timed(kernel="mma")
    row["triton_again_ms"], row["triton_again_graph_ms"], _ = timed(kernel="triton")
    row["mma"].sort(key=lambda r: r["ms"])
    return row


def _baseline_cells(shape: dict, ms: float, kind: str = "") -> str:
    """The baseline's two timings (``kind``: "" one call, "graph_" replayed) and its ratio to ``ms``."""
    first, again = shape[f"baseline_{kind}ms"], shape[f"baseline_again_{kind}ms"]
    return f" {first:>8.3f} {again:>8.3f} {min(first, again) / ms:>6.3f}x"


def report(record: dict, copy_bw: float) -> str:
    """The fastest variants of each shape, then the tables: one call at a time, and the same
    calls replayed from CUDA graphs (against the baseline when the run had one)."""
    baseline = record.get("baseline") is not None
    lines = []
    for s in record["shapes"]:
        lines.append(f"\nb={s['batch']} n={s['tokens']} group={s['group']}: fastest mma variants")
        for r in s["mma"][:4]:
            lines.append(f"  {r['ms']:.3f} ms  block {r['block_tokens']} exact {r['exact_keys']}"
                         f" split_factor {r['split_factor']} max_registers {r['max_registers']} stages {r['stages']}"
                         f" err {r['rel_err']:.1e}")  # fmt: skip
    base_head = f" {'base ms':>8} {'again':>8} {'vs base':>7}" if baseline else ""
    lines.append(f"\n{record['device']}, copy {copy_bw / 1e9:.0f} GB/s (read + write)")
    lines.append(f"{'b':>4} {'ctx':>6} {'grp':>4} {'MB':>5} {'read ms':>8} {'triton':>8} {'again':>8} {'mma ms':>8}"
                 f" {'vs trit':>7} {'% copy':>7} {'% read':>7} {'err':>8}" + base_head)  # fmt: skip
    for s in record["shapes"]:
        best = s["mma"][0]
        pct = 100 * s["bytes"] / (best["ms"] / 1e3) / (s["copy_GBps"] * 1e9)
        lines.append(
            f"{s['batch']:>4} {s['tokens']:>6} {s['group']:>4} {s['bytes'] / 1e6:>5.0f} {s['read_only_ms']:>8.3f}"
            f" {s['triton_ms']:>8.3f} {s['triton_again_ms']:>8.3f} {best['ms']:>8.3f}"
            f" {s['triton_ms'] / best['ms']:>6.2f}x {pct:>6.1f}% {100 * s['read_only_ms'] / best['ms']:>6.0f}%"
            f" {best['rel_err']:>8.1e}" + (_baseline_cells(s, best["ms"]) if baseline else "")
        )  # fmt: skip
    lines.append("\nthe same calls replayed from CUDA graphs: their kernels alone, no launch gaps"
                 " (the fastest variant above)")  # fmt: skip
    lines.append(f"{'b':>4} {'ctx':>6} {'grp':>4} {'triton':>8} {'again':>8} {'mma ms':>8} {'vs trit':>7}"
                 f" {'% copy':>7}" + base_head)  # fmt: skip
    for s in record["shapes"]:
        ms = s["mma"][0]["graph_ms"]
        pct = 100 * s["bytes"] / (ms / 1e3) / (s["copy_GBps"] * 1e9)
        triton = min(s["triton_graph_ms"], s["triton_again_graph_ms"])
        lines.append(
            f"{s['batch']:>4} {s['tokens']:>6} {s['group']:>4} {s['triton_graph_ms']:>8.3f}"
            f" {s['triton_again_graph_ms']:>8.3f} {ms:>8.3f} {triton / ms:>6.2f}x {pct:>6.1f}%"
            + (_baseline_cells(s, ms, "graph_") if baseline else "")
        )  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--block-tokens", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--exact-keys", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--split-factors", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--max-registers", type=int, nargs="+", default=[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 3])
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--baseline", help="an earlier mma_device.py, timed at its defaults on every shape")
    parser.add_argument("--out")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    variants = [
        {"block_tokens": bt, "exact_keys": bool(ex), "split_factor": sf, "max_registers": mr or None, "stages": st}
        for bt, ex, sf, mr, st in itertools.product(
            args.block_tokens, args.exact_keys, args.split_factors, args.max_registers, args.stages
        )
    ]
    baseline = load_kernel(args.baseline) if args.baseline else None
    record = {"device": torch.cuda.get_device_name(), "baseline": args.baseline}
    if not args.skip_check:
        keys = ("block_tokens", "exact_keys", "stages", "max_registers")
        shape_variants = {tuple(v[k] for k in keys): v for v in variants}.values()
        record["check"] = check([{k: v[k] for k in keys} for v in shape_variants], gen)
        worst = max(r["rel_err"] for r in record["check"])
        print(f"check: {len(record['check'])} runs, worst rel err {worst:.2e}, all finite:",
              all(r["finite"] for r in record["check"]))  # fmt: skip
        for r in record["check"]:
            if r["rel_err"] > 1e-2 or not r["finite"]:
                print("  FAIL", r)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy_bw = copy_bandwidth()
    record["shapes"] = []
    for b, n, group in SHAPES:
        record["shapes"].append(time_shape(b, n, group, variants, copy_bw, sms, baseline))
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
    print(report(record, copy_bw))


if __name__ == "__main__":
    main()
