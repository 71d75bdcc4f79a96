"""End to end through ``model.generate()``: a real prompt, a real prefill, then decoding.

What a user does, per contender and batch: random prompt token ids of ``--context`` tokens go
through ``model.generate()`` (one prefill forward, as generate does it, so each cache's own
update and attention run on the prompt), then ``--new-tokens`` tokens are decoded greedily.
A streamer stamps every token as it leaves ``generate()`` (after a device synchronization),
so nothing is skipped and nothing is timed twice.

Contenders (all in the same process and run):

* ``dynamic``: ``generate()`` with no cache argument (transformers' DynamicCache, bf16);
* ``static``: ``generate(cache_implementation="static")``, which transformers compiles with
  ``torch.compile(mode="reduce-overhead")`` (CUDA); a first untimed call pays the compilation;
* ``static-compiled``: ``StaticCache`` with the decode steps of ``model.forward`` compiled by
  the user (``torch.compile(mode="reduce-overhead", fullgraph=True)``, a step boundary marked
  before each call); the prefill runs uncompiled, as in generate's own auto-compile; a first
  untimed call pays the compilation;
* ``quantized``: transformers' ``QuantizedCache`` (quanto, int2, residual 128), as shipped;
* every policy name: ``load_policy(name).make_cache(model)``, exactly as shipped (executor
  ``auto``, ``cuda_graphs="auto"``: on CUDA the decode steps of a policy the graph path
  serves are replayed from a CUDA graph captured at the first decode step, whose time is the
  first entry of ``steps_s``);
* ``NAME+eager``: ``make_cache(model, cuda_graphs=False)``, every step issued eagerly;
* ``NAME+graphs``: ``make_cache(model, cuda_graphs=True, max_cache_len=...)`` (the prompt plus
  the new tokens): buffers sized once for the whole generation.

Per contender and batch: time to first token (the prefill, from the ``generate()`` call),
decode ms/step (mean over the steps after ``--warmup``, demotion steps included), peak memory
during the prefill and during decoding (CUDA: allocated bytes above the weights; CPU: the
child process's peak resident memory above its start, each contender in a fresh process),
KV bytes held at the end, the floor of a decode step (the weights and the KV bytes held, read
once at the device's copy bandwidth measured at the start of the run; CUDA), and the tokens/s
of a workload of ``--context`` + ``--workload``
new tokens, projected from the measured time to first token and mean step
(``batch * workload / (ttft + (workload - 1) * step)``). ``--largest`` searches each cache's
largest batch with a real prefill (predicted from the measured memory, see
:func:`predicted_batch`, then measured there with ``--largest-new-tokens`` new tokens, backing
off on out-of-memory). ``--tokens-per-forward N`` bounds every prefill forward to ``N`` tokens:
by token chunks (``generate(prefill_chunk_size=...)``), or with ``--prefill-rows`` by whole rows
(:func:`kvpolicy.generation.prefill`, then ``generate()`` from the filled cache; DynamicCache
and kvpolicy caches).

    python -m benchmarks.e2e_bench --context 32768 --batches 1,8 --out benchmarks/results/e2e_h200.json
    python -m benchmarks.e2e_bench --shape tiny --device cpu --context 8192 --batches 1 --new-tokens 5 \\
        --contenders dynamic,logquant,kivi --out benchmarks/results/e2e_cpu_tiny.json

Ratios in the table are against ``dynamic`` measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import platform
import resource
import sys
import time

import torch

from benchmarks.hand_loop import LOOPS, run_loop, static_prefill
from benchmarks.model_bench import LLAMA_8B, sdpa_backends
from kvpolicy.generation import cache_kwargs, prefill, prefill_chunk_size, prefill_rows

SHAPES = {
    "llama-8b": LLAMA_8B,
    # the CPU case of issue #21: 2 layers, 8 query heads, 2 KV heads of 64
    "tiny": dict(LLAMA_8B, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, vocab_size=1024),
}  # fmt: skip
BASELINES = ("dynamic", "static", "static-compiled", "quantized", *LOOPS)
COMPILED = ("static", "static-compiled", "static-loop")  # compiled on a first, untimed call
#: the 16-bit contenders each ratio is taken against: the faster of each group at the same batch
DYNAMIC = ("dynamic", "dynamic-loop")
STATIC = ("static", "static-compiled", "static-loop")
DEFAULT_CONTENDERS = (
    "dynamic",
    "static-compiled",
    "quantized",
    "logquant",
    "kivi",
    "partial_logquant",
    "sink_kivi",
    "streaming",
    "logquant+eager",
)


def build_model(shape: dict, device: str):
    """A Llama of ``shape`` with random bf16 weights, built directly on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape)
    config._attn_implementation = "sdpa"
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(dtype)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model.eval()


