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

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "settings": self.settings,
            "metrics": [attrs.asdict(m) for m in self.metrics],
            "rows": self.rows,
            "details": self.details,
        }


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
