"""Question answering over a long document: a value that a real Python file states, asked for.

Each sample is a window of ``context`` tokens (with the question) of a standard-library file
holding a module-level assignment of a short literal (``_MAXCACHE = 512``,
``DEFAULT_ENCODING = 'utf-8'``) whose name is assigned nowhere else in the file. The
assignment sits at a depth of the window that cycles through ``depths``, so most facts lie
in the part of the cache a policy quantizes. Each file gives one fact (the middle one of its
list) before any file gives a second, so the first samples stay the same as ``samples`` grows.
The model is asked, in its chat template, for the value; exact match (100 or 0) after
stripping quotes, backticks and a trailing period.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path
from typing import ClassVar

import attrs

from kvpolicy.evaluation.generation_task import GenerationTask, Sample, chat_ids
from kvpolicy.evaluation.texts import code_files

INTRO = "Here is part of a Python source file.\n\n```python\n"
QUESTION = (
    "\n```\n\nIn the code above, what value is assigned to the module-level name `{name}`? "
    "Answer with the value only, exactly as written in the code."
)


def facts(source: str) -> list[tuple[str, str, int]]:
    """``(name, literal as written, character offset)`` of the module-level assignments of a short
    int or string literal to a name that the file assigns only once."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    stored = Counter(n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    out = []
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        name, value = node.targets[0].id, node.value
        if stored[name] != 1 or len(name) < 4 or name.startswith("__"):
            continue
        if not isinstance(value, ast.Constant) or isinstance(value.value, bool) or value.value is None:
            continue
        if isinstance(value.value, str) and not (1 <= len(value.value) <= 24 and value.value.isprintable()):
            continue
        if not isinstance(value.value, (int, str)) or value.lineno != value.end_lineno:
            continue
        literal = ast.get_source_segment(source, value) or ""  # splits the whole file: last
        if len(literal) > 26:
            continue
        out.append((name, literal, offsets[node.lineno - 1]))
    return out


def normalize(text: str) -> str:
    """An answer or a literal as compared: first line, no surrounding quotes, backticks, spaces or final period."""
    line = next((part for part in text.strip().splitlines() if part.strip()), "")
    line = line.strip().rstrip(".").strip().strip("`").strip()
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "'\"":
        line = line[1:-1]
    return line


@attrs.define
class DocumentQA(GenerationTask):
    name: ClassVar[str] = "qa"
    label: ClassVar[str] = "document QA exact match"
    scored_by: ClassVar[str] = "exact match (0/100) of a value a stdlib file assigns, asked about at the end"
    samples: int = 8
    context: int = 4096
    max_new_tokens: int = 24
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)

    def build(self, tokenizer, instruct: bool) -> list[Sample]:
        out: list[Sample] = []
        read: dict[Path, tuple[str, list[tuple[str, str, int]]]] = {}  # each file's text and facts, read once
        tokens: dict[Path, list[int]] = {}  # each file's token ids, made once
        # round r asks each file its r-th fact counted outward from the middle of its list (the
        # middle one first), so more samples than files take further facts, never a repeat; the
        # first round reads the files only as far as it needs to
        round_ = 0
        while True:
            asked = False
            for path in code_files():
                if path not in read:
                    source = path.read_text(encoding="utf-8")
                    read[path] = source, facts(source)
                source, found = read[path]
                if round_ >= len(found):
                    continue
                asked = True
                if path not in tokens:
                    tokens[path] = tokenizer(source, add_special_tokens=False)["input_ids"]
                fact = found[_outward(len(found))[round_]]
                sample = self._sample(tokenizer, instruct, path.name, source, tokens[path], fact, len(out))
                if sample is not None:
                    out.append(sample)
                    if len(out) == self.samples:
                        return out
            if not asked:
                return out
            round_ += 1

    def _sample(
        self,
        tokenizer,
        instruct: bool,
        file: str,
        source: str,
        ids: list[int],
        fact: tuple[str, str, int],
        index: int,
    ) -> Sample | None:
        """The ``index``-th sample: a window of ``source`` (token ``ids``) with ``fact``'s assignment
        at its depth, or ``None`` where the file is too short or the window cannot hold it."""
        name, literal, offset = fact
        question = QUESTION.format(name=name)
        window = self.context - len(chat_ids(tokenizer, [INTRO, [], question], instruct))
        if window <= 0 or len(ids) < window:
            return None
        at = len(tokenizer(source[:offset], add_special_tokens=False)["input_ids"])
        depth = self.depths[index % len(self.depths)]
        start = min(max(0, at - int(depth * window)), len(ids) - window)
        prompt = chat_ids(tokenizer, [INTRO, ids[start : start + window], question], instruct)
        if len(prompt) != self.context or not start <= at < start + window - 8:
            return None
        return Sample(f"{file}:{name}", tuple(prompt), literal)

    def stop(self, tokenizer, tokens: list[int]) -> bool:
        return "\n" in tokenizer.decode(tokens).strip()

    def score(self, sample: Sample, answer: str, reference_answer: str) -> float:
        return 100.0 if normalize(answer) == normalize(sample.reference) else 0.0


def _outward(count: int) -> list[int]:
    """Indices ``0..count-1`` from the middle (``count // 2``) outward: middle, next, previous, ..."""
    middle = count // 2
    order = [middle]
    for step in range(1, count):
        order += [i for i in (middle + step, middle - step) if 0 <= i < count]
    return order[:count]
