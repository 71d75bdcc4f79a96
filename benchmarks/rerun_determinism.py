"""Does greedy bfloat16 generation repeat itself exactly, with DynamicCache and with `full`?

Two evaluation runs on one H100 gave the 16-bit cache different answers on 11 of 32 summaries
(docs/results/accuracy.md, "The 16-bit cache against itself"). This separates the causes: a
random-weight Qwen2 model (the 1.5B model's head layout, 4 layers) generates greedily from 32
random prompts with ``DynamicCache``, with ``full`` decoded eagerly and with ``full`` as
``make_cache`` builds it by default, each twice in the process; the script runs twice (two
processes) and compares the tokens.

    python -m benchmarks.rerun_determinism OUT_A.json; python -m benchmarks.rerun_determinism OUT_B.json
    python -m benchmarks.rerun_determinism --compare OUT_A.json OUT_B.json
"""

from __future__ import annotations

import json
import sys

import torch


def model_and_prompts(device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=32000, hidden_size=1536, intermediate_size=8960, num_hidden_layers=4, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    ids = torch.randint(10, 32000, (32, 1024), generator=torch.Generator().manual_seed(1)).to(device)
    return model, ids


def run(path: str) -> None:
    from transformers import DynamicCache

    from kvpolicy import load_policy
    from kvpolicy.generation import cache_kwargs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, ids = model_and_prompts(device)
    makers = {
        "DynamicCache": lambda: DynamicCache(),
        "full (eager)": lambda: load_policy("full").make_cache(model, cuda_graphs=False),
        "full (default)": lambda: load_policy("full").make_cache(model),
    }
    tokens = {}
    for name, make in makers.items():
        for attempt in (1, 2):
            with torch.no_grad():
                out = model.generate(
                    ids, attention_mask=torch.ones_like(ids), **cache_kwargs(make()), max_new_tokens=64, do_sample=False
                )
            tokens[f"{name} #{attempt}"] = out[:, ids.shape[1] :].tolist()
            if model.config._attn_implementation != "sdpa":
                model.set_attn_implementation("sdpa")  # make_cache switched it; DynamicCache runs on SDPA
    json.dump(tokens, open(path, "w"))
    compare([path])


def rows_differing(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x != y for x, y in zip(a, b, strict=True))


def compare(paths: list[str]) -> None:
    runs = [json.load(open(p)) for p in paths]
    first = runs[0]
    names = list(first)
    print(f"rows of 32 whose 64 tokens differ ({', '.join(paths)})")
    reference = names[0]
    for i, run in enumerate(runs):
        for name in names:
            print(f"process {i + 1} {name:18s} vs process 1 {reference}: {rows_differing(run[name], first[reference])}")
    if len(runs) == 2:
        for name in names:
            print(f"{name:18s} process 2 vs process 1: {rows_differing(runs[1][name], first[name])}")


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(sys.argv[2:])
    else:
        run(sys.argv[1])
