"""Sweep the fused kernel's launch configuration over several shapes, against two yardsticks.

For each shape (a Llama-3.1-8B layer: 8 KV heads of 128, 4 query heads each, 2-bit keys
and values) it times every launch configuration of the fused kernel, plus:

* ``read only``: a kernel that reads exactly the packed bytes in the same blocks and order
  and only sums them: the bandwidth this access pattern can reach, the ceiling of the sweep;
* ``copy``: a device-to-device copy (bytes read + written), the issue's yardstick;
* ``baselines`` (optional, ``--baseline a.py b.py``): other versions of ``packed_decode_attention``,
  one per file, each timed at its defaults on the same data.

Every configuration's output is checked against float32 attention over the dequantized
tokens. Prints a table last and writes JSON.

    python -m benchmarks.fused_sweep --out benchmarks/results/fused_sweep_h100.json
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from benchmarks.attention_bench import bench, copy_bandwidth
from kvpolicy.config import QuantSpec
from kvpolicy.executors.kernels import TritonLaunch, packed_decode_attention
from kvpolicy.executors.kernels.common import cdiv as triton_cdiv
from kvpolicy.executors.kernels.triton_splits import (
    MAX_REGISTERS,
    NUM_STAGES,
    NUM_WARPS,
    SPLIT_FACTOR,
    default_groups_per_block,
)
from kvpolicy.quantizers.native import NativeQuantizer

SHAPES = [(8, 32768, 64), (32, 32768, 64), (74, 32768, 64), (8, 32768, 32), (32, 4096, 64)]  # batch, tokens, group


@triton.jit
def read_only(
    KC, KS, KZ, VC, VS, VZ, SINK, N, tokens_per_split,
    KW: tl.constexpr, D: tl.constexpr, VGN: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Reads one (row, head)'s packed bytes in blocks of one key group, in the fused kernel's order, and sums them."""
    bh = tl.program_id(0)
    start = tl.program_id(1) * tokens_per_split
    offs_n = tl.arange(0, BLOCK_N)
    kj = tl.arange(0, KW)
    offs_d = tl.arange(0, D)
    offs_v = tl.arange(0, VGN)
    codes = tl.zeros([BLOCK_N, KW], tl.int32)
    scales = tl.zeros([BLOCK_N, VGN], tl.float32)
    key_scales = tl.zeros([D], tl.float32)
    for i in range(0, tokens_per_split, BLOCK_N):
        n = start + i + offs_n
        live = n < N
        codes += tl.load(KC + (bh * N + n[:, None]) * KW + kj[None, :], mask=live[:, None], other=0).to(tl.int32)
        codes += tl.load(VC + (bh * N + n[:, None]) * KW + kj[None, :], mask=live[:, None], other=0).to(tl.int32)
        row = (bh * (N // BLOCK_N) + (start + i) // BLOCK_N) * D + offs_d
        key_scales += tl.load(KS + row, mask=(start + i) < N, other=0.0).to(tl.float32)
        key_scales += tl.load(KZ + row, mask=(start + i) < N, other=0.0).to(tl.float32)
        vrow = (bh * N + n[:, None]) * VGN + offs_v[None, :]
        scales += tl.load(VS + vrow, mask=live[:, None], other=0.0).to(tl.float32)
        scales += tl.load(VZ + vrow, mask=live[:, None], other=0.0).to(tl.float32)
    total = tl.sum(tl.sum(codes, 1), 0).to(tl.float32) + tl.sum(tl.sum(scales, 1), 0) + tl.sum(key_scales, 0)
    tl.store(SINK + bh * tl.num_programs(1) + tl.program_id(1), total)


def time_read_only(kp, vp, b, hkv, n, group, sms) -> float:
    """Milliseconds to read the packed region in the fused kernel's split layout (split factor 16)."""
    splits = max(1, min(triton_cdiv(n, group), triton_cdiv(16 * sms, b * hkv)))
    per_split = triton_cdiv(triton_cdiv(n, splits), group) * group
    grid = (b * hkv, triton_cdiv(n, per_split))
    sink = torch.empty(grid[0] * grid[1], device="cuda")
    tensors = (kp.codes, kp.scale, kp.zero, vp.codes, vp.scale, vp.zero)
    return bench(lambda: read_only[grid](*tensors, sink, n, per_split, KW=32, D=128, VGN=128 // group, BLOCK_N=group))


def reference(q, kp, vp, scale):
    k, v = kp.dequantize().float(), vp.dequantize().float()
    s = torch.einsum("bhgd,bhnd->bhgn", q.float(), k) * scale
    return torch.einsum("bhgn,bhnd->bhgd", torch.softmax(s, -1), v)


def load_module(path: str, name: str | None = None):
    """The Python module in file ``path`` (an earlier version of one of ours), as ``name``
    (default ``baseline_<file stem>``)."""
    spec = importlib.util.spec_from_file_location(name or f"baseline_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_baseline(path: str):
    return load_module(path).packed_decode_attention


def layer_data(b: int, n: int, group: int, hkv: int = 8, g: int = 4, d: int = 128):
    """One Llama-8B layer's packed region on the GPU (2-bit, ``group`` for keys and values),
    bf16 queries and the float32 reference: ``(q, keys, values, scale, packed bytes, expected)``."""
    scale = d**-0.5
    backend = NativeQuantizer()
    k, v = torch.randn(2, b, hkv, n, d, device="cuda", dtype=torch.bfloat16)
    kp = backend.quantize(k * 2, QuantSpec(bits=2, group_size=group, axis="channel"))
    vp = backend.quantize(v, QuantSpec(bits=2, group_size=group, axis="token"))
    del k, v
    q = torch.randn(b, hkv, g, d, device="cuda", dtype=torch.bfloat16)
    nbytes = sum(kp.nbytes().values()) + sum(vp.nbytes().values())
    return q, kp, vp, scale, nbytes, reference(q, kp, vp, scale)


def sweep_shape(b: int, n: int, group: int, args, baselines: dict, sms: int, copy_bw: float) -> tuple[dict, dict]:
    """Every launch configuration at one shape, plus the yardsticks; ``(summary, sweep)``."""
    hkv = 8
    q, kp, vp, scale, nbytes, expected = layer_data(b, n, group, hkv)
    rows = []
    configs = itertools.product(args.warps, args.stages, args.split_factors, args.max_registers, args.groups_per_block)
    for warps, stages, factor, regs, per_block in configs:
        run = functools.partial(
            packed_decode_attention, q, kp, vp, scale, None, kernel="triton",
            launch=TritonLaunch(num_warps=warps, num_stages=stages, split_factor=factor, max_registers=regs or None,
                                groups_per_block=per_block),
        )  # fmt: skip
        try:
            out = run()[0].reshape(expected.shape)
            ms = bench(run, warmup=3, reps=20)
        except Exception as err:  # a configuration that does not compile (registers, shared memory)
            print(
                f"warps={warps} stages={stages} factor={factor} max_registers={regs} groups_per_block={per_block}:"
                f" {type(err).__name__}: {err}"[:300]
            )
            continue
        rel = float((out - expected).norm() / expected.norm())
        rows.append(
            {
                "ms": ms, "warps": warps, "stages": stages, "split_factor": factor, "max_registers": regs,
                "groups_per_block": per_block, "rel_err": rel,
            }
        )  # fmt: skip
    rows.sort(key=lambda r: r["ms"])
    defaults = (NUM_WARPS, NUM_STAGES, SPLIT_FACTOR, MAX_REGISTERS or 0, default_groups_per_block(group, 4))
    keys = ("warps", "stages", "split_factor", "max_registers", "groups_per_block")
    default = [r["ms"] for r in rows if tuple(r[k] for k in keys) == defaults]
    baseline_ms = {name: bench(functools.partial(fn, q, kp, vp, scale, None)) for name, fn in baselines.items()}
    baseline_err = {
        name: float((fn(q, kp, vp, scale, None)[0].reshape(expected.shape) - expected).norm() / expected.norm())
        for name, fn in baselines.items()
    }
    summary = {
        "batch": b,
        "tokens": n,
        "group": group,
        "bytes": nbytes,
        "copy_GBps": copy_bw / 1e9,
        "read_only_ms": time_read_only(kp, vp, b, hkv, n, group, sms),
        "baseline_ms": baseline_ms,
        "baseline_rel_err": baseline_err,
        "default_ms": default[0] if default else float("nan"),
        "best": rows[0],
        "worst_rel_err": max(r["rel_err"] for r in rows),
    }
    return summary, {"batch": b, "tokens": n, "group": group, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", nargs="*", default=[], help="files with other packed_decode_attention versions")
    parser.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--split-factors", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--max-registers", type=int, nargs="+", default=[0], help="register caps to try (0: none)")
    parser.add_argument("--groups-per-block", type=int, nargs="+", default=[1, 2, 4], help="key groups per loop block")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    baselines = {Path(path).stem: load_baseline(path) for path in args.baseline}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy_bw = copy_bandwidth()
    summary, sweeps = [], []
    for b, n, group in SHAPES:
        shape_summary, sweep = sweep_shape(b, n, group, args, baselines, sms, copy_bw)
        summary.append(shape_summary)
        sweeps.append(sweep)
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "summary": summary, "sweeps": sweeps}, f, indent=2)
    for sweep in sweeps:
        print(f"\nb={sweep['batch']} n={sweep['tokens']} group={sweep['group']}: fastest 5")
        for r in sweep["rows"][:5]:
            print(
                f"  {r['ms']:.3f} ms  warps={r['warps']} stages={r['stages']} split_factor={r['split_factor']}"
                f" max_registers={r['max_registers']} groups_per_block={r['groups_per_block']}"
            )
    print(f"\n{torch.cuda.get_device_name()}, copy {copy_bw / 1e9:.0f} GB/s (read + write)")
    names = list(baselines)
    print(
        f"{'b':>3} {'ctx':>6} {'grp':>4} {'MB':>5} {'read ms':>8}"
        + "".join(f" {name[:8]:>8}" for name in names)
        + f" {'dflt ms':>8} {'best ms':>8} {'w/s/f/r/g':>11} {'% copy':>7} {'% read':>7} {'rel err':>8}"
    )
    for s in summary:
        best = s["best"]
        config = "/".join(
            str(best[k]) for k in ("warps", "stages", "split_factor", "max_registers", "groups_per_block")
        )
        print(
            f"{s['batch']:>3} {s['tokens']:>6} {s['group']:>4} {s['bytes'] / 1e6:>5.0f} {s['read_only_ms']:>8.3f}"
            + "".join(f" {s['baseline_ms'][name]:>8.3f}" for name in names)
            + f" {s['default_ms']:>8.3f} {best['ms']:>8.3f} {config:>11}"
            f" {100 * s['bytes'] / (best['ms'] / 1e3) / (s['copy_GBps'] * 1e9):>6.1f}%"
            f" {100 * s['read_only_ms'] / best['ms']:>6.0f}% {s['worst_rel_err']:>8.1e}"
        )


if __name__ == "__main__":
    main()
