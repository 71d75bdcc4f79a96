"""Profile decode steps of the model benchmark: where a step's time goes (torch.profiler).

python benchmarks/profile_step.py --contender dynamic --context 4096 --batch 8
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.model_bench import LLAMA_8B, build_model, fill, make_cache, sdpa_backends


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="dynamic:4096,dynamic:32768,kivi:32768")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sdpa", choices=("no-cudnn", "default"), default="no-cudnn")
    args = parser.parse_args()
    model = build_model(LLAMA_8B, "cuda")
    tokens = torch.zeros(args.batch, 1, dtype=torch.long, device="cuda")
    for run in args.runs.split(","):
        name, context = run.split(":")
        cache = make_cache(name, model)
        fill(cache, model, args.batch, int(context), 4096, "cuda")
        with torch.inference_mode(), sdpa_backends(args.sdpa):
            for _ in range(3):
                model(input_ids=tokens, past_key_values=cache, logits_to_keep=1)
            torch.cuda.synchronize()
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            ) as prof:
                t = time.perf_counter()
                for _ in range(args.steps):
                    model(input_ids=tokens, past_key_values=cache, logits_to_keep=1)
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t) / args.steps
        print(f"== {name} context {context} batch {args.batch}: {wall * 1e3:.1f} ms/step wall")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
        del cache
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
