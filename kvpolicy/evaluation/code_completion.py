"""Next-line code completion on real Python source (LongBench LCC style).

Each sample is a standard-library file cut after about ``context`` tokens, at the start
of the next non-trivial line (at least 8 characters, not a comment). The contender
completes that line greedily; scores: exact match and edit similarity
(``difflib.SequenceMatcher`` ratio, 0..1) of the stripped line.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import ClassVar

import attrs
import torch

from kvpolicy.evaluation.contenders import Contender
from kvpolicy.evaluation.decoding import continue_on, prefill
from kvpolicy.evaluation.task import Metric, Task, TaskResult, progress_bar
from kvpolicy.evaluation.texts import code_files

METRICS = [
    Metric("exact_match", "code exact match", True, ".2f"),
    Metric("edit_sim", "code edit similarity", True, ".3f"),
]


def cut_at_line(tokenizer, text: str, context: int) -> tuple[str, str] | None:
    """``(prompt, target line)``: the text before the first non-trivial line after ``context`` tokens."""
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


def edit_similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


@attrs.define
class CodeCompletion(Task):
    name: ClassVar[str] = "code"
    context: int = 4096
    samples: int = 6
    tail_tokens: int = 16
    max_line_tokens: int = 48
    skip_files: int = 1  # the first long file is the fidelity task's code document

    def prompts(self, tokenizer) -> list[tuple[str, str, str]]:
        out = []
        for path in code_files()[self.skip_files :]:
            cut = cut_at_line(tokenizer, path.read_text(encoding="utf-8"), self.context)
            if cut is not None:
                out.append((path.name, *cut))
            if len(out) == self.samples:
                break
        return out

    @torch.no_grad()
    def run(self, model, tokenizer, contenders: Sequence[Contender], progress: bool = True) -> TaskResult:
        prompts = self.prompts(tokenizer)
        result = TaskResult(self.name, METRICS, settings=self.settings())
        bar = progress_bar(len(prompts) * len(contenders), "code", progress)

        def stop(tokens: list[int]) -> bool:
            text = tokenizer.decode(tokens)
            return "\n" in text.lstrip("\n")

        for file_name, prompt, target in prompts:
            ids = tokenizer(prompt)["input_ids"]
            prefix = len(ids) - self.tail_tokens
            source, _ = prefill(model, ids[:prefix])
            for contender in contenders:
                bar.set_postfix_str(f"{file_name} · {contender.name}")
                out = continue_on(
                    model, contender.make_cache(model), source, prefix, ids[prefix:], self.max_line_tokens, stop
                )
                line = tokenizer.decode(out, skip_special_tokens=True).lstrip("\n").split("\n")[0]
                result.details.append(
                    {
                        "contender": contender.name,
                        "file": file_name,
                        "tokens": len(ids),
                        "target": target.strip(),
                        "prediction": line.strip(),
                        "exact_match": line.strip() == target.strip(),
                        "edit_sim": edit_similarity(line.strip(), target.strip()),
                    }
                )
                bar.update()
        bar.close()
        for contender in contenders:
            mine = [d for d in result.details if d["contender"] == contender.name]
            result.rows[contender.name] = {
                "exact_match": sum(d["exact_match"] for d in mine) / len(mine),
                "edit_sim": sum(d["edit_sim"] for d in mine) / len(mine),
            }
        return result