class StepClock:
    """A ``generate()`` streamer that stamps each ``put`` (the prompt, then every new token)."""

    def __init__(self, device: str):
        self.device = device
        self.times: list[float] = []
        self.prefill_peak: int | None = None

    def put(self, value) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        if self.device == "cuda" and len(self.times) == 2:  # the first new token: prefill done
            self.prefill_peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    def end(self) -> None:
        pass


def generate_kwargs(name: str, model, max_cache_len: int) -> dict:
    """How a user asks ``generate()`` for contender ``name`` (``max_cache_len``: prompt + new tokens)."""
    from kvpolicy.generation import cache_kwargs

    if name == "dynamic":
        return {}
    if name in ("static", "static-compiled"):
        return {"cache_implementation": "static"}
    if name == "quantized":
        from transformers.cache_utils import QuantizedCache

        return cache_kwargs(QuantizedCache(backend="quanto", config=model.config, nbits=2, residual_length=128))
    from kvpolicy import load_policy

    if name.endswith("+graphs"):
        policy = load_policy(name.removesuffix("+graphs"))
        return cache_kwargs(policy.make_cache(model, cuda_graphs=True, max_cache_len=max_cache_len))
    if name.endswith("+eager"):
        return cache_kwargs(load_policy(name.removesuffix("+eager")).make_cache(model, cuda_graphs=False))
    return cache_kwargs(load_policy(name).make_cache(model))


def cache_factory(name: str, model, max_cache_len: int):
    """A function making an empty cache of contender ``name`` for
    :func:`kvpolicy.generation.prefill` (DynamicCache and kvpolicy caches)."""
    if name in ("dynamic", "dynamic-loop"):
        from transformers import DynamicCache

        return lambda: DynamicCache(config=model.config)
    if name in STATIC or name == "quantized":
        raise ValueError(
            f"--prefill-rows fills DynamicCache, kvpolicy caches and static-loop's StaticCache, not {name!r}"
        )
    return lambda: next(iter(generate_kwargs(name, model, max_cache_len).values()))


def cache_bytes(cache) -> int | None:
    from kvpolicy.evaluation.contenders import cache_nbytes

    try:
        return cache_nbytes(cache)
    except Exception:  # a cache layout the helper does not know (e.g. a compiled static cache)
        return None


def run_generate(
    model,
    name: str,
    batch: int,
    context: int,
    new_tokens: int,
    device: str,
    prefill_chunk: int | None = None,
    rows_per_forward: int | None = None,
) -> dict:
    """One ``generate()`` call (or hand loop); returns its timings, memory and KV bytes.
    ``prefill_chunk``: its prefill in chunks of that many tokens a row; ``rows_per_forward``:
    instead, the prompt prefilled by :func:`kvpolicy.generation.prefill`, forwards of at most
    that many tokens in whole rows, before the call (timed with it)."""
    if name in BASELINES:  # the attention a user of that cache has (kvpolicy may have switched it)
        model.set_attn_implementation("sdpa")
    g = torch.Generator().manual_seed(batch * 7919 + context)
    ids = torch.randint(1, model.config.vocab_size, (batch, context), generator=g).to(device)
    mask = torch.ones_like(ids)
    kwargs = {} if name in LOOPS else generate_kwargs(name, model, context + new_tokens)
    if prefill_chunk:
        kwargs["prefill_chunk_size"] = prefill_chunk
    saved_forward = model.__dict__.get("forward")  # kvpolicy's CUDA-graph wrapper, when installed
    if name == "static-compiled":
        model.forward = compiled_forward(model)
    try:
        if rows_per_forward:
            if name == "static-loop":

                def prefilled():
                    return static_prefill(model, ids, rows_per_forward, context + new_tokens)

            else:
                new_cache = cache_factory(name, model, context + new_tokens)

                def prefilled():
                    return prefill(model, new_cache, ids, tokens_per_forward=rows_per_forward)

            if name in LOOPS:
                return _timed(ids, device, lambda clock: run_loop(model, name, ids, new_tokens, None, clock, prefilled))
            return _timed(
                ids, device, lambda clock: _generate(model, ids, mask, new_tokens, clock, cache_kwargs(prefilled()))
            )
        if name in LOOPS:
            return _timed(ids, device, lambda clock: run_loop(model, name, ids, new_tokens, prefill_chunk, clock))
        return _timed(ids, device, lambda clock: _generate(model, ids, mask, new_tokens, clock, kwargs))
    finally:
        if saved_forward is not None:
            model.forward = saved_forward
        else:
            model.__dict__.pop("forward", None)
        release()


