"""Question answering over a long document: a value that a real Python file states, asked for.

Each sample is a window of ``context`` tokens (with the question) of a standard-library file
holding a module-level assignment of a short literal (``_MAXCACHE = 512``,
``DEFAULT_ENCODING = 'utf-8'``) whose name is assigned nowhere else in the file. The
assignment sits at a depth of the window that cycles through ``depths``, so most facts lie
in the part of the cache a policy quantizes. The model is asked, in its chat template, for
the value; exact match (100 or 0) after stripping quotes, backticks and a trailing period.
"""

from __future__ import annotations

import ast
from collections import Counter
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
        literal = ast.get_source_segment(source, value) or ""
        if not isinstance(value, ast.Constant) or isinstance(value.value, bool) or value.value is None:
            continue
        if isinstance(value.value, str) and not (1 <= len(value.value) <= 24 and value.value.isprintable()):
            continue
        if not isinstance(value.value, (int, str)) or "\n" in literal or len(literal) > 26:
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
        out = []
        for path in code_files():
            source = path.read_text(encoding="utf-8")
            found = facts(source)
            if not found:
                continue
            # one fact per file: the one nearest the middle of the file's list, for variety
            name, literal, offset = found[len(found) // 2]
            question = QUESTION.format(name=name)
            window = self.context - len(chat_ids(tokenizer, [INTRO, [], question], instruct))
            ids = tokenizer(source, add_special_tokens=False)["input_ids"]
            if window <= 0 or len(ids) < window:
                continue
            at = len(tokenizer(source[:offset], add_special_tokens=False)["input_ids"])
            depth = self.depths[len(out) % len(self.depths)]
            start = min(max(0, at - int(depth * window)), len(ids) - window)
            prompt = chat_ids(tokenizer, [INTRO, ids[start : start + window], question], instruct)
            if len(prompt) != self.context or not start <= at < start + window - 8:
                continue
            out.append(Sample(f"{path.name}:{name}", tuple(prompt), literal))
            if len(out) == self.samples:
                break
        return out

    def stop(self, tokenizer, tokens: list[int]) -> bool:
        return "\n" in tokenizer.decode(tokens).strip()

    def score(self, sample: Sample, answer: str, reference_answer: str) -> float:
        return 100.0 if normalize(answer) == normalize(sample.reference) else 0.0
