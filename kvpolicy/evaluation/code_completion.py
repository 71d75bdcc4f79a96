"""Long-context code completion (LongBench LCC style): the next line of real Python source.

Each sample is a standard-library file cut at the start of a non-trivial line (at least 8
characters, not a comment) after at least ``context`` tokens of it; the prompt is the
``context`` tokens before the cut, as a plain continuation (no chat template: a code model
completes source). The contender writes the line greedily; the score is its edit similarity
(0-100) to the true line, both stripped.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from kvpolicy.evaluation.generation_task import GenerationTask, Sample
from kvpolicy.evaluation.scoring import edit_similarity
from kvpolicy.evaluation.texts import code_files


def cut_at_line(tokenizer, text: str, context: int) -> tuple[str, str] | None:
    """``(text before, target line)``: the first non-trivial line that starts after the first
    ``context`` tokens of ``text``, or ``None`` when the file is too short."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < context + 64:
        return None
    start = text.find("\n", len(tokenizer.decode(ids[:context]))) + 1
    while 0 < start < len(text):
        end = text.find("\n", start)
        end = len(text) if end == -1 else end
        line = text[start:end].strip()
        if len(line) >= 8 and not line.startswith("#"):
            return text[:start], text[start:end]
        start = end + 1
    return None


def first_line(text: str) -> str:
    """The first non-blank line of ``text``, stripped."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


@attrs.define
class CodeCompletion(GenerationTask):
    name: ClassVar[str] = "code"
    label: ClassVar[str] = "code edit similarity"
    scored_by: ClassVar[str] = "edit similarity (0-100) of the next line of a stdlib file to the true line"
    samples: int = 8
    context: int = 4096
    max_new_tokens: int = 48

    def build(self, tokenizer, instruct: bool) -> list[Sample]:
        out = []
        for path in code_files():
            cut = cut_at_line(tokenizer, path.read_text(encoding="utf-8"), self.context)
            if cut is None:
                continue
            before, target = cut
            ids = tokenizer(before, add_special_tokens=False)["input_ids"][-self.context :]
            out.append(Sample(path.name, tuple(ids), target.strip()))
            if len(out) == self.samples:
                break
        return out

    def stop(self, tokenizer, tokens: list[int]) -> bool:
        return "\n" in tokenizer.decode(tokens).lstrip()

    def answer(self, tokenizer, tokens: list[int]) -> str:
        return first_line(tokenizer.decode(tokens, skip_special_tokens=True))

    def score(self, sample: Sample, answer: str, reference_answer: str) -> float:
        return edit_similarity(answer, sample.reference)