def compiled_forward(model):
    """The forward of the model's class (not a kvpolicy wrapper) compiled with
    ``mode="reduce-overhead"`` for decode steps (one token per row); multi-token calls (the
    prefill, which also allocates the StaticCache's tensors) run uncompiled. Each compiled call
    starts a new CUDA-graph step and hands ``generate()`` a copy of the logits (the graph's
    output buffer is overwritten by the next step)."""
    import functools

    original = type(model).forward.__get__(model)
    compiled = torch.compile(original, mode="reduce-overhead", fullgraph=True)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or ids.shape[1] != 1:
            return original(*args, **kwargs)
        torch.compiler.cudagraph_mark_step_begin()
        out = compiled(*args, **kwargs)
        out.logits = out.logits.clone()
        return out

    return forward


def _generate(model, ids, mask, new_tokens: int, clock, kwargs: dict):
    """``generate()`` as a user calls it; returns ``(new token ids, cache)``."""
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        streamer=clock, return_dict_in_generate=True, **kwargs,
    )  # fmt: skip
    return out.sequences[:, ids.shape[1] :], out.past_key_values


def _timed(ids, device: str, call) -> dict:
    """Times ``call(clock)`` (a ``generate()`` or a hand loop stamping ``clock``): time to
    first token, every step, peak memory during the prefill and during decoding, KV bytes held."""
    clock = StepClock(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    tokens, cache = call(clock)
    steps = [b - a for a, b in zip(clock.times[1:], clock.times[2:])]
    result = {
        "ttft_s": clock.times[1] - start,
        "steps_s": steps,
        "total_s": clock.times[-1] - start,
        "kv_bytes": cache_bytes(cache),
        "generated": int(tokens.shape[1]),
    }
    if device == "cuda":
        result["prefill_peak_bytes"] = clock.prefill_peak
        result["decode_peak_bytes"] = torch.cuda.max_memory_allocated()
    del tokens, cache
    return result


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(model, name: str, batch: int, args, new_tokens: int | None = None) -> dict:
    """Timings of ``name`` at ``batch`` (a first untimed call compiles ``static``)."""
    chunk, rows = args.prefill_chunk, None
    if args.tokens_per_forward and args.prefill_rows:
        rows = args.tokens_per_forward
    elif args.tokens_per_forward:
        chunk = prefill_chunk_size(batch, args.tokens_per_forward)
    row = {"contender": name, "batch": batch, "context": args.context, "prefill_chunk": chunk}
    if rows:
        row["prefill_rows_per_forward"] = prefill_rows(args.context, rows)
    try:
        if name in COMPILED and args.device == "cuda":
            begin = time.perf_counter()
            run_generate(model, name, batch, args.context, 2 + args.warmup, args.device, chunk, rows)
            row["first_call_s"] = time.perf_counter() - begin
        new = new_tokens or args.new_tokens
        row.update(run_generate(model, name, batch, args.context, new, args.device, chunk, rows))
    except torch.OutOfMemoryError as err:
        row["error"] = f"out of memory: {str(err).splitlines()[0]}"
        release()
    except Exception as err:  # recorded, so one contender's failure does not hide the others'
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        release()
    if "steps_s" in row:
        timed = row["steps_s"][args.warmup :] or row["steps_s"]
        row["decode_ms"] = 1e3 * sum(timed) / len(timed)
        row["workload_tokens_per_s"] = (
            batch * args.workload / (row["ttft_s"] + (args.workload - 1) * row["decode_ms"] / 1e3)
        )
        row["tokens_per_s"] = batch * row["generated"] / row["total_s"]  # measured: prefill and every step
    return row


def _child(conn, shape, name, batch, args) -> None:
    """A fresh process for one CPU measurement, so its peak resident memory is its own."""
    torch.manual_seed(0)
    model = build_model(shape, "cpu")
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row = measure(model, name, batch, args)
    row["peak_rss_above_start_bytes"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_rss) * 1024
    conn.send(row)


def measure_isolated(shape, name, batch, args) -> dict:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child, shape, name, batch, args))
    proc.start()
    row = (
        parent.recv() if parent.poll(args.child_timeout) else {"contender": name, "batch": batch, "error": "timed out"}
    )
    proc.join()
    return row


