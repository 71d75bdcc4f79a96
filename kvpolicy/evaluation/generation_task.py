"""What the generation tasks share: batches of equal-length prompts, one 16-bit prefill per
batch, free greedy generation under every contender, a 0-100 score per sample, and each
contender's difference from the 16-bit cache (``full``) on the same samples.

A task says how to build its samples (:meth:`GenerationTask.samples`), when a row is done
(:meth:`GenerationTask.stop`) and how an answer scores (:meth:`GenerationTask.score`, which
also sees the 16-bit cache's answer to the same prompt). Each row of the result holds:

* ``score``: the mean score (0-100) and ``n``, the samples;
* ``diff``, ``low``, ``high``: the mean per-sample difference from ``full`` and its 95% interval;
* ``same``: the share of samples whose answer is the 16-bit answer, token for token;
* ``bits``: bits per quantized element, scales included (16 for ``full``, 0 for evicted tokens);
* ``kv_ratio``: KV bytes held at the end of the answers against a ``DynamicCache`` holding the
  same tokens in the same dtype.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import attrs
import torch

from kvpolicy.errors import ConfigError
from kvpolicy.evaluation.contenders import Contender, bits_per_element, held_ratio
from kvpolicy.evaluation.scoring import paired_interval
from kvpolicy.evaluation.shared_prefill import generate_from, prefill_rows
from kvpolicy.evaluation.task import Metric, Task, TaskResult, progress_bar

#: the contender every generation task compares against: the 16-bit cache (equal to DynamicCache)
REFERENCE = "full"


@attrs.frozen
class Sample:
    """One prompt: ``ids`` (token ids, the task's context length) and what its answer is scored on."""

    name: str
    ids: tuple[int, ...]
    reference: Any = None


def chat_ids(tokenizer, parts: Sequence[str | list[int]], instruct: bool) -> list[int]:
    """Token ids of a user turn made of ``parts`` (text, or token ids spliced in as they are),
    wrapped in the chat template of an instruction-tuned tokenizer."""
    if instruct and getattr(tokenizer, "chat_template", None):
        marker = "\x00KVPOLICY\x00"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
        )
        head, tail = text.split(marker)
        parts = [head, *parts, tail]
    out: list[int] = []
    for part in parts:
        out += part if isinstance(part, list) else tokenizer(part, add_special_tokens=False)["input_ids"]
    return out


def eos_ids(tokenizer, model: torch.nn.Module) -> list[int]:
    """Every end-of-sequence id the tokenizer or the model's generation config names."""
    ids: list[int] = []
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None)):
        for item in value if isinstance(value, list) else [value]:
            if item is not None and item not in ids:
                ids.append(int(item))
    im_end = getattr(tokenizer, "convert_tokens_to_ids", lambda t: None)("<|im_end|>")
    if isinstance(im_end, int) and im_end != getattr(tokenizer, "unk_token_id", None) and im_end not in ids:
        ids.append(im_end)
    return ids


