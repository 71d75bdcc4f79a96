"""Decode speed and memory of a Llama-3.1-8B-shaped model under each cache, on one GPU.

Random bf16 weights (weights change neither speed nor memory). Caches are filled with
random keys/values through each cache's own ``update`` (in chunks of ``--chunk`` tokens,
like a chunked prefill), so the prefill's compute is skipped but every byte a cache holds
is real. Then ``--steps`` decode steps of one token per sequence are timed.

Contenders: ``dynamic`` (transformers DynamicCache, bf16), ``hf_quantized``
(transformers QuantizedCache, quanto int2, as shipped), and the kvpolicy policies
``kivi``, ``logquant``, ``partial_logquant`` with the ``fused`` executor.

Measured per contender:
* KV bytes per token (from the cache's own tensors) and the ratio to bf16;
* decode tokens/s and per-step latency at a common batch for each context;
* the largest batch at the longest context: predicted from the measured bytes per token
  and the free memory, then confirmed by filling and decoding (backing off on OOM, then
  bisecting between the largest batch that ran and the smallest that did not; each batch
  that did not fit is listed with the phase, fill or decode, that ran out of memory);
* tokens/s at that batch;
* the fused executor's achieved bandwidth on the bytes it reads, against a measured
  device-to-device copy (one layer, ``benchmarks/attention_bench.py``'s measurement).

    python -m benchmarks.model_bench --out benchmarks/results/model_h100.json

PyTorch's allocator runs with expandable segments (``--allocator expandable``, the default,
unless ``PYTORCH_CUDA_ALLOC_CONF`` is already set): with fixed-size cached blocks, the many
different sizes a quantized cache allocates while it fills and decodes left ~8 GiB
reserved but unused on an H100, and the largest batch was set by fragmentation instead of
by the bytes each cache holds.

Under torchrun with several ranks the same model is sharded by transformers' tensor
parallelism (``tp_plan="auto"``): each rank holds its shard of the weights and of the KV
heads, and bytes per token and largest batch are per rank (every rank holds the same):

    torchrun --standalone --nproc-per-node 2 -m benchmarks.model_bench --contexts 32768 \
        --contenders dynamic,kivi,logquant --no-bandwidth --out benchmarks/results/model_tp2_h200.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time

import attrs
import torch

#: Llama-3.1-8B attention/MLP shapes
LLAMA_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
    max_position_embeddings=131072,
    rope_theta=500000.0,
)
TINY = dict(LLAMA_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, vocab_size=1024)  # fmt: skip
CONTENDERS = ("dynamic", "hf_quantized", "kivi", "logquant", "partial_logquant")
# --kernel -> the fused executor that takes it ("fused" picks the Gluon kernel where it serves)
EXECUTORS = {None: "fused", "mma": "fused", "triton": "fused-triton"}


def tensor_parallel() -> bool:
    """Under torchrun with more than one rank: shard the model with transformers' TP."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def build_tensor_parallel_model(shape: dict):
    """The same random model, sharded by ``from_pretrained(tp_plan="auto")``: each rank saves a
    checkpoint of the config and one tensor; transformers initialises every missing weight."""
    import os
    import tempfile

    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from kvpolicy.distributed import load_tensor_parallel

    folder = tempfile.mkdtemp(prefix=f"kvpolicy_tp_rank{os.environ.get('RANK', '0')}_")
    LlamaConfig(**shape).save_pretrained(folder)
    save_file({"model.norm.weight": torch.ones(shape["hidden_size"])}, f"{folder}/model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    model = load_tensor_parallel(folder, torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    return model


def local_kv_heads(model) -> int:
    """KV heads this process holds (all of them, or this rank's shard under TP)."""
    weight = model.model.layers[0].self_attn.k_proj.weight
    rows = weight.to_local().shape[0] if hasattr(weight, "to_local") else weight.shape[0]
    return rows // model.config.head_dim


def _all_reduce(value: int, op) -> int:
    """``value`` reduced over the ranks with ``op`` (``value`` itself outside TP)."""
    if not tensor_parallel():
        return value
    t = torch.tensor([value], device="cuda" if torch.cuda.is_available() else "cpu")
    torch.distributed.all_reduce(t, op=op)
    return int(t.item())


def any_rank(flag: bool) -> bool:
    """True where any rank says so."""
    return bool(_all_reduce(int(flag), torch.distributed.ReduceOp.MAX))


def smallest_over_ranks(value: int) -> int:
    """The smallest ``value`` of all ranks, so that every rank tries the same batch."""
    return _all_reduce(value, torch.distributed.ReduceOp.MIN)


def build_model(shape: dict, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tensor_parallel():
        return build_tensor_parallel_model(shape)
    config = LlamaConfig(**shape)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    # rotary inverse frequencies live in buffers that to_empty left uninitialised: rebuild
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    return model.eval()


def make_cache(name: str, model, executor: str = "fused"):
    from transformers.cache_utils import DynamicCache, QuantizedCache

    if name == "dynamic":
        return DynamicCache(config=model.config)
    if name == "hf_quantized":
        return QuantizedCache(backend="quanto", config=model.config, nbits=2, q_group_size=64, residual_length=128)
    return fused_policy(name, executor).make_cache(model)


def fused_policy(name: str, executor: str = "fused"):
    """The registered policy ``name`` with a fused executor (``fused`` or ``fused-triton``)."""
    from kvpolicy.policy import Policy

    policy = Policy.load(name)
    return Policy(attrs.evolve(policy.config, executor=executor), policy.registry)


def cache_bytes(cache) -> int:
    from kvpolicy.evaluation.contenders import cache_nbytes

    return cache_nbytes(cache)


def fill(cache, model, batch: int, context: int, chunk: int, device: str) -> None:
    """Hand ``context`` random tokens per sequence to every layer, ``chunk`` at a time."""
    cfg = model.config
    shape = (batch, local_kv_heads(model), 0, cfg.head_dim)
    for layer in range(cfg.num_hidden_layers):
        for start in range(0, context, chunk):
            n = min(chunk, context - start)
            k = torch.randn(shape[:2] + (n, shape[3]), device=device, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            cache.update(k, v, layer)
            del k, v


def sdpa_backends(name: str):
    """SDPA backends allowed during decoding. ``no-cudnn`` (default): flash, memory-efficient
    and math. cuDNN attention re-plans for every new sequence length, which costs ~1.5 ms
    of host time per layer and step on torch 2.11 and would handicap the 16-bit baseline."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "default":
        import contextlib

        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@torch.inference_mode()
def decode(model, cache, batch: int, steps: int, warmup: int, device: str) -> float:
    """Median seconds per decode step (one token per sequence)."""
    g = torch.Generator().manual_seed(0)  # the same tokens on every rank
    tokens = torch.randint(0, model.config.vocab_size, (batch, 1), generator=g).to(model.device)
    times = []
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        tokens = logits[:, -1:].argmax(-1)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_one(name, model, batch, context, args) -> dict:
    """Fill and decode; returns a row (``error`` set on failure, e.g. out of memory)."""
    release()
    row = {"contender": name, "batch": batch, "context": context}
    cache = None
    phase = "fill"
    try:
        cache = make_cache(name, model, EXECUTORS[args.kernel])
        t0 = time.perf_counter()
        try:
            fill(cache, model, batch, context, args.chunk, model.device)
            failed = False
        except torch.OutOfMemoryError:
            failed = True
        if any_rank(failed):  # no rank may enter the model's all-reduces alone
            raise torch.OutOfMemoryError("out of memory while filling")
        row["fill_s"] = time.perf_counter() - t0
        held = cache_bytes(cache)
        row["kv_bytes"] = held
        row["kv_bytes_per_token"] = held / (batch * context)
        phase = "decode"
        with sdpa_backends(args.sdpa):
            step = decode(model, cache, batch, args.steps, args.warmup, args.device)
        row["step_ms"] = step * 1e3
        row["tokens_per_s"] = batch / step
        if args.device == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30  # allocated + cached blocks
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
        row["oom_during"] = phase
    except Exception as err:  # report and go on with the other contenders
        row["error"] = f"{type(err).__name__}: {err}"[:300]
    del cache
    release()
    return row


def largest_batch(name, model, per_token: float, context: int, args) -> dict:
    """Predict from bytes/token and free memory, confirm by running; back off on OOM, then
    bisect between the largest batch that ran and the smallest that did not (``--tries`` runs in all)."""
    free = (torch.cuda.mem_get_info(model.device)[0] if args.device == "cuda" else 8 * 2**30) - args.reserve_gib * 2**30
    batch = smallest_over_ranks(max(1, int(free / (per_token * context))))
    tries, best, failed, failures = [], None, None, []
    for _ in range(args.tries):
        row = run_one(name, model, batch, context, args)
        tries.append(batch)
        if "error" not in row:
            best = row
        elif row["error"] != "out of memory":
            break
        else:
            failed = batch
            failures.append({"batch": batch, "oom_during": row.get("oom_during")})
        if best is None:
            if batch == 1:
                break
            batch = max(1, math.floor(batch * args.backoff))
        elif failed is None or failed - best["batch"] <= 1:
            break
        else:
            batch = (best["batch"] + failed) // 2
    if best is None:
        return {"contender": name, "context": context, "batch": None, "tried": tries, "error": row.get("error")}
    best["tried"] = tries
    best["out_of_memory"] = failures  # the batches that did not fit, and in which phase
    return best


def table(
    rows: list[dict],
    largest: dict,
    bf16_per_token: float,
    bandwidth: list[dict],
    at_common: list[dict] = (),
    reference: dict | None = None,
) -> str:
    lines = [
        "| contender | context | batch | KV B/token | vs bf16 | step ms | tokens/s | vs dynamic |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["context"], r["batch"]): r for r in rows if r["contender"] == "dynamic" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['contender']} | {r['context']} | {r['batch']} | {r['error']} | | | | |")
            continue
        b = base.get((r["context"], r["batch"]))
        speed = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if b else ""
        lines.append(
            f"| {r['contender']} | {r['context']} | {r['batch']} | {r['kv_bytes_per_token']:.0f} | "
            f"{r['kv_bytes_per_token'] / bf16_per_token:.3f} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {speed} |"
        )
    lines += [
        "",
        "Largest batch at the longest context:",
        "",
        "| contender | batch | vs dynamic | tokens/s | vs dynamic | step ms |",
        "|---|---|---|---|---|---|",
    ]
    d = largest.get("dynamic", {})
    for name, r in largest.items():
        if r.get("batch") is None:
            lines.append(f"| {name} | {r.get('error')} (tried {r.get('tried')}) | | | | |")
            continue
        rb = f"{r['batch'] / d['batch']:.2f}x" if d.get("batch") else ""
        rt = f"{r['tokens_per_s'] / d['tokens_per_s']:.2f}x" if d.get("batch") else ""
        lines.append(f"| {name} | {r['batch']} | {rb} | {r['tokens_per_s']:.0f} | {rt} | {r['step_ms']:.1f} |")
    if at_common and reference:
        lines += [
            "",
            f"Per step at {reference['contender']}'s largest batch ({reference['batch']}):",
            "",
            f"| contender | step ms | {reference['contender']} step ms | speed-up |",
            "|---|---|---|---|",
        ]
        for r in at_common:
            if "error" in r:
                lines.append(f"| {r['contender']} | {r['error']} | | |")
            else:
                ratio = reference["step_ms"] / r["step_ms"]
                lines.append(f"| {r['contender']} | {r['step_ms']:.1f} | {reference['step_ms']:.1f} | {ratio:.2f}x |")
    if bandwidth:
        lines += [
            "",
            "Fused executor, one layer:",
            "",
            "| context | batch | fused ms | GB/s read | % of copy |",
            "|---|---|---|---|---|",
        ]
        for r in bandwidth:
            lines.append(
                f"| {r['context']} | {r['batch']} | {r['fused_2bit_ms']:.3f} | {r['fused_read_GBps']:.0f} | "
                f"{100 * r['fused_frac_of_copy']:.1f}% |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="4096,16384,32768")
    parser.add_argument("--batch", type=int, default=8, help="common batch for the per-context rows")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--tries", type=int, default=6, help="runs to find the largest batch")
    parser.add_argument("--backoff", type=float, default=0.8, help="batch factor after an out-of-memory try")
    parser.add_argument(
        "--sdpa", choices=("no-cudnn", "default"), default="no-cudnn", help="SDPA backends (see sdpa_backends)"
    )
    parser.add_argument("--reserve-gib", type=float, default=3.0, help="memory kept free for activations")
    parser.add_argument("--no-largest", action="store_true")
    parser.add_argument(
        "--common-largest",
        default="hf_quantized",
        help="also time every other contender at this contender's largest batch ('' to skip)",
    )
    parser.add_argument("--no-bandwidth", action="store_true", help="skip the fused executor's bandwidth rows")
    parser.add_argument(
        "--kernel",
        choices=("mma", "triton"),
        help="the fused executor's packed-region kernel (default: mma where it serves)",
    )
    parser.add_argument("--tiny", action="store_true", help="a 2-layer toy model (to check the script on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--allocator",
        choices=("expandable", "default"),
        default="expandable",
        help="PyTorch's CUDA allocator: expandable segments, or fixed cached blocks (see above)",
    )
    parser.add_argument("--out", help="JSON path")
    args = parser.parse_args(argv)
    if args.allocator == "expandable":
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # read at the first allocation
    contexts = [int(c) for c in args.contexts.split(",")]
    names = [c.strip() for c in args.contenders.split(",")]
    torch.manual_seed(0)
    shape = TINY if args.tiny else LLAMA_8B
    model = build_model(shape, args.device)
    cfg = model.config
    # per process: under TP each rank holds its shard of the KV heads and reports its own bytes
    bf16_per_token = 2 * cfg.num_hidden_layers * local_kv_heads(model) * cfg.head_dim * 2
    from kvpolicy.distributed import rank_and_world

    rank, world = rank_and_world()
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if rank == 0 else (lambda text: None)
    rows = []
    for context in contexts:
        for name in names:
            row = run_one(name, model, args.batch, context, args)
            say(json.dumps(row))
            rows.append(row)
    largest = {}
    if not args.no_largest:
        context = max(contexts)
        for name in names:
            measured = [r for r in rows if r["contender"] == name and r["context"] == context and "error" not in r]
            per_token = measured[0]["kv_bytes_per_token"] if measured else bf16_per_token
            largest[name] = largest_batch(name, model, per_token, context, args)
            say(json.dumps(largest[name]))
    at_common = []
    common = largest.get(args.common_largest, {}).get("batch")
    if common:
        # per-step latency at one batch for all: the reference contender's largest
        for name in names:
            if name != args.common_largest:
                at_common.append(run_one(name, model, common, max(contexts), args))
                say(json.dumps(at_common[-1]))
    bandwidth = []
    if args.device == "cuda" and not args.no_bandwidth and world == 1:
        # the fused executor alone, one Llama-8B layer, against a device-to-device copy
        from benchmarks.attention_bench import copy_bandwidth, measure

        copy_bw = copy_bandwidth()
        for context in contexts:
            bandwidth.append(measure(context, args.batch, copy_bw, args.kernel))
            print(json.dumps(bandwidth[-1]), file=sys.stderr, flush=True)
    env = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "default"),
        "shape": shape,
        "bf16_bytes_per_token": bf16_per_token,
        "argv": sys.argv[1:] if argv is None else argv,
        "sdpa": args.sdpa,
        "world_size": world,
        "kv_heads_per_rank": local_kv_heads(model),
    }
    if rank:
        return 0
    if args.out:
        with open(args.out, "w") as f:
            record = {
                "environment": env, "rows": rows, "largest": largest, "at_common_largest": at_common,
                "bandwidth": bandwidth,
            }  # fmt: skip
            json.dump(record, f, indent=2)
    print(table(rows, largest, bf16_per_token, bandwidth, at_common, largest.get(args.common_largest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