def predicted_batch(rows: list[dict], args, total: int) -> tuple[int, dict]:
    """The largest batch whose decoding and prefill both stay within ``--memory-fraction`` of
    ``total`` bytes, from two measured batches ``rows`` (smallest and largest), with how it was
    found. Decoding holds the weights and what grows with the batch (read off the two decode
    peaks, scaled to the longer sequences of ``--largest-new-tokens``). A bounded prefill
    (``--tokens-per-forward``) peaks at the weights, the prompt's KV and one forward's
    activations, the same at every batch whose forwards are full: its part that grows with the
    batch is the KV held per row, measured at the larger batch; a one-forward prefill grows as
    its two peaks say."""
    (b0, r0), (b1, r1) = (rows[0]["batch"], rows[0]), (rows[-1]["batch"], rows[-1])
    limit = total * args.memory_fraction
    longer = max(1.0, (args.context + args.largest_new_tokens) / (args.context + args.new_tokens))
    decode_row = max(1.0, (r1["decode_peak_bytes"] - r0["decode_peak_bytes"]) / (b1 - b0))
    decode_base = r0["decode_peak_bytes"] - b0 * decode_row
    if args.tokens_per_forward and r1.get("kv_bytes"):
        prefill_row = r1["kv_bytes"] / b1
    else:
        prefill_row = max(1.0, (r1["prefill_peak_bytes"] - r0["prefill_peak_bytes"]) / (b1 - b0))
    prefill_base = r1["prefill_peak_bytes"] - b1 * prefill_row
    by_decode = int((limit - decode_base) / (decode_row * longer))
    by_prefill = int((limit - prefill_base) / prefill_row)
    how = {"per_sequence_bytes": decode_row * longer, "by_decode": by_decode, "by_prefill": by_prefill}
    return max(1, min(by_decode, by_prefill)), how


def largest_batch(model, name: str, rows: list[dict], args) -> tuple[dict, dict | None]:
    """The largest batch whose real prefill and decoding fit, and the measurement there:
    predicted from the peaks at the measured batches (:func:`predicted_batch`), then measured
    with ``--largest-new-tokens`` tokens, backing off by ``--backoff`` on out-of-memory."""
    measured = sorted((r for r in rows if r["contender"] == name and "error" not in r and not r.get("largest")),
                      key=lambda r: r["batch"])  # fmt: skip
    if len({r["batch"] for r in measured}) < 2:
        return {"contender": name, "error": "needs two measured batches to predict from"}, None
    batch, how = predicted_batch(measured, args, torch.cuda.get_device_properties(0).total_memory)
    found = {"contender": name, "predicted_batch": batch, **how, "tried": []}
    for _ in range(args.tries):
        row = measure(model, name, batch, args, args.largest_new_tokens)
        if "error" not in row:
            found["tried"].append([batch, "fits"])
            return found | {"largest_batch": batch}, row | {"largest": True}
        found["tried"].append([batch, row["error"]])
        if "out of memory" not in row["error"]:
            break
        batch = max(1, int(batch * (1 - args.backoff)))
    return found | {"error": "no batch fitted"}, None


def weight_bytes(model) -> int:
    """Bytes of the weights a decode step reads: every parameter but the input embedding table
    (a step reads one row of it)."""
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding)


