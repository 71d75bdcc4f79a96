"""What every evaluation task returns: per-contender metrics plus per-sample details."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import attrs
import torch

from kvpolicy.evaluation.contenders import Contender


@attrs.frozen
class Metric:
    """A column of the results table."""

    key: str
    label: str
    higher_is_better: bool
    fmt: str = ".3f"


@attrs.define
class TaskResult:
    """``rows[contender][metric key]``; ``details``: one dict per sample and contender."""

    task: str
    metrics: list[Metric]
    rows: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    details: list[dict[str, Any]] = attrs.field(factory=list)
    settings: dict[str, Any] = attrs.field(factory=dict)
    #: what a generation task's 0-100 score measures (``None``: a teacher-forced proxy)
    scored_by: str | None = None

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "scored_by": self.scored_by,
            "settings": self.settings,
            "metrics": [attrs.asdict(m) for m in self.metrics],
            "rows": self.rows,
            "details": self.details,
        }

    @classmethod
    def from_dict(cls, data: dict) -> TaskResult:
        """The inverse of :meth:`to_dict` (a saved ``results.json`` entry)."""
        return cls(
            task=data["task"],
            metrics=[Metric(**m) for m in data["metrics"]],
            rows=data["rows"],
            details=data["details"],
            settings=data["settings"],
            scored_by=data.get("scored_by"),
        )

    def made_by(self, task: Task, contenders: Sequence[str]) -> bool:
        """Whether this result is what ``task`` would compute for ``contenders`` (same task,
        same settings, same contenders): a resumed run reuses it instead of running again."""
        return (
            self.task == task.name
            and sorted(self.rows) == sorted(contenders)
            and all(self.settings.get(k) == v for k, v in _jsonable(task.settings()).items())
        )


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class Task(ABC):
    """One evaluation task; ``run`` evaluates every contender on the same samples."""

    name: ClassVar[str]

    @abstractmethod
    def run(
        self, model: torch.nn.Module, tokenizer, contenders: Sequence[Contender], progress: bool = True
    ) -> TaskResult:
        """Evaluate ``contenders`` (each gets a fresh cache per sample)."""

    def settings(self) -> dict[str, Any]:
        return attrs.asdict(self) if attrs.has(type(self)) else {}


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
