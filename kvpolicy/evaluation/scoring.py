"""Scores of generated text, the spread of a score over samples, and a loop detector.

Every score is on a 0-100 scale, so a difference between two contenders reads in points:

* :func:`edit_similarity`: ``difflib`` ratio of two strings (code completion);
* :func:`rouge_l`: ROUGE-L F1 over words (summaries against the 16-bit cache's summary);
* :func:`paired_interval`: mean and 95% interval of per-sample differences against the
  16-bit cache on the same samples (Student t), the spread every table prints;
* :func:`looping`: why a text repeats itself (a line, or a run of words), or ``None``;
* :func:`pareto_front`: the points nothing beats on both cost and error.
"""

from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from collections.abc import Sequence

_WORD = re.compile(r"\w+|[^\w\s]")


def edit_similarity(a: str, b: str) -> float:
    """``100 * SequenceMatcher(a, b).ratio()``: 100 for equal strings, 0 for nothing in common."""
    return 100.0 * difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks of ``text``."""
    return _WORD.findall(text.lower())


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (x100) of ``candidate`` against ``reference`` over :func:`words`; 100 when
    both are empty."""
    c, r = words(candidate), words(reference)
    if not c or not r:
        return 100.0 if c == r else 0.0
    common = _lcs(c, r)
    if common == 0:
        return 0.0
    precision, recall = common / len(c), common / len(r)
    return 100.0 * 2 * precision * recall / (precision + recall)


#: two-sided 95% Student t quantiles by degrees of freedom (beyond 30: the normal's 1.96)
_T95 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
    11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
    20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
    29: 2.045, 30: 2.042,
}  # fmt: skip


def paired_interval(scores: Sequence[float], reference: Sequence[float]) -> tuple[float, float, float]:
    """``(mean difference, low, high)``: the mean of ``scores[i] - reference[i]`` and its 95%
    Student-t interval (a single sample, or samples that all differ by the same amount, give a
    zero-width interval)."""
    if len(scores) != len(reference) or not scores:
        raise ValueError(f"paired_interval needs equally many scores, got {len(scores)} and {len(reference)}")
    diffs = [s - r for s, r in zip(scores, reference)]
    n = len(diffs)
    mean = sum(diffs) / n
    if n == 1:
        return mean, mean, mean
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = _T95.get(n - 1, 1.96) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def looping(text: str, min_repeats: int = 4) -> str | None:
    """Why ``text`` is a loop, or ``None``: a non-blank line written ``min_repeats - 1`` times
    or more, or a run of 1 to 8 words repeated back to back ``min_repeats`` times or more
    ("Python\\n\\nPython\\n\\nPython", "the the the the", a heading rewritten under itself)."""
    lines = Counter(line.strip() for line in text.splitlines() if len(line.strip()) > 2)
    for line, count in lines.most_common(1):
        if count >= min_repeats - 1:
            return f"the line {line[:60]!r} is written {count} times"
    tokens = words(text)
    for size in range(1, 9):
        for start in range(len(tokens) - size * min_repeats + 1):
            unit = tokens[start : start + size]
            if all(tokens[start + k * size : start + (k + 1) * size] == unit for k in range(1, min_repeats)):
                if size == 1 and not unit[0].isalnum():
                    continue  # a row of punctuation ("....") is formatting, not a loop of words
                return f"{' '.join(unit)!r} repeats {min_repeats} times in a row"
    return None


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the ``(name, bytes, error)`` points no other point beats on both (fewer or equal
    bytes and lower error, or lower bytes and equal error), ordered by bytes."""
    front = []
    for name, size, error in sorted(points, key=lambda p: (p[1], p[2])):
        if not front or error < front[-1][2]:
            front.append((name, size, error))
    return [name for name, _, _ in front]
