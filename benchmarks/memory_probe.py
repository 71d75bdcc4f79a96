"""Where the memory of a ``generate()`` call goes: the allocations alive at the prefill's peak
and at the decode steps' peak, grouped by the line of kvpolicy or transformers that made them.

Each contender runs ``generate()`` as :mod:`benchmarks.e2e_bench` drives it (Llama-3.1-8B
shapes, random weights, the same bounded prefill), with PyTorch's allocator history recorded;
the history is replayed to find each phase's peak. Weights and whatever was allocated before
the call are one line ("before the call"). CUDA only.

    python -m benchmarks.memory_probe --contenders kivi,logquant --batch 32 --context 8192 \\
        --tokens-per-forward 16384 --out benchmarks/results/memory_probe_h100.json
"""

from __future__ import annotations

import argparse
import collections
import json

import torch

from benchmarks.e2e_bench import SHAPES, build_model, cache_bytes, generate_kwargs, release
from kvpolicy.generation import prefill_chunk_size

#: an allocation of this many bytes marks the end of the prefill in the recorded history
MARK_BYTES = 7_777_777 * 512


class PhaseMark:
    """A ``generate()`` streamer that allocates (and frees) a tensor of :data:`MARK_BYTES` when
    the first new token arrives, so the history says where the prefill ended."""

    def __init__(self) -> None:
        self.puts = 0

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            del_me = torch.empty(MARK_BYTES, dtype=torch.uint8, device="cuda")
            del del_me

    def end(self) -> None:
        pass


def _origin(frames: list[dict]) -> str:
    """The innermost frame in kvpolicy or transformers (else the innermost one) as ``file:line function``."""
    for frame in frames:
        name = frame.get("filename", "")
        for package in ("kvpolicy", "transformers"):
            if f"/{package}/" in name or f"/{package}_" in name:
                short = name[name.index(f"/{package}") + 1 :]
                return f"{short}:{frame.get('line')} {frame.get('name')}"
    return f"{frames[0].get('filename', '?')}:{frames[0].get('line')}" if frames else "?"


def peaks(trace: list[dict], before: int) -> dict:
    """Replays the allocator ``trace``: for the prefill (up to the mark) and for decoding, the
    peak bytes and the live allocations there, summed by origin."""
    events = [e for e in trace if e["action"] in ("alloc", "free_completed")]
    mark = next((i for i, e in enumerate(events) if e["action"] == "alloc" and e["size"] == MARK_BYTES), len(events))
    live: dict[int, int] = {}
    current, best = 0, {"prefill": (-1, -1), "decode": (-1, -1)}
    for i, e in enumerate(events):
        if i == mark or (i == mark + 1 and mark < len(events)):
            continue  # the mark itself and its free
        if e["action"] == "alloc":
            live[e["addr"]] = e["size"]
            current += e["size"]
        elif e["addr"] in live:
            current -= live.pop(e["addr"])
        phase = "prefill" if i < mark else "decode"
        if current > best[phase][0]:
            best[phase] = (current, i)
    out = {}
    for phase, (peak, at) in best.items():
        if at < 0:
            continue
        alive: dict[int, dict] = {}
        for i, e in enumerate(events[: at + 1]):
            if i in (mark, mark + 1):
                continue
            if e["action"] == "alloc":
                alive[e["addr"]] = e
            else:
                alive.pop(e["addr"], None)
        by_origin = collections.Counter()
        for e in alive.values():
            by_origin[_origin(e.get("frames", []))] += e["size"]
        out[phase] = {
            "peak_bytes": before + peak,
            "before_call_bytes": before,
            "by_origin": [[origin, n] for origin, n in by_origin.most_common(14)],
        }
    return out


def probe(model, name: str, batch: int, context: int, new_tokens: int, tokens_per_forward: int) -> dict:
    """One recorded ``generate()`` of ``name``; its phases' peaks and what they hold."""
    g = torch.Generator().manual_seed(batch * 7919 + context)
    ids = torch.randint(1, model.config.vocab_size, (batch, context), generator=g).cuda()
    kwargs = generate_kwargs(name, model, context + new_tokens)
    kwargs["prefill_chunk_size"] = prefill_chunk_size(batch, tokens_per_forward)
    release()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    try:
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, streamer=PhaseMark(), return_dict_in_generate=True, **kwargs,
        )  # fmt: skip
        kv = cache_bytes(out.past_key_values)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][0]
    del out
    release()
    row = {"contender": name, "batch": batch, "context": context, "new_tokens": new_tokens,
           "prefill_chunk": kwargs["prefill_chunk_size"], "kv_bytes": kv, "events": len(trace)}  # fmt: skip
    return row | peaks(trace, before)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    p.add_argument("--contenders", default="kivi,logquant")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--tokens-per-forward", type=int, default=16384)
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("memory_probe needs CUDA (it reads the CUDA allocator's history)")
    model = build_model(SHAPES[args.shape], "cuda")
    rows = []
    for name in args.contenders.split(","):
        rows.append(probe(model, name, args.batch, args.context, args.new_tokens, args.tokens_per_forward))
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"args": vars(args), "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    for r in rows:
        kv = f"{r['kv_bytes'] / 2**30:.2f} GiB" if r["kv_bytes"] else "?"
        print(f"\n## {r['contender']}, batch {r['batch']}, context {r['context']}, chunk {r['prefill_chunk']}, KV {kv}")
        for phase in ("prefill", "decode"):
            if phase not in r:
                continue
            info = r[phase]
            peak, before = info["peak_bytes"] / 2**30, info["before_call_bytes"] / 2**30
            print(f"{phase}: peak {peak:.2f} GiB (before the call {before:.2f})")
            for origin, n in info["by_origin"]:
                print(f"  {n / 2**30:8.3f} GiB  {origin}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
