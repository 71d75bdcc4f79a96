"""Where a decode step's time goes: host vs device, synchronizations, Python hot spots.

For each ``contender:context:batch`` run (Llama-3.1-8B shapes, random weights, filled as in
``model_bench``) it prints:

* ``wall``: median milliseconds per step, synchronized after each step;
* ``host``: milliseconds the host spends issuing a step (the ``model(...)`` call returns
  before the device is done unless something in it synchronizes);
* ``device``: milliseconds of kernels per step (torch.profiler, summed over CUDA kernels);
* with ``--sync-debug``: every place in a step that makes the host wait for the device;
* with ``--python N``: the N Python functions with the most own time (cProfile);
* with ``--ops N``: the N operators with the most host time (torch.profiler).

A step is host-bound when ``wall`` is close to ``host`` and above ``device``.

    python -m benchmarks.profile_step --runs dynamic:32768:8,logquant:32768:8 --sync-debug --python 25
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import json
import pathlib
import pstats
import time
import traceback
import warnings

import torch

from benchmarks.model_bench import LLAMA_8B, build_model, fill, make_cache, release, sdpa_backends


def step(model, cache, tokens) -> None:
    model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)


def timed(model, cache, tokens, steps: int) -> tuple[float, float]:
    """Median (wall, host) milliseconds per step."""
    walls, hosts = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(model, cache, tokens)
        issued = time.perf_counter()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
        hosts.append(issued - start)
    return sorted(walls)[steps // 2] * 1e3, sorted(hosts)[steps // 2] * 1e3


def device_ms(model, cache, tokens, steps: int, ops: int) -> float:
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step(model, cache, tokens)
        torch.cuda.synchronize()
    events = prof.key_averages()
    if ops:
        print(events.table(sort_by="self_cpu_time_total", row_limit=ops, max_name_column_width=50))
    total_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return total_us / steps / 1e3


def synchronizations(model, cache, tokens) -> collections.Counter:
    """Python call sites (innermost three frames) of every synchronizing CUDA call in one step."""
    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = traceback.extract_stack()[:-1]
        inner = [f for f in frames if "warnings" not in f.filename][-3:]
        sites[" <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in reversed(inner))] += 1

    with warnings.catch_warnings():  # restores the filters and showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(model, cache, tokens)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sites


def python_profile(model, cache, tokens, steps: int, top: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step(model, cache, tokens)
    torch.cuda.synchronize()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="dynamic:32768:8,logquant:32768:8", help="contender:context:batch,...")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sdpa", choices=("no-cudnn", "default"), default="no-cudnn")
    parser.add_argument("--sync-debug", action="store_true")
    parser.add_argument("--python", type=int, default=0, metavar="N")
    parser.add_argument("--ops", type=int, default=0, metavar="N")
    parser.add_argument("--out", help="also write the table as JSON rows")
    args = parser.parse_args(argv)
    model = build_model(LLAMA_8B, "cuda")
    rows = []
    for run in args.runs.split(","):
        name, context, batch = run.split(":")
        context, batch = int(context), int(batch)
        cache = make_cache(name, model)
        fill(cache, model, batch, context, 4096, "cuda")
        tokens = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
        with torch.inference_mode(), sdpa_backends(args.sdpa):
            for _ in range(3):
                step(model, cache, tokens)
            wall, host = timed(model, cache, tokens, args.steps)
            print(f"== {name} context {context} batch {batch}", flush=True)
            device = device_ms(model, cache, tokens, 3, args.ops)
            if args.sync_debug:
                sites = synchronizations(model, cache, tokens)
                print(f"synchronizations in one step: {sum(sites.values())}")
                for site, n in sites.most_common(12):
                    print(f"  {n:4d}  {site}")
            if args.python:
                print(python_profile(model, cache, tokens, 3, args.python))
        rows.append((name, context, batch, wall, host, device))
        del cache
        release()
    print(f"{'contender':<18}{'context':>8}{'batch':>6}{'wall ms':>10}{'host ms':>10}{'device ms':>11}")
    for name, context, batch, wall, host, device in rows:
        print(f"{name:<18}{context:>8}{batch:>6}{wall:>10.1f}{host:>10.1f}{device:>11.1f}")
    if args.out:
        keys = ("contender", "context", "batch", "wall_ms", "host_ms", "device_ms")
        pathlib.Path(args.out).write_text(json.dumps([dict(zip(keys, row)) for row in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
