"""Registers the ``stride`` selector and a ``strided_kivi`` policy that uses it."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import attrs
import torch
import yaml

from kvpolicy import ConfigError, hookimpl
from kvpolicy.selectors import Selector


def _positive(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"stride.{attribute.name}", value, "a positive integer")


@attrs.define
class StrideSelector(Selector):
    """Keep every ``stride``-th position (a fixed anchor grid); at most ``limit`` of them, the oldest first."""

    name: ClassVar[str] = "stride"
    stride: int = attrs.field(default=64, validator=_positive, metadata={"doc": "distance between kept tokens"})
    limit: int = attrs.field(default=32, validator=_positive, metadata={"doc": "most anchors kept"})

    @property
    def budget(self) -> int:
        return self.limit

    def scaled(self, factor: float) -> StrideSelector:
        """For budget matching (``kvpolicy evaluate --budget``): scale how many anchors are kept."""
        return attrs.evolve(self, limit=max(1, int(self.limit * factor)))

    def keep(self, length: int) -> torch.Tensor:
        # anchors 0, stride, 2*stride, ... up to `limit` of them: once kept, kept for good,
        # and a position past the limit was never kept, so nothing is ever re-promoted
        return torch.arange(0, min(length, self.stride * self.limit), self.stride, dtype=torch.int64)


@hookimpl
def kvpolicy_selectors():
    return [StrideSelector]


@hookimpl
def kvpolicy_policies():
    return [yaml.safe_load((Path(__file__).parent / "strided_kivi.yaml").read_text())]
