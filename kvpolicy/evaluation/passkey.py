"""Passkey retrieval: a 5-digit key hidden at a given depth of real prose, asked for at the end.

The haystack is the Python language reference (:func:`~kvpolicy.evaluation.texts.prose_text`);
the needle sentence is inserted at a sentence boundary at ``depth`` of the context. The
question and the answer are decoded one token at a time on the contender's cache, so the
key has to be recovered from the compressed cache. Exact scoring: the key's digits appear
in the first ``answer_tokens`` generated tokens.

A base model may know where the key is and still answer in prose ("the pass key is the
..."), so the task also scores retrieval without the answer's format: ``recall``, the
share of the key's tokens after its first that the model predicts (top-1) when the key is
fed to it token by token after the question (teacher forcing, on a fresh cache). Copying
the rest of a 5-digit key needs the needle from the cache; guessing a digit is right one
time in ten.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar

import attrs
import torch

from kvpolicy.evaluation.contenders import Contender
from kvpolicy.evaluation.decoding import continue_on, feed, ingest, prefill, step
from kvpolicy.evaluation.task import Metric, Task, TaskResult, progress_bar
from kvpolicy.evaluation.texts import prose_text

INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


def build_prompt(tokenizer, haystack_ids: list[int], length: int, depth: float, key: str) -> str:
    """A prompt of about ``length`` tokens with the needle at ``depth`` (0 = start, 1 = end)."""
    fixed = sum(
        len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (INTRO, NEEDLE.format(key=key), QUESTION)
    )
    budget = length - fixed - 8
    if budget <= 0:
        raise ValueError(f"passkey length {length} is too short for the prompt")
    hay = tokenizer.decode(haystack_ids[:budget])
    cut = int(len(hay) * depth)
    boundary = hay.find(". ", cut)
    cut = boundary + 1 if boundary != -1 else cut
    return INTRO + hay[:cut] + NEEDLE.format(key=key) + hay[cut:] + QUESTION


@attrs.define
class Passkey(Task):
    name: ClassVar[str] = "passkey"
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    tail_tokens: int = 16
    answer_tokens: int = 8
    seed: int = 0

    def metrics(self) -> list[Metric]:
        per_length = [Metric(f"acc@{n}", f"passkey @{_k(n)}", True, ".2f") for n in self.lengths]
        recall = Metric("recall", "passkey digits recalled (teacher-forced)", True, ".2f")
        return [Metric("accuracy", "passkey accuracy", True, ".2f"), recall, *per_length]

    @torch.no_grad()
    def run(self, model, tokenizer, contenders: Sequence[Contender], progress: bool = True) -> TaskResult:
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if max_positions is not None and max(self.lengths) > max_positions:
            raise ValueError(f"passkey length {max(self.lengths)} exceeds the model's {max_positions} positions")
        haystack = tokenizer(prose_text(), add_special_tokens=False)["input_ids"]
        rng = random.Random(self.seed)
        result = TaskResult(self.name, self.metrics(), settings=self.settings())
        bar = progress_bar(len(self.lengths) * len(self.depths) * len(contenders), "passkey", progress)
        for length in self.lengths:
            for depth in self.depths:
                key = str(rng.randrange(10_000, 100_000))
                prompt = build_prompt(tokenizer, haystack, length, depth, key)
                ids = tokenizer(prompt)["input_ids"]
                key_ids = answer_tokens(tokenizer, prompt, ids, key)
                prefix = len(ids) - self.tail_tokens
                source, _ = prefill(model, ids[:prefix])
                for contender in contenders:
                    bar.set_postfix_str(f"{_k(length)} depth {depth} · {contender.name}")
                    out = continue_on(
                        model, contender.make_cache(model), source, prefix, ids[prefix:], self.answer_tokens
                    )
                    answer = tokenizer.decode(out, skip_special_tokens=True)
                    recalled = forced_recall(model, contender.make_cache(model), source, prefix, ids[prefix:], key_ids)
                    result.details.append(
                        {
                            "contender": contender.name,
                            "length": length,
                            "tokens": len(ids),
                            "depth": depth,
                            "key": key,
                            "answer": answer,
                            "correct": key in answer,
                            "recalled": recalled,
                            "key_tokens": len(key_ids) - 1,
                        }
                    )
                    bar.update()
        bar.close()
        for contender in contenders:
            mine = [d for d in result.details if d["contender"] == contender.name]
            row = {
                "accuracy": sum(d["correct"] for d in mine) / len(mine),
                "recall": sum(d["recalled"] for d in mine) / max(1, sum(d["key_tokens"] for d in mine)),
            }
            for n in self.lengths:
                at = [d["correct"] for d in mine if d["length"] == n]
                row[f"acc@{n}"] = sum(at) / len(at)
            result.rows[contender.name] = row
        return result


def answer_tokens(tokenizer, prompt: str, ids: list[int], key: str) -> list[int]:
    """The tokens of `` KEY`` as they follow ``prompt`` (``ids``): the tail of the prompt
    and the key tokenized together, so the key's tokens are the ones the model would write."""
    joined = tokenizer(prompt + " " + key)["input_ids"]
    if joined[: len(ids)] != ids or len(joined) - len(ids) < 2:
        raise ValueError(f"the key {key!r} does not tokenize apart from the prompt's last token")
    return joined[len(ids) :]


@torch.no_grad()
def forced_recall(model, cache, source, prefix: int, tail: list[int], key_ids: list[int]) -> int:
    """How many of ``key_ids[1:]`` the model predicts (top-1) with the key fed token by token
    after ``tail`` on ``cache`` (its first ``prefix`` tokens ingested from ``source``)."""
    ingest(cache, source, prefix)
    feed(model, cache, tail)
    hits = 0
    logits = step(model, cache, key_ids[0])
    for token in key_ids[1:]:
        hits += int(logits.argmax()) == token
        logits = step(model, cache, token)
    return hits


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)
