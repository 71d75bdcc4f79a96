"""Host and wall time of one layer's decode step (store update + attention), per policy.

A model's step runs the cache layer and executor once per layer, so their host time is
multiplied by the number of layers; this measures it for one Llama-3.1-8B layer (8 KV heads
of 128, 32 query heads) without the model around it, so that variants can be compared in
one process, interleaved, on a shared machine whose speed drifts. Each variant is a
policy with the ``fused`` executor, as ``name`` or ``name:index`` (the pairing gathers
leftover tokens by index, as its first version did, instead of joining slices of runs).
Host-time ratios are against the first variant, measured in the same rounds.

    python -m benchmarks.layer_step --variants logquant,partial_logquant:index,partial_logquant
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from benchmarks.model_bench import fused_policy
from kvpolicy.executors import pairing


class Module(torch.nn.Module):
    num_key_value_groups = 4
    is_causal = True


@contextlib.contextmanager
def gather_by(mode: str):
    saved = pairing.MAX_RUNS
    pairing.MAX_RUNS = -1 if mode == "index" else saved
    try:
        yield
    finally:
        pairing.MAX_RUNS = saved


def build(name: str, batch: int, context: int, device: str):
    layer = fused_policy(name).new_layer(128)
    keys, values = torch.randn(2, batch, 8, context, 128, dtype=torch.bfloat16, device=device)
    layer.update(keys, values)
    return layer


def one_step(layer, batch: int, device: str) -> None:
    k, v = torch.randn(2, batch, 8, 1, 128, dtype=torch.bfloat16, device=device)
    tagged, _ = layer.update(k, v)
    query = torch.randn(batch, 32, 1, 128, dtype=torch.bfloat16, device=device)
    layer.executor.attend(Module(), query, tagged._kvpolicy_step[0], None, scaling=128**-0.5)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="logquant,partial_logquant:index,partial_logquant")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=50, help="steps per variant and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    variants = [(v.split(":") + ["runs"])[:2] for v in args.variants.split(",")]
    layers = {i: build(name, args.batch, args.context, args.device) for i, (name, _) in enumerate(variants)}
    host: dict[int, list[float]] = {i: [] for i in layers}
    wall: dict[int, list[float]] = {i: [] for i in layers}
    with torch.inference_mode():
        for i, (_, mode) in enumerate(variants):  # warm-up: compile the kernels
            with gather_by(mode):
                for _ in range(3):
                    one_step(layers[i], args.batch, args.device)
        for _ in range(args.rounds):
            for i, (_, mode) in enumerate(variants):
                with gather_by(mode):
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        one_step(layers[i], args.batch, args.device)
                    t1 = time.perf_counter()
                    sync()
                    t2 = time.perf_counter()
                host[i].append((t1 - t0) / args.steps * 1e3)
                wall[i].append((t2 - t0) / args.steps * 1e3)
    print(f"one layer, batch {args.batch}, context {args.context}, {args.device}; median of {args.rounds} rounds")
    print(f"{'variant':<36}{'host ms':>10}{'wall ms':>10}{'host vs first':>15}")
    first = statistics.median(host[0])
    for i, (name, mode) in enumerate(variants):
        h, w = statistics.median(host[i]), statistics.median(wall[i])
        label = name + (" (gather by index)" if mode == "index" else "")
        print(f"{label:<36}{h:>10.3f}{w:>10.3f}{h / first:>14.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
