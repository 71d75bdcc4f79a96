"""Summarization of a long passage of Python's own documentation, scored against the 16-bit cache.

Each sample is a window of ``context`` tokens of the language reference topics
(:func:`~kvpolicy.evaluation.texts.prose_text`, windows spread over the text) with the request
to summarize it, in the model's chat template. A summary has no single right answer, so the
score is ROUGE-L F1 (0-100) against the summary the same model writes with the 16-bit cache
from the same prompt: 100 for the 16-bit cache itself, less as a policy's summary departs.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from kvpolicy.evaluation.generation_task import GenerationTask, Sample, chat_ids
from kvpolicy.evaluation.scoring import rouge_l
from kvpolicy.evaluation.texts import prose_text

REQUEST = "Summarize the following part of the Python documentation in a few sentences.\n\n"
BASE_CUE = "\n\nSummary in a few sentences:"


@attrs.define
class Summarization(GenerationTask):
    name: ClassVar[str] = "summary"
    label: ClassVar[str] = "summary ROUGE-L vs 16-bit"
    scored_by: ClassVar[str] = "ROUGE-L F1 (0-100) against the 16-bit cache's summary of the same passage"
    samples: int = 8
    context: int = 2048
    max_new_tokens: int = 128

    def build(self, tokenizer, instruct: bool) -> list[Sample]:
        parts = [REQUEST, []] if instruct else [[], BASE_CUE]
        window = self.context - len(chat_ids(tokenizer, parts, instruct))
        ids = tokenizer(prose_text(), add_special_tokens=False)["input_ids"]
        count = min(self.samples, len(ids) // window)
        stride = len(ids) // max(1, count)
        out = []
        for i in range(count):
            passage = ids[i * stride : i * stride + window]
            parts = [REQUEST, passage] if instruct else [passage, BASE_CUE]
            out.append(Sample(f"topics@{i * stride}", tuple(chat_ids(tokenizer, parts, instruct))))
        return out

    def score(self, sample: Sample, answer: str, reference_answer: str) -> float:
        return rouge_l(answer, reference_answer)
