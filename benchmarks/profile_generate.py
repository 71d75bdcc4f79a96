"""Where the host's time goes in ``generate()``'s decode steps, per cache (cProfile).

A real prompt through ``model.generate()`` on a Llama-3.1-8B-shaped model with random bf16
weights, then ``--new-tokens`` greedy steps under cProfile (the prefill runs first, outside
the profile). Prints, per contender, the seconds per decode step and the functions with the
most time of their own, so a cache's host overhead can be read against DynamicCache's.

    python -m benchmarks.profile_generate --context 8192 --contenders dynamic,logquant,kivi
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from benchmarks.e2e_bench import SHAPES, build_model, generate_kwargs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--contenders", default="dynamic,logquant,kivi")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    model = build_model(SHAPES[args.shape], args.device)
    ids = torch.randint(1, model.config.vocab_size, (args.batch, args.context)).to(args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    with torch.inference_mode():
        for name in args.contenders.split(","):
            if name in ("dynamic", "quantized", "static"):
                model.set_attn_implementation("sdpa")
            kwargs = generate_kwargs(name, model)
            common = dict(attention_mask=torch.ones_like(ids), do_sample=False, **kwargs)
            # the prefill and one step outside the profile; then decode steps under it
            out = model.generate(ids, max_new_tokens=1, min_new_tokens=1, return_dict_in_generate=True, **common)
            cache = out.past_key_values
            sequences = out.sequences
            sync()
            profiler = cProfile.Profile()
            start = time.perf_counter()
            profiler.enable()
            model.generate(
                sequences, attention_mask=torch.ones_like(sequences), do_sample=False, past_key_values=cache,
                max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
            )  # fmt: skip
            sync()
            profiler.disable()
            per_step = (time.perf_counter() - start) / args.new_tokens
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
            print(f"== {name}: {per_step * 1e3:.1f} ms per decode step under the profiler")
            print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:6000])
            del out, cache, sequences
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
