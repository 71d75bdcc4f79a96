"""The ``kvpolicy`` command: list what is registered, generate with a policy, show a policy."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from kvpolicy.errors import KVPolicyError
from kvpolicy.models import DEFAULT_MODEL, EMBEDDED_MODELS

DTYPES = ("bfloat16", "float16", "float32")
#: ``generate``'s dtypes: ``auto`` is bfloat16 on CUDA and float32 on a CPU (whose bfloat16
#: matrix products are slow where the processor has no bfloat16 instructions)
GENERATE_DTYPES = ("auto", *DTYPES)
#: what ``kvpolicy evaluate`` compares by default: the 16-bit cache, transformers' QuantizedCache
#: at 2 and 4 bits and every shipped policy, each as shipped
DEFAULT_POLICIES = (
    "full",
    "hf_quantized_int2",
    "hf_quantized_int4",
    "kivi",
    "sink_kivi",
    "logquant",
    "partial_logquant",
    "logquant_rot",
    "logquant_mixed",
    "streaming",
)
#: ``kvpolicy evaluate --tasks`` by default: the generation tasks
DEFAULT_TASKS = "code,qa,summary,humaneval,trace"
#: each generation task's ``(prompt tokens, new tokens at most)`` by default and under ``--quick``
TASK_LENGTHS = {
    "code": ((4096, 48), (1024, 32)),
    "qa": ((4096, 24), (1024, 24)),
    "summary": ((2048, 128), (1024, 64)),
    "humaneval": ((2048, 192), (1024, 128)),
}


def _cmd_list(args: argparse.Namespace) -> int:
    from kvpolicy.policy.registry import get_registry

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
    for override, layer_policy in zip(policy.config.layers, policy.overrides):
        b = layer_policy.budget()
        bits = "/".join(str(getattr(layer_policy.config, side).quant.bits) for side in ("keys", "values"))
        chosen = (
            list(override.at)
            if override.within_bits is None
            else f"the earliest within {override.within_bits:g} bits per element (--model names them)"
        )
        print(
            f"# layers {chosen}: full-precision budget keys {b['keys']}, values {b['values']}; "
            f"quantized keys/values at {bits} bits"
        )
    if args.model:
        _show_layers(policy, args)
    print(f"# executor on this machine: {policy.executor_summary()}")
    print(f"# decode steps on this machine: {policy.decode_summary()}")
    if any(getattr(policy.config, side).quant.rotate != "none" for side in ("keys", "values")):
        print(
            "# rotated codes: the fused decode kernels read them as stored "
            "(the query and full-precision tokens are rotated, the output rotated back)"
        )
    for side in ("keys", "values"):
        quant = getattr(policy.config, side).quant
        backend = policy.registry.quantizer(quant.backend)
        if backend.options:
            chosen = ", ".join(f"{k}={backend.option(quant, k)!r}" for k in backend.options)
            print(f"# {side}: backend {quant.backend} options {chosen}")
    return 0


def _show_layers(policy, args: argparse.Namespace) -> None:
    """Each layer the policy caches on ``args.model``: its keys' and values' quantization."""
    from kvpolicy.cache.layers import model_layers, model_name
    from kvpolicy.policy import auto_leaves_unrotated, layer_quant
    from kvpolicy.policy.layer_budget import layer_bits, mean_bits, served_layers

    args.dtype, args.device = "float32", "cpu"  # the layers' structure, not a fast forward
    model, _ = _load_model(args)
    policy.make_cache(model, cuda_graphs=False)  # a model the policy cannot serve is refused here, not planned
    specs = model_layers(model)
    settled = policy.for_model(specs, model_name(model))
    served = served_layers(settled, specs, model_name(model))
    per_layer = {s.index: settled.for_layer(s.index, s.num_layers) for s in served}
    print(f"# on {args.model}: {len(served)} of {len(specs)} layers cached by the policy")
    for s in served:
        sides = []
        for side, dim in (("keys", s.head_dim), ("values", s.value_head_dim or s.head_dim)):
            unrotated = auto_leaves_unrotated(side, s.normalized_keys, s.biased_keys)
            quant = layer_quant(getattr(per_layer[s.index].config, side).quant, dim, unrotated)
            sides.append(f"{side} {quant.bits}-bit/{quant.axis} groups of {quant.group_size}/rotate {quant.rotate}")
        print(f"#   layer {s.index}: {', '.join(sides)} ({layer_bits(per_layer[s.index], s):.3f} bits per element)")
    if served:
        print(f"# mean bits per quantized element: {mean_bits(per_layer, served):.3f}")


#: what ``kvpolicy generate`` summarizes when given no prompt: long enough (about 700 tokens)
#: that every shipped policy quantizes or evicts part of it
DEFAULT_PROMPT_TOPIC = "exceptions"


def default_prompt(instruct: bool = True) -> str:
    """A passage of the Python language reference (shipped with Python) to summarize: an
    instruction for a chat model, a text to continue with its summary for a base model."""
    from kvpolicy.errors import ConfigError

    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise ConfigError("--prompt", None, "a prompt (this Python has no pydoc_data for the default one)") from None
    passage = topics[DEFAULT_PROMPT_TOPIC].strip()[:3000]
    if not instruct:
        return "A passage of the Python documentation:\n\n" + passage + "\n\nThe passage in three sentences:"
    return "Summarize this passage of the Python documentation in three sentences.\n\n" + passage


def _read_prompt(args: argparse.Namespace, instruct: bool = True) -> str:
    from kvpolicy.config import read_text
    from kvpolicy.errors import ConfigError

    if args.prompt_file:
        prompt = read_text(Path(args.prompt_file), "--prompt-file", "text file")
    elif args.prompt is not None:
        prompt = args.prompt
    else:
        prompt = default_prompt(instruct)
    if not prompt.strip():
        where = "--prompt-file " + args.prompt_file if args.prompt_file else "--prompt"
        raise ConfigError(where, prompt, "a non-empty prompt")
    return prompt


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import DynamicCache, TextStreamer

    from kvpolicy.evaluation.answer_comparison import answer, compare_answers
    from kvpolicy.models import embedded_model, load_default_model
    from kvpolicy.policy import Policy

    policy = Policy.load(args.policy)  # fail on a bad policy, model or prompt before the model loads
    embedded = embedded_model(args.model)
    prompt = _read_prompt(args, embedded.instruct)
    device = resolve_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    print(f"loading {embedded.title} ({dtype}, {device}) ...", file=sys.stderr)
    model, tokenizer = load_default_model(dtype=getattr(torch, dtype), name=args.model, device=device)
    if args.chat and embedded.instruct:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt").to(model.device)
    prompt_tokens = inputs["input_ids"].shape[1]
    cache = policy.make_cache(model, cuda_graphs=CUDA_GRAPHS[args.cuda_graphs])
    print(f"prefilling {prompt_tokens} prompt tokens under policy {policy.name} ...", file=sys.stderr, flush=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    mine = answer(model, tokenizer, inputs, cache, args.max_new_tokens, streamer, args.temperature)
    print(f"\npolicy {policy.name}: prompt {prompt_tokens} tokens, {len(mine.tokens)} generated")
    print(cache.memory().summary())
    if not args.compare:
        return 0
    print(f"\nthe full-precision cache (DynamicCache, {dtype}) on the same prompt:", flush=True)
    reference_cache = DynamicCache()
    reference = answer(model, tokenizer, inputs, reference_cache, args.max_new_tokens, streamer, args.temperature)
    print()
    print(compare_answers(model, inputs, mine, reference, reference_cache).summary())
    return 0


def _cmd_plot_retention(args: argparse.Namespace) -> int:
    from kvpolicy.policy import Policy
    from kvpolicy.tools.retention import plot_retention

    policy = Policy.load(args.policy)
    output = args.output or f"retention-{policy.name}.png"
    path = plot_retention(policy, output, steps=args.steps, prefill=args.prefill)
    print(f"wrote {path}")
    return 0


def _bounded_int(allowed, wording: str):
    """An argparse type: an integer for which ``allowed(value)`` holds, described as ``wording``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wording}, got {text!r}") from None
        if not allowed(value):
            raise argparse.ArgumentTypeError(f"expected {wording}, got {value}")
        return value

    return parse


