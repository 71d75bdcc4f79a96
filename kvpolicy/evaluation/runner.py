"""Run tasks over contenders and collect one result; budget/bits sweeps for the trade-off plot."""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable, Sequence

import attrs
import torch

from kvpolicy.evaluation.code_completion import CodeCompletion
from kvpolicy.evaluation.contenders import Contender, resolve_contenders
from kvpolicy.evaluation.document_qa import DocumentQA
from kvpolicy.evaluation.fidelity import Fidelity
from kvpolicy.evaluation.humaneval import HumanEval
from kvpolicy.evaluation.passkey import Passkey
from kvpolicy.evaluation.program_trace import ProgramTrace
from kvpolicy.evaluation.summarization import Summarization
from kvpolicy.evaluation.task import Task, TaskResult

#: the generation tasks (free greedy generation scored 0-100 against the 16-bit cache), then
#: the teacher-forced proxies (fidelity: KL; passkey)
TASKS: dict[str, type[Task]] = {
    "code": CodeCompletion,
    "qa": DocumentQA,
    "summary": Summarization,
    "humaneval": HumanEval,
    "trace": ProgramTrace,
    "fidelity": Fidelity,
    "passkey": Passkey,
}
GENERATION_TASKS = ("code", "qa", "summary", "humaneval", "trace")


@attrs.define
class EvaluationResult:
    settings: dict
    environment: dict
    contenders: list[dict]
    tasks: list[TaskResult]
    sweep: list[dict] = attrs.field(factory=list)
    seconds: dict[str, float] = attrs.field(factory=dict)

    def to_dict(self) -> dict:
        return {
            "settings": self.settings,
            "environment": self.environment,
            "contenders": self.contenders,
            "tasks": [t.to_dict() for t in self.tasks],
            "sweep": self.sweep,
            "seconds": self.seconds,
        }


def environment(model: torch.nn.Module) -> dict:
    import transformers

    return {
        "model": getattr(model.config, "name_or_path", "") or type(model).__name__,
        "dtype": str(model.dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name(model.device)}" if model.device.type == "cuda" else ""),
    }


def describe(contender: Contender) -> dict:
    out = {"name": contender.name, "budget": contender.budget, "bits": contender.bits}
    if contender.policy is not None:
        out["policy"] = contender.policy.to_dict()
        out["full_precision_budget"] = contender.policy.budget()
    return out


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[Task],
    contenders: Sequence[Contender],
    settings: dict | None = None,
    progress: bool = True,
    on_task: Callable[[EvaluationResult], None] | None = None,
    finished: Sequence[TaskResult] = (),
    finished_seconds: dict[str, float] | None = None,
) -> EvaluationResult:
    """Every task over every contender that can serve ``model``, on the same samples (those
    that cannot are named in ``settings["skipped"]`` with the reason). ``on_task`` gets the
    result so far after each task (the CLI writes it, so a long run that stops keeps its tasks).
    A task of ``finished`` (an earlier run's results) made with the same settings and contenders
    is reused, not run again."""
    skipped = {c.name: why for c in contenders if (why := c.refuses(model))}
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", file=sys.stderr)
    contenders = [c for c in contenders if c.name not in skipped]
    settings = {**(settings or {}), **({"skipped": skipped} if skipped else {})}
    result = EvaluationResult(
        settings=settings,
        environment=environment(model),
        contenders=[describe(c) for c in contenders],
        tasks=[],
    )
    names = [c.name for c in contenders]
    for task in tasks:
        done = next((r for r in finished if r.made_by(task, names)), None)
        if done is not None:
            print(f"reusing the finished task {task.name!r} of the earlier run", file=sys.stderr)
            result.tasks.append(done)
            result.seconds[task.name] = (finished_seconds or {}).get(task.name, 0.0)
        else:
            start = time.perf_counter()
            result.tasks.append(task.run(model, tokenizer, contenders, progress))
            result.seconds[task.name] = time.perf_counter() - start
        if on_task is not None:
            on_task(result)
    return result


def sweep(
    model: torch.nn.Module,
    tokenizer,
    policies: Sequence[str],
    budgets: Sequence[int],
    bits: Sequence[int],
    task: Task,
    progress: bool = True,
) -> list[dict]:
    """``task`` (a fidelity task) at every budget x bits; one row per policy and point."""
    from tqdm.auto import tqdm

    rows = []
    points = [(b, n) for n in bits for b in budgets]
    for budget, nbits in tqdm(points, desc="sweep", disable=not progress):
        contenders = resolve_contenders(list(policies), budget, nbits)
        result = task.run(model, tokenizer, contenders, progress)
        for name, row in result.rows.items():
            rows.append({"policy": name, "budget": budget, "bits": nbits, **row})
    return rows
