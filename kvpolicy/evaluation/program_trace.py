"""A long generation graded exactly: the output of a program that pairs two long lists.

Each sample is a generated Python program: a list of ``entries`` names (Python's builtin
function and type names, shuffled), a list of as many random 4-digit codes, and a loop that
prints ``name: code`` for each pair. The model is asked, in its chat template, what the
program prints: hundreds of generated tokens, each line read from two places of the prompt
(quantized by every policy once the answer grows) and placed by the lines the model wrote
before it, so a slip early on carries on. The score is the share (0-100) of the printed lines
the answer writes right and in order (the longest common subsequence of its lines and the
expected ones, so one dropped line costs one line); the expected output is computed, not judged.
"""

from __future__ import annotations

import builtins
import difflib
import random
from typing import ClassVar

import attrs

from kvpolicy.evaluation.generation_task import GenerationTask, Sample, chat_ids

REQUEST = "What does this Python program print? Answer with the printed lines only, with no other text.\n\n```python\n"
#: programs drawn per sample wanted, to find ``samples`` of one prompt length
CANDIDATES_PER_SAMPLE = 40
LOOP = 'for name, code in zip(names, codes):\n    print(f"{name}: {code}")\n'


def program(rng: random.Random, entries: int) -> tuple[str, list[str]]:
    """``(source, printed lines)`` of one program pairing ``entries`` names with codes."""
    pool = sorted(n for n in dir(builtins) if n.islower() and not n.startswith("_"))
    if entries > len(pool):
        raise ValueError(f"entries: at most {len(pool)} (the builtin names), got {entries}")
    names = rng.sample(pool, entries)
    codes = [rng.randrange(1000, 10000) for _ in names]
    source = f"names = {names!r}\ncodes = {codes!r}\n{LOOP}"
    return source, [f"{name}: {code}" for name, code in zip(names, codes)]


def printed_lines(answer: str) -> list[str]:
    """The lines of an answer that look like output (``name: code``), stripped, fences dropped."""
    return [line.strip() for line in answer.splitlines() if ":" in line and not line.strip().startswith("```")]


@attrs.define
class ProgramTrace(GenerationTask):
    name: ClassVar[str] = "trace"
    label: ClassVar[str] = "program trace"
    scored_by: ClassVar[str] = "share (0-100) of a program's printed lines written right, in order (computed)"
    samples: int = 8
    entries: int = 32
    #: unused: the prompt's length follows from ``entries`` (about 9 tokens an entry)
    context: int = 0
    max_new_tokens: int = 0
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            self.max_new_tokens = 8 * self.entries + 16  # a name, ': ', four digits and a newline per line

    def build(self, tokenizer, instruct: bool) -> list[Sample]:
        """``samples`` programs whose prompts have one token count, so that they decode in
        batches without padding: drawn in order from the seed, the most common length wins."""
        rng = random.Random(self.seed)
        by_length: dict[int, list[Sample]] = {}
        for i in range(CANDIDATES_PER_SAMPLE * self.samples):
            source, printed = program(rng, self.entries)
            ids = tuple(chat_ids(tokenizer, [REQUEST, source, "```"], instruct))
            group = by_length.setdefault(len(ids), [])
            group.append(Sample(f"program{i}", ids, printed))
            if len(group) == self.samples:
                return group
        return max(by_length.values(), key=len)

    def score(self, sample: Sample, answer: str, reference_answer: str) -> float:
        got, expected = printed_lines(answer), sample.reference
        matcher = difflib.SequenceMatcher(None, got, expected, autojunk=False)
        return 100.0 * sum(block.size for block in matcher.get_matching_blocks()) / len(expected)
