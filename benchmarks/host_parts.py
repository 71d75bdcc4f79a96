"""Host time of the parts of one layer's decode step, against DynamicCache's layer, on one GPU.

A decode step at small batch is host-bound: the device finishes each layer's kernels before
the host has issued the next ones, so every microsecond of Python and every launch counts,
times the number of layers. This times, per call and without synchronizing inside the loop,
the pieces a step is made of for one Llama-3.1-8B layer (8 KV heads of 128, 32 query heads):
a bare torch operation (the host's price of one launch), DynamicCache's layer update plus
SDPA, and for each policy its store updates, its attention and the fused kernels alone.

    python -m benchmarks.host_parts --batch 1 --context 32768
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvpolicy import load_policy


class Module(torch.nn.Module):
    num_key_value_groups = 4
    is_causal = True


def timed(fn, calls: int, rounds: int, sync) -> float:
    """Median over ``rounds`` of the host microseconds per call of ``fn`` (one sync per round)."""
    out = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - start) / calls * 1e6)
        sync()
    return statistics.median(out)


def main(argv=None) -> int:
    from transformers.cache_utils import DynamicLayer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from kvpolicy.cache.attention import kvpolicy_attention
    from kvpolicy.executors.kernels import decode_attention

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--policies", default="logquant,kivi,partial_logquant,streaming")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    dev, b = args.device, args.batch
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    dtype = torch.bfloat16
    new = torch.randn(b, 8, 1, 128, dtype=dtype, device=dev)
    query = torch.randn(b, 32, 1, 128, dtype=dtype, device=dev)
    rows = []
    with torch.inference_mode():
        small = torch.randn(b, 8, 128, 128, dtype=dtype, device=dev)
        rows.append(("torch.empty", timed(lambda: torch.empty(8, device=dev), args.calls, args.rounds, sync)))
        rows.append(
            ("torch.cat of two small tensors", timed(lambda: torch.cat([small, new], 2), args.calls, args.rounds, sync))
        )

        dyn = DynamicLayer()
        dyn.update(*torch.randn(2, b, 8, args.context, 128, dtype=dtype, device=dev))

        def dynamic_step():
            k, v = dyn.update(new, new)
            dyn.keys, dyn.values = dyn.keys[:, :, :-1], dyn.values[:, :, :-1]  # stay at the context
            sdpa_attention_forward(Module(), query, k, v, None, scaling=128**-0.5)

        rows.append(("dynamic: update + SDPA", timed(dynamic_step, args.calls, args.rounds, sync)))
        for name in args.policies.split(","):
            layer = load_policy(name).new_layer(128)
            layer.update(*torch.randn(2, b, 8, args.context, 128, dtype=dtype, device=dev))
            module = Module()
            steps = []

            def update(layer=layer, steps=steps):
                steps.append(layer.update(new, new))

            def attend(module=module, steps=steps):
                k, v = steps.pop()
                kvpolicy_attention(module, query, k, v, None, scaling=128**-0.5)

            def both(layer=layer, module=module):
                k, v = layer.update(new, new)
                kvpolicy_attention(module, query, k, v, None, scaling=128**-0.5)

            rows.append((f"{name}: update + attention", timed(both, args.calls, args.rounds, sync)))
            # update and attention apart: the updates first, then the attention of each
            for _ in range(args.rounds):
                steps.clear()
                sync()
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    update()
                t1 = time.perf_counter()
                for _ in range(args.calls):
                    attend()
                t2 = time.perf_counter()
                sync()
            rows.append((f"{name}: update", (t1 - t0) / args.calls * 1e6))
            rows.append((f"{name}: attention", (t2 - t1) / args.calls * 1e6))
            view_k, view_v = layer.key_store.view(), layer.value_store.view()
            if dev == "cuda" and view_k.packed is not None and layer.aligned:
                full = [(view_k.fp, view_v.fp), (new, new)]

                def kernels(view_k=view_k, view_v=view_v, full=full):
                    decode_attention(query, full, view_k.packed, view_v.packed, 128**-0.5)

                rows.append(
                    (f"{name}: fused kernels alone (2 launches)", timed(kernels, args.calls, args.rounds, sync))
                )
    print(f"# host microseconds per call, one layer, batch {b}, context {args.context}, {dev}")
    print(f"{'part':48s} {'host us':>9s}")
    for part, us in rows:
        print(f"{part:48s} {us:9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
