"""The ``kvpolicy`` command: list what is registered, generate with a policy, show a policy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvpolicy.errors import KVPolicyError

DTYPES = ("bfloat16", "float16", "float32")


def _cmd_list(args: argparse.Namespace) -> int:
    from kvpolicy.registry import get_registry

    registry = get_registry()
    rows = registry.table()
    width = max(len(name) for _, name, _ in rows)
    for kind, name, plugin in rows:
        print(f"{kind:<10} {name:<{width}}  (plugin: {plugin})")
    for plugin, message in registry.load_errors.items():
        print(f"error      plugin {plugin!r} {message}", file=sys.stderr)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from kvpolicy.policy import Policy

    policy = Policy.load(args.policy)
    print(policy.to_yaml(), end="")
    budget = policy.budget()
    print(f"# full-precision budget per layer: keys {budget['keys']}, values {budget['values']}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from kvpolicy.models import load_default_model
    from kvpolicy.policy import Policy

    policy = Policy.load(args.policy)  # fail on a bad policy before the model loads
    if args.prompt_file:
        prompt = Path(args.prompt_file).read_text()
    elif args.prompt is not None:
        prompt = args.prompt
    else:
        raise SystemExit("kvpolicy generate: give --prompt TEXT or --prompt-file PATH")
    print(f"loading SmolLM2-135M-Instruct ({args.dtype}) ...", file=sys.stderr)
    model, tokenizer = load_default_model(dtype=getattr(torch, args.dtype))
    if args.chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt")
    cache = policy.make_cache(model)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            past_key_values=cache,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else None,
            top_p=None,
            top_k=None,
        )
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    print(tokenizer.decode(new_tokens, skip_special_tokens=True))
    report = cache.memory()
    print(f"policy {policy.name}: prompt {inputs['input_ids'].shape[1]} tokens, {len(new_tokens)} generated")
    print(report.summary())
    return 0


def _cmd_plot_retention(args: argparse.Namespace) -> int:
    from kvpolicy.policy import Policy
    from kvpolicy.retention import plot_retention

    policy = Policy.load(args.policy)
    output = args.output or f"retention-{policy.name}.png"
    path = plot_retention(policy, output, steps=args.steps, prefill=args.prefill)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpolicy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered selectors, quantizers, executors and policies, with their plugins")
    show = sub.add_parser("show", help="print a policy as YAML")
    show.add_argument("policy", help="registered policy name or YAML path")
    gen = sub.add_parser("generate", help="generate with the embedded SmolLM2-135M-Instruct under a policy")
    gen.add_argument("--policy", default="logquant", help="registered policy name or YAML path (default: logquant)")
    gen.add_argument("--prompt", help="prompt text")
    gen.add_argument("--prompt-file", help="read the prompt from this file")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    gen.add_argument("--no-chat", dest="chat", action="store_false", help="do not wrap the prompt in the chat template")
    plot = sub.add_parser("plot-retention", help="PNG of which positions are full precision/quantized/evicted")
    plot.add_argument("policy", help="registered policy name or YAML path (third-party selectors included)")
    plot.add_argument("-o", "--output", help="PNG path (default: retention-POLICY.png)")
    plot.add_argument("--steps", type=int, default=400, help="decode steps to simulate (default: 400)")
    plot.add_argument("--prefill", type=int, default=1, help="prompt length before decoding (default: 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "list": _cmd_list,
        "show": _cmd_show,
        "generate": _cmd_generate,
        "plot-retention": _cmd_plot_retention,
    }
    try:
        return handlers[args.command](args)
    except (KVPolicyError, FileNotFoundError) as err:
        print(f"kvpolicy {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
