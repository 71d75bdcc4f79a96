"""Generate with a kvpolicy cache on several GPUs through transformers tensor parallelism.

    python examples/tensor_parallel.py --nproc 2 --policy logquant

prepares a checkpoint, then starts itself on ``--nproc`` ranks with torchrun (NVLink
multicast off in that environment, see ``kvpolicy.distributed``). Each rank loads the
model with ``tp_plan="auto"``, holds the KV heads of its shard in its own kvpolicy cache
and generates; rank 0 prints the text and the cache memory per rank and in total. On a
machine without GPUs the ranks run on CPU (gloo), which is how CI tests this file.

Models (``--model``): ``default`` is the embedded SmolLM2-135M-Instruct. Its 3 KV heads do
not divide by 2, so its heads are replicated first (``replicate_kv_heads``: the same
function, each rank computing one full copy of the attention); ``random-llama`` is a
small random Llama with 8 KV heads (no tokenizer: random prompt ids); or a folder with a
transformers checkpoint. ``--single`` runs the same checkpoint in one process instead.

Launching torchrun yourself works too:

    torchrun --nproc-per-node 2 examples/tensor_parallel.py --checkpoint DIR --policy logquant
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RANDOM_LLAMA = dict(
    vocab_size=4096,
    hidden_size=1024,
    intermediate_size=2048,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    initializer_range=0.1,  # a random model with some spread in its logits, so greedy tokens vary
    pad_token_id=0,
    bos_token_id=None,
    eos_token_id=None,
)


def prepare_checkpoint(model: str, nproc: int, folder: Path) -> Path:
    """A transformers checkpoint folder whose head counts divide by ``nproc``."""
    if model not in ("default", "random-llama"):
        return Path(model)
    if model == "random-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**RANDOM_LLAMA)).save_pretrained(folder)
        return folder
    from kvpolicy.distributed import replicate_kv_heads
    from kvpolicy.models import load_default_model

    lm, tokenizer = load_default_model("smollm2", dtype=torch.float32)
    if lm.config.num_key_value_heads % nproc:
        replicate_kv_heads(lm, nproc)
    # the GGUF loader marks the model as quantized (not serializable): copy into a plain model
    config = lm.config
    config.__dict__.pop("quantization_config", None)
    plain = type(lm)(config).to(torch.float32)
    plain.load_state_dict(lm.state_dict())
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prompt_ids(folder: Path, lengths: list[int], device) -> dict[str, torch.Tensor]:
    """Left-padded prompts: real prose through the checkpoint's tokenizer, else random ids."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        tokenizer = None
    if tokenizer is None:
        g = torch.Generator().manual_seed(1)
        rows = [torch.randint(1, RANDOM_LLAMA["vocab_size"], (n,), generator=g).tolist() for n in lengths]
    else:
        from kvpolicy.evaluation.texts import prose_text

        words = prose_text().split()
        rows = [
            tokenizer(" ".join(words[i * 997 :]), add_special_tokens=False)["input_ids"][:n]
            for i, n in enumerate(lengths)
        ]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = torch.tensor(row)
        mask[r, width - len(row) :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def generate(model, folder: Path, args) -> dict:
    """Greedy tokens ``[B, T]``, per-step logits ``[steps, B, V]`` and cache memory per rank."""
    import attrs

    import kvpolicy
    from kvpolicy.distributed import memory_by_rank
    from kvpolicy.generation import cache_kwargs

    inputs = prompt_ids(folder, [int(n) for n in args.lengths.split(",")], model.device)
    policy = kvpolicy.load_policy(args.policy)
    if args.executor:
        policy = kvpolicy.Policy(attrs.evolve(policy.config, executor=args.executor), policy.registry)
    cache = policy.make_cache(model)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            **cache_kwargs(cache),
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    memory = memory_by_rank(cache)
    return {
        "tokens": out.sequences.cpu(),
        "prompt_width": inputs["input_ids"].shape[1],
        "logits": torch.stack(out.logits).float().cpu(),
        "memory": [
            {"total_bytes": r.total_bytes, "baseline_16bit_bytes": r.baseline_16bit_bytes, **r.bytes_by_region}
            for r in memory.per_rank
        ],
        "summary": memory.summary(),
        "policy": args.policy,
        "world": len(memory.per_rank),
    }


def run_worker(args) -> None:
    """One torchrun rank: load the shard, generate, rank 0 reports."""
    from kvpolicy.distributed import load_tensor_parallel, rank_and_world

    model = load_tensor_parallel(args.checkpoint, DTYPES[args.dtype])
    result = generate(model, Path(args.checkpoint), args)
    rank, _ = rank_and_world()
    if rank == 0:
        report(result, args)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def run_single(folder: Path, args) -> dict:
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[args.dtype]).to(device).eval()
    result = generate(model, folder, args)
    report(result, args)
    return result


def report(result: dict, args) -> None:
    if args.out:
        torch.save(result, args.out)
    print(f"policy {result['policy']} on {result['world']} rank(s); new tokens per row:")
    for row in result["tokens"][:, result["prompt_width"] :].tolist():
        print("  ", row)
    print(result["summary"])


def worker_arguments(args: argparse.Namespace, folder: Path) -> list[str]:
    """The ranks' command line (spelled out: torchrun would take abbreviations such as
    ``--nproc`` for its own options)."""
    out = ["--checkpoint", str(folder), "--policy", args.policy, "--dtype", args.dtype]
    out += ["--lengths", args.lengths, "--max-new-tokens", str(args.max_new_tokens)]
    out += ["--executor", args.executor] if args.executor else []
    return out + (["--out", args.out] if args.out else [])


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2, help="ranks (GPUs, or CPU processes without GPUs)")
    parser.add_argument("--policy", default="logquant")
    parser.add_argument("--model", default="default", help="'default', 'random-llama' or a checkpoint folder")
    parser.add_argument("--executor", help="attention executor instead of the policy's own (e.g. fused on GPUs)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--lengths", default="400,230", help="prompt lengths in tokens, one per batch row")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--single", action="store_true", help="run the checkpoint in one process (no TP)")
    parser.add_argument("--checkpoint", help="checkpoint folder (set by the launcher for the ranks)")
    parser.add_argument("--out", help="rank 0 saves tokens, logits and memory here (torch.save)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if "WORLD_SIZE" in os.environ:
        run_worker(args)
        return 0
    from kvpolicy.distributed import launch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.checkpoint) if args.checkpoint else prepare_checkpoint(args.model, args.nproc, Path(tmp))
        if args.single:
            run_single(folder, args)
            return 0
        done = launch(Path(__file__).resolve(), args.nproc, worker_arguments(args, folder))
        print(done.stdout, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