_positive_int = _bounded_int(lambda value: value > 0, "a positive integer")
_non_negative_int = _bounded_int(lambda value: value >= 0, "an integer >= 0")


def _int_between(low: int, high: int):
    """An argparse type: an integer from ``low`` to ``high``."""
    return _bounded_int(lambda value: low <= value <= high, f"an integer from {low} to {high}")


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (0: greedy), got {text!r}")
    return value


DEVICE_HELP = "auto (default): the first CUDA device where there is one, else the CPU; or cpu, cuda, cuda:N"
#: ``--cuda-graphs`` -> ``make_cache(model, cuda_graphs=...)``
CUDA_GRAPHS = {"auto": "auto", "on": True, "off": False}
CUDA_GRAPHS_HELP = (
    "decode steps replayed from a CUDA graph: auto (default) where the model and policy are served on CUDA; on: "
    "always, refusing what is not served (on a CPU the same steps run eagerly); off: never"
)


def _device(text: str) -> str:
    """An argparse type: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")


def _depths(text: str) -> tuple[float, ...]:
    try:
        depths = tuple(float(part) for part in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers from 0 to 1, got {text!r}") from None
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers from 0 to 1, got {text!r}")
    return depths


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def fidelity_task(args: argparse.Namespace):
    """The fidelity task of the ``evaluate`` options (also what ``--sweep-budgets`` runs)."""
    from kvpolicy.evaluation.fidelity import Fidelity

    return Fidelity(
        length=args.fidelity_length,
        decode_tokens=args.decode_tokens,
        prose_documents=args.documents,
        code_documents=args.documents,
    )


def build_tasks(args: argparse.Namespace) -> list:
    """The task objects the ``evaluate`` options ask for (``--quick``: short prompts, 2 samples)."""
    from kvpolicy.errors import ConfigError, UnknownNameError
    from kvpolicy.evaluation import TASKS
    from kvpolicy.evaluation.passkey import Passkey
    from kvpolicy.evaluation.program_trace import ProgramTrace

    samples = args.samples or (2 if args.quick else 8)
    batch = args.batch or min(samples, 2 if args.quick else 4)

    def sized(name: str):
        context, new_tokens = TASK_LENGTHS[name][1 if args.quick else 0]
        options = {"execute": args.execute} if name == "humaneval" else {}
        return TASKS[name](
            samples=samples, context=args.context or context, batch=batch, max_new_tokens=new_tokens, **options
        )

    made = {
        "fidelity": lambda: fidelity_task(args),
        "passkey": lambda: Passkey(lengths=args.passkey_lengths, depths=args.passkey_depths),
        "trace": lambda: ProgramTrace(
            samples=samples, batch=batch, entries=args.trace_entries or (12 if args.quick else 32)
        ),
        **{name: (lambda name=name: sized(name)) for name in TASK_LENGTHS},
    }
    if "fidelity" in _csv(args.tasks) and args.decode_tokens >= args.fidelity_length:
        raise ConfigError(
            "--decode-tokens", args.decode_tokens, f"fewer than --fidelity-length ({args.fidelity_length}) tokens"
        )
    tasks = []
    for name in _csv(args.tasks):
        if name not in TASKS:
            raise UnknownNameError("task", name, TASKS)
        tasks.append(made[name]())
    if not tasks:
        raise KVPolicyError(f"--tasks: no task named in {args.tasks!r}; choose from {', '.join(TASKS)}")
    return tasks


def _load_model(args: argparse.Namespace):
    import torch

    from kvpolicy.models import load_default_model

    dtype = getattr(torch, args.dtype)
    device = resolve_device(args.device)
    name = DEFAULT_MODEL if args.model == "default" else args.model
    if name in EMBEDDED_MODELS:
        return load_default_model(dtype=dtype, name=name, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(args.model).is_dir():
        raise FileNotFoundError(
            f"--model: {args.model!r} is not a local model folder nor an embedded model "
            f"({', '.join(EMBEDDED_MODELS)}, or 'default')"
        )
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, local_files_only=True).to(device).eval()
    return model, tokenizer


def resolve_device(name: str) -> str:
    """``--device``: ``auto`` is the first CUDA device where there is one, else the CPU; a CUDA
    device this machine does not have is refused."""
    import torch

    from kvpolicy.errors import ConfigError

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device", name, "cpu or auto (this machine has no CUDA device)")
    return name


def _earlier_run(args: argparse.Namespace, settings: dict) -> dict:
    """``--out/results.json`` of an earlier run with the same model, dtype, policies,
    budget/bits and ``--cuda-graphs`` (``--resume``); refused, naming the difference, when they differ."""
    import json

    from kvpolicy.errors import ConfigError

    path = Path(args.out) / "results.json"
    if not path.is_file():
        raise ConfigError("--resume", str(path), "an earlier run's results.json in --out (none is there)")
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError("--resume", str(path), f"a readable results.json ({exc})") from None
    name = DEFAULT_MODEL if args.model == "default" else args.model
    was = earlier.get("settings", {})
    env = earlier.get("environment", {})
    expected = {
        "model": (Path(env.get("model", "")).name, Path(name).name),
        "dtype": (env.get("dtype"), args.dtype),
        **{key: (was.get(key), settings[key]) for key in ("policies", "budget", "bits")},
        "cuda_graphs": (was.get("cuda_graphs", "auto"), settings["cuda_graphs"]),  # runs before the option: auto
    }
    for key, (then, now) in expected.items():
        if then != now:
            raise ConfigError("--resume", str(path), f"a run with the same {key} ({now!r}; that run had {then!r})")
    return earlier


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import shlex

    from kvpolicy.evaluation import evaluate, resolve_contenders
    from kvpolicy.evaluation import report as report_module
    from kvpolicy.evaluation.generation_task import REFERENCE
    from kvpolicy.evaluation.runner import sweep
    from kvpolicy.evaluation.task import TaskResult

    budget = args.budget or None
    names = _csv(args.policies)
    if REFERENCE not in names:  # every table states the 16-bit score of the same run
        names.insert(0, REFERENCE)
    contenders = resolve_contenders(names, budget, args.bits or None, CUDA_GRAPHS[args.cuda_graphs])  # fail fast
    tasks = build_tasks(args)
    report_module.check_output(args.out)  # before hours of work, not after
    settings = {"policies": names, "tasks": _csv(args.tasks), "budget": budget, "bits": args.bits or None,
                "cuda_graphs": args.cuda_graphs}  # fmt: skip
    earlier = _earlier_run(args, settings) if args.resume else {}
    print(f"loading model {args.model!r} ({args.dtype}) ...", file=sys.stderr)
    model, tokenizer = _load_model(args)
    command = "kvpolicy " + " ".join(shlex.quote(a) for a in (args.argv or []))

    def save(result) -> None:  # after every task: a run that stops keeps what it finished
        report_module.write(result, args.out, command)

    finished = [TaskResult.from_dict(t) for t in earlier.get("tasks", [])]
    result = evaluate(
        model,
        tokenizer,
        tasks,
        contenders,
        settings,
        progress=not args.quiet,
        on_task=save,
        finished=finished,
        finished_seconds=earlier.get("seconds"),
    )
    if args.sweep_budgets:
        fidelity = fidelity_task(args)
        policies = [p for p in names if p != "full"]
        result.sweep = sweep(model, tokenizer, policies, args.sweep_budgets, args.sweep_bits, fidelity, not args.quiet)
    written = report_module.write(result, args.out, command)
    print(report_module.summary_table(result))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpolicy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered selectors, quantizers, executors and policies, with their plugins")
    show = sub.add_parser("show", help="print a policy as YAML")
    show.add_argument("policy", help="registered policy name or YAML path")
    show.add_argument(
        "--model",
        help=f"also print each layer's quantization on this model ({', '.join(EMBEDDED_MODELS)} or a local "
        "folder): the layers a budgeted `layers` entry takes, `rotate: auto` and `group_size: head` as they resolve",
    )
    gen = sub.add_parser(
        "generate",
        help="generate with an embedded model under a policy, next to the 16-bit cache's answer to the same prompt",
    )
    gen.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"embedded model: {', '.join(EMBEDDED_MODELS)} (default {DEFAULT_MODEL}; gemma3-270m is a base model)",
    )
    gen.add_argument("--policy", default="logquant", help="registered policy name or YAML path (default: logquant)")
    source = gen.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="prompt text (default: summarize a passage of Python's documentation)")
    source.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=64)
    gen.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy (default)")
    gen.add_argument(
        "--no-compare",
        dest="compare",
        action="store_false",
        help="skip the 16-bit cache's answer to the same prompt and the comparison (about halves the time)",
    )
    gen.add_argument("--dtype", choices=GENERATE_DTYPES, default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    gen.add_argument("--device", type=_device, default="auto", help=DEVICE_HELP)
    gen.add_argument("--no-chat", dest="chat", action="store_false", help="do not wrap the prompt in the chat template")
    gen.add_argument("--cuda-graphs", choices=tuple(CUDA_GRAPHS), default="auto", help=CUDA_GRAPHS_HELP)
    plot = sub.add_parser("plot-retention", help="PNG of which positions are full precision/quantized/evicted")
    plot.add_argument("policy", help="registered policy name or YAML path (third-party selectors included)")
    plot.add_argument("-o", "--output", help="PNG path (default: retention-POLICY.png)")
    plot.add_argument(
        "--steps", type=_int_between(1, 20000), default=400, help="decode steps to simulate, 1-20000 (default: 400)"
    )
    plot.add_argument(
        "--prefill", type=_int_between(1, 1_000_000), default=1, help="prompt length before decoding (default: 1)"
    )
    ev = sub.add_parser(
        "evaluate",
        help="task scores of policies against the 16-bit cache: code, document QA, summaries, HumanEval, a long trace",
    )
    ev.add_argument(
        "--policies",
        default=",".join(DEFAULT_POLICIES),
        help="comma-separated registered names, YAML paths, hf_quantized_int2, hf_quantized_int4 or hf_quantized "
        "(at --bits); full, the 16-bit cache, is always added",
    )
    ev.add_argument(
        "--tasks",
        default=DEFAULT_TASKS,
        help=f"comma-separated: code, qa, summary, humaneval, trace (default {DEFAULT_TASKS}); also the "
        "teacher-forced proxies fidelity (KL) and passkey",
    )
    ev.add_argument("--quick", action="store_true", help="1,024-token prompts, 2 samples a task, shorter answers")
    ev.add_argument("--samples", type=_positive_int, help="samples of each generation task (default 8, --quick 2)")
    ev.add_argument(
        "--context",
        type=_int_between(256, 131072),
        help="prompt tokens of code, qa, summary and humaneval, 256-131072 (default 4096/4096/2048/2048, --quick 1024)",
    )
    ev.add_argument("--batch", type=_positive_int, help="prompts prefilled and decoded together (default 4)")
    ev.add_argument(
        "--trace-entries", type=_int_between(1, 150), help="lines each trace program prints, 1-150 (default 32)"
    )
    ev.add_argument(
        "--budget",
        type=_non_negative_int,
        default=0,
        help="full-precision tokens every policy is matched to (default 0: each policy as registered)",
    )
    ev.add_argument(
        "--bits",
        type=_non_negative_int,
        default=0,
        choices=(0, 2, 3, 4, 8),
        metavar="{0,2,3,4,8}",
        help="bits of every quantized tensor (default 0: as registered); a policy's `layers` overrides keep their own",
    )
    ev.add_argument(
        "--model",
        default="default",
        help=f"an embedded model: 'default' ({DEFAULT_MODEL}), {', '.join(EMBEDDED_MODELS)}; or a local model folder",
    )
    ev.add_argument(
        "--dtype",
        choices=DTYPES,
        default="bfloat16",
        help="compute and cache dtype (default bfloat16: the 16-bit cache)",
    )
    ev.add_argument("--device", type=_device, default="auto", help=DEVICE_HELP)
    ev.add_argument("--cuda-graphs", choices=tuple(CUDA_GRAPHS), default="auto", help=CUDA_GRAPHS_HELP)
    ev.add_argument("--out", default="kvpolicy-eval", help="output folder for results.json, results.md and plots")
    ev.add_argument(
        "--resume",
        action="store_true",
        help="reuse the tasks that --out/results.json already holds for the same model, dtype, policies and "
        "task settings, and run only the rest",
    )
    ev.add_argument(
        "--fidelity-length", type=_positive_int, default=4096, help="tokens per fidelity document (default 4096)"
    )
    ev.add_argument("--decode-tokens", type=_positive_int, default=128, help="teacher-forced decode steps per document")
    ev.add_argument("--documents", type=_positive_int, default=1, help="fidelity documents of each kind (prose, code)")
    ev.add_argument("--passkey-lengths", type=_ints, default=(1024, 2048, 4096, 8192))
    ev.add_argument("--passkey-depths", type=_depths, default=(0.1, 0.5, 0.9))
    ev.add_argument("--no-execute", dest="execute", action="store_false", help="do not run HumanEval completions")
    ev.add_argument("--sweep-budgets", type=_ints, default=(), help="e.g. 64,128,256: also sweep fidelity over budgets")
    ev.add_argument("--sweep-bits", type=_ints, default=(2, 4), help="bit widths of the sweep (default 2,4)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    handlers = {
        "list": _cmd_list,
        "show": _cmd_show,
        "generate": _cmd_generate,
        "plot-retention": _cmd_plot_retention,
        "evaluate": _cmd_evaluate,
    }
    try:
        return handlers[args.command](args)
    except (KVPolicyError, FileNotFoundError) as err:
        print(f"kvpolicy {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