@attrs.define
class GenerationTask(Task):
    """A task scored on free greedy generation (see the module docstring)."""

    name: ClassVar[str]
    label: ClassVar[str]
    #: what the score measures, for the report
    scored_by: ClassVar[str]
    samples: int = 8
    #: prompt tokens of every sample
    context: int = 2048
    #: prompts prefilled (and decoded) together
    batch: int = 4
    max_new_tokens: int = 64

    @abstractmethod
    def build(self, tokenizer, instruct: bool) -> list[Sample]:
        """``samples`` samples, their ``ids`` of ``context`` tokens where the task sets one (prompts
        of one length are prefilled together, so equal lengths make full batches)."""

    def stop(self, tokenizer, tokens: list[int]) -> bool:
        """Whether a row's answer so far (``tokens``) is complete (EOS always ends it)."""
        return False

    def answer(self, tokenizer, tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True)

    @abstractmethod
    def score(self, sample: Sample, answer: str, reference_answer: str) -> float:
        """0-100: how good ``answer`` is (``reference_answer``: the 16-bit cache's answer)."""

    def metrics(self) -> list[Metric]:
        return [
            Metric("score", self.label, True, ".1f"),
            Metric("diff", "vs 16-bit (points)", True, "+.1f"),
            Metric("same", "same answer as 16-bit", True, ".2f"),
        ]

    @torch.no_grad()
    def run(self, model, tokenizer, contenders: Sequence[Contender], progress: bool = True) -> TaskResult:
        if REFERENCE not in [c.name for c in contenders]:
            raise ConfigError("policies", [c.name for c in contenders], f"a list that holds {REFERENCE!r}")
        instruct = bool(getattr(tokenizer, "chat_template", None))
        samples = self.build(tokenizer, instruct)
        if not samples:
            raise ValueError(f"task {self.name}: no sample of {self.context} tokens could be built for this tokenizer")
        eos = eos_ids(tokenizer, model)
        lengths = sorted({len(s.ids) for s in samples})
        settings = {**self.settings(), "instruct": instruct, "prompt_tokens": lengths}
        result = TaskResult(self.name, self.metrics(), settings=settings, scored_by=self.scored_by)
        batches = [
            group[i : i + self.batch]
            for group in ([s for s in samples if len(s.ids) == n] for n in lengths)
            for i in range(0, len(group), self.batch)
        ]
        bar = progress_bar(len(batches) * len(contenders) * self.max_new_tokens, self.name, progress)
        answers: dict[str, dict[str, tuple[list[int], str]]] = {c.name: {} for c in contenders}
        ratios: dict[str, list[float]] = {c.name: [] for c in contenders}
        for number, batch in enumerate(batches, 1):
            ids = torch.tensor([s.ids for s in batch], device=model.device)
            bar.set_postfix_str(f"prefill {number}/{len(batches)} ({ids.numel()} tokens)")
            source, first = prefill_rows(model, ids)
            for contender in contenders:
                bar.set_postfix_str(f"batch {number}/{len(batches)} · {contender.name}")
                cache = contender.make_cache(model)
                before = bar.n
                rows = generate_from(
                    model,
                    cache,
                    source,
                    ids,
                    first,
                    self.max_new_tokens,
                    lambda tokens: self.stop(tokenizer, tokens),
                    eos,
                    on_step=lambda: bar.update(),
                )
                bar.update(self.max_new_tokens - (bar.n - before))
                ratios[contender.name].append(held_ratio(cache, model))
                for sample, tokens in zip(batch, rows):
                    answers[contender.name][sample.name] = (tokens, self.answer(tokenizer, tokens))
                del cache
            del source
        bar.close()
        reference = answers[REFERENCE]
        scores = {
            c.name: [self.score(s, answers[c.name][s.name][1], reference[s.name][1]) for s in samples]
            for c in contenders
        }
        for contender in contenders:
            name = contender.name
            for sample, score in zip(samples, scores[name]):
                tokens, text = answers[name][sample.name]
                result.details.append(
                    {
                        "contender": name,
                        "sample": sample.name,
                        "answer": text,
                        "tokens": len(tokens),
                        "score": score,
                        "same": tokens == reference[sample.name][0],
                    }
                )
            diff, low, high = paired_interval(scores[name], scores[REFERENCE])
            mine = [d for d in result.details if d["contender"] == name]
            result.rows[name] = {
                "score": sum(scores[name]) / len(samples),
                "diff": diff,
                "low": low,
                "high": high,
                "n": len(samples),
                "same": sum(d["same"] for d in mine) / len(mine),
                "bits": bits_per_element(contender, model),
                "kv_ratio": sum(ratios[name]) / len(ratios[name]),
            }
        result.settings["references"] = {s.name: _short(s.reference) for s in samples}
        return result


def _short(value: Any) -> Any:
    return value[:200] if isinstance(value, str) else value