def copy_bandwidth(device: str, nbytes: int = 2 * 2**30, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy (read plus write), the best of ``repeats``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - begin)
    del src, dst
    release()
    return 2 * nbytes / best


def floor_ms(row: dict, weights: int | None, bandwidth: float | None) -> float | None:
    """The least time a decode step can take: the weights and the KV bytes held, read once
    at the measured copy bandwidth (``None`` when either is unknown)."""
    if not weights or not bandwidth or not row.get("kv_bytes"):
        return None
    return 1e3 * (weights + row["kv_bytes"]) / bandwidth


def fastest(rows: list[dict], group: tuple[str, ...], key: str, higher: bool = False) -> dict | None:
    """The row of ``group`` with the best ``key`` (lowest, or highest with ``higher``)."""
    found = [r for r in rows if r["contender"] in group and "error" not in r and r.get(key)]
    if not found:
        return None
    return (max if higher else min)(found, key=lambda r: r[key])


def largest_table(largest: list[dict]) -> list[str]:
    """Each cache at its largest batch: the measured tokens/s of the whole run (prefill and
    every step), against the faster of DynamicCache's two drivers and of the StaticCache +
    compile drivers, each at its own largest batch."""
    dynamic = fastest(largest, DYNAMIC, "tokens_per_s", higher=True)
    static = fastest(largest, STATIC, "tokens_per_s", higher=True)
    lines = [
        f"| contender | largest batch | vs {dynamic['contender'] if dynamic else 'dynamic'} | time to first token "
        f"| decode ms/step | tokens/s measured | vs {dynamic['contender'] if dynamic else 'dynamic'} "
        f"| vs {static['contender'] if static else 'static'} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in largest:

        def vs(top, key, r=r):
            return f"{r[key] / top[key]:.2f}x" if top else "-"

        lines.append(
            f"| {r['contender']} | {r['batch']} | {vs(dynamic, 'batch')} | {r['ttft_s']:.1f} s | {r['decode_ms']:.1f} "
            f"| {r['tokens_per_s']:.0f} | {vs(dynamic, 'tokens_per_s')} | {vs(static, 'tokens_per_s')} |"
        )
    return lines


def prompt_kv_bytes(row: dict) -> float:
    """The KV bytes held at the end of the prefill, estimated from those held at the end
    (``kv_bytes``, after ``generated - 1`` more tokens) in proportion to the tokens."""
    return row["kv_bytes"] * row["context"] / (row["context"] + row.get("generated", 1) - 1)


def table(rows: list[dict], weights: int | None = None, bandwidth: float | None = None) -> str:
    """Markdown table; ratios against the faster of ``dynamic`` (through ``generate()``) and
    ``dynamic-loop`` (a hand loop) at the same batch, each figure against the better of the two
    (the decode step also against the fastest StaticCache + compile driver); the floor (see
    :func:`floor_ms`) where the weights' bytes and the copy bandwidth are known; on CUDA the
    prefill's peak above the weights and the KV bytes of the prompt (:func:`prompt_kv_bytes`)."""
    largest = [r for r in rows if r.get("largest")]
    rows = [r for r in rows if not r.get("largest")]
    lines = [
        "| contender | batch | time to first token | vs dynamic | decode ms/step | vs dynamic | vs static "
        "| floor ms | step / floor | prefill peak MiB | over weights+KV MiB | KV MiB | workload tok/s | vs dynamic |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['contender']} | {r['batch']} | {r['error']} |" + " |" * 11)
            continue
        same = [x for x in rows if x["batch"] == r["batch"]]

        def ratio(key, group=DYNAMIC, higher=False, r=r, same=same):
            b = fastest(same, group, key, higher)
            return f"{r[key] / b[key]:.2f}x" if b else "-"

        peak = r.get("prefill_peak_bytes") or r.get("peak_rss_above_start_bytes")
        over = "-"
        if r.get("prefill_peak_bytes") and weights and r.get("kv_bytes"):
            over = f"{(r['prefill_peak_bytes'] - weights - prompt_kv_bytes(r)) / 2**20:.0f}"
        kv = f"{r['kv_bytes'] / 2**20:.1f}" if r.get("kv_bytes") else "-"
        floor = floor_ms(r, weights, bandwidth)
        floors = f"{floor:.1f} | {r['decode_ms'] / floor:.1f}x" if floor else "- | -"
        lines.append(
            f"| {r['contender']} | {r['batch']} | {r['ttft_s']:.2f} s | {ratio('ttft_s')} | {r['decode_ms']:.1f} "
            f"| {ratio('decode_ms')} | {ratio('decode_ms', STATIC)} | {floors} | {peak / 2**20 if peak else 0:.0f} "
            f"| {over} | {kv} | {r['workload_tokens_per_s']:.1f} | {ratio('workload_tokens_per_s', higher=True)} |"
        )
    if largest:
        lines += ["", *largest_table(largest)]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=4, help="decode steps left out of the mean")
    p.add_argument("--workload", type=int, default=256, help="new tokens of the projected workload")
    p.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS))
    p.add_argument(
        "--sdpa",
        choices=("no-cudnn", "default"),
        default="no-cudnn",
        help="SDPA backends (no-cudnn spares the 16-bit baselines cuDNN's per-length re-planning)",
    )
    p.add_argument("--prefill-chunk", type=int, help="generate()'s prefill_chunk_size (default: one prefill forward)")
    p.add_argument(
        "--tokens-per-forward",
        type=int,
        help="bounded prefill: prefill_chunk_size=kvpolicy.generation.prefill_chunk_size(batch, N) at each batch",
    )
    p.add_argument(
        "--prefill-rows",
        action="store_true",
        help="with --tokens-per-forward: bound the prefill by whole rows (kvpolicy.generation.prefill; "
        "static-loop: benchmarks.hand_loop.static_prefill), not chunks",
    )
    p.add_argument("--largest", action="store_true", help="also search each cache's largest batch (CUDA)")
    p.add_argument("--largest-new-tokens", type=int, default=12, help="new tokens timed at the largest batch")
    p.add_argument("--memory-fraction", type=float, default=0.97)
    p.add_argument("--backoff", type=float, default=0.08)
    p.add_argument("--tries", type=int, default=4)
    p.add_argument("--child-timeout", type=float, default=1800)
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args(argv)
    for name in ("context", "new_tokens", "workload", "tries", "largest_new_tokens"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("prefill_chunk", "tokens_per_forward"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.prefill_rows and not args.tokens_per_forward:
        p.error("--prefill-rows bounds the prefill by --tokens-per-forward: give it")
    if args.prefill_chunk and args.tokens_per_forward:
        p.error("--prefill-chunk and --tokens-per-forward both set the prefill's chunks: give one")
    if min(args.new_tokens, args.largest_new_tokens) <= args.warmup:
        p.error(f"--new-tokens and --largest-new-tokens must exceed --warmup ({args.warmup})")
    return args


@torch.inference_mode()
def main(argv=None) -> int:
    args = parse_args(argv)
    shape = SHAPES[args.shape]
    names = [n for n in args.contenders.split(",") if n]
    if args.device != "cuda":
        names = [n for n in names if n not in COMPILED]  # reduce-overhead: CUDA graphs
    batches = [int(b) for b in args.batches.split(",")]
    rows: list[dict] = []
    largest: list[dict] = []
    record = {
        "command": "python -m benchmarks.e2e_bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "shape": args.shape,
        "args": vars(args),
        "rows": rows,
        "largest": largest,
    }

    def keep(row: dict, into: list[dict]) -> None:
        """Print a result and rewrite the record (a run stopped midway keeps what it measured)."""
        into.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "steps_s"}), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(record, f, indent=1)

    model = None if args.device == "cpu" else build_model(shape, args.device)
    if model is not None:
        record["weight_bytes"] = weight_bytes(model)
        record["copy_bytes_per_s"] = copy_bandwidth(args.device)
    with sdpa_backends(args.sdpa):
        for batch in batches:
            for name in names:
                keep(
                    measure_isolated(shape, name, batch, args) if model is None else measure(model, name, batch, args),
                    rows,
                )
        if args.largest and model is not None:
            for name in names:
                found, at = largest_batch(model, name, rows, args)
                keep(found, largest)
                if at is not None:
                    keep(at, rows)
    print(table(rows, record.get("weight_bytes"), record.get("copy_bytes_per_s")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
