"""Real text that ships with Python itself: English prose and Python source.

* Prose: the Python language reference topics in ``pydoc_data.topics`` (what ``help()``
  shows), concatenated in sorted topic order.
* Code: the standard library's own ``.py`` files, chosen by a fixed rule (sorted names,
  size between 40 and 400 KB) so a given Python version always yields the same files.

Nothing is generated. The documents are the same for every policy and nothing is tuned
on them.
"""

from __future__ import annotations

import sysconfig
from functools import cache
from pathlib import Path

#: which standard-library files count as code documents (bytes)
CODE_FILE_SIZE = (40_000, 400_000)


@cache
def prose_text() -> str:
    """The language reference topics, in sorted order, separated by blank lines."""
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some distributions strip pydoc_data
        raise FileNotFoundError(f"this Python has no pydoc_data ({err}); prose documents need it") from None
    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def code_files() -> list[Path]:
    """Standard-library Python files of a document's size, sorted by name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    low, high = CODE_FILE_SIZE
    return [p for p in sorted(stdlib.glob("*.py")) if low <= p.stat().st_size <= high]


def token_windows(tokenizer, text: str, length: int, count: int, stride: int | None = None) -> list[list[int]]:
    """Up to ``count`` windows of ``length`` tokens from ``text``, ``stride`` tokens apart."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stride = stride or length
    return [ids[i : i + length] for i in range(0, len(ids) - length + 1, stride)][:count]


def prose_documents(tokenizer, length: int, count: int) -> list[tuple[str, list[int]]]:
    """``(name, token ids)`` windows of the reference topics."""
    windows = token_windows(tokenizer, prose_text(), length, count)
    return [(f"pydoc_topics[{i}]", w) for i, w in enumerate(windows)]


def code_documents(tokenizer, length: int, count: int, skip: int = 0) -> list[tuple[str, list[int]]]:
    """``(file name, first length token ids)`` of the first ``count`` long-enough stdlib files
    after skipping ``skip`` of them."""
    out = []
    for path in code_files()[skip:]:
        ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            out.append((path.name, ids[:length]))
        if len(out) == count:
            break
    return out
