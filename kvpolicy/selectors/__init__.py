"""Retention selectors: given how many tokens a layer holds, which positions stay full precision.

A selector is a deterministic function of the sequence length ``t`` (and, for LogQuant's
schedule, of the prefill's length, bound with ``for_prefill``): ``keep(t)`` returns the
sorted positions in ``[0, t)`` that stay in full precision. Every selector must satisfy:

* ``len(keep(t)) <= budget`` (when ``budget`` is not ``None``);
* the newest tokens it promises are kept (window/log keep the newest ``min(t, W)``);
* no re-promotion: for ``t2 > t1``, ``keep(t2) ∩ [0, t1) ⊆ keep(t1)`` (a demoted token was
  quantized, which cannot be undone).

Selectors are built once per layer and hold no state shared across layers or batch rows;
The log selectors keep a private memo of their last answer for speed only.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from typing import ClassVar

import attrs
import torch

from kvpolicy.errors import ConfigError


def _positive(name: str):
    def check(instance, attribute, value):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name}.{attribute.name}", value, "a positive integer")

    return check


class Selector(ABC):
    """Chooses the full-precision positions of a layer holding ``t`` tokens."""

    #: registry name, e.g. ``"window"``
    name: ClassVar[str]

    @property
    @abstractmethod
    def budget(self) -> int | None:
        """Most positions ever kept, or ``None`` when unbounded."""

    @abstractmethod
    def keep(self, length: int) -> torch.Tensor:
        """Sorted int64 positions in ``[0, length)`` kept in full precision."""

    def is_kept(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        """Bool mask over ``positions`` (int tensor, any order): which are kept at ``length``."""
        return torch.isin(positions.to(torch.int64), self.keep(length).to(positions.device))

    def may_demote(self, previous: int, length: int) -> bool:
        """Whether growing from ``previous`` to ``length`` tokens can demote a position: one kept
        at ``previous``, or new in ``[previous, length)``, that ``keep(length)`` drops.

        ``False`` promises that nothing is demoted, so a store skips :meth:`is_kept` (it runs
        for every layer, keys and values, at every step). ``True`` is always safe.
        """
        return True

    def for_prefill(self, tokens: int) -> Selector:
        """This selector for a sequence whose first update holds ``tokens`` tokens. A selector
        whose choices depend on the prefill's length (LogQuant's schedule) returns a copy bound
        to it; every other returns itself. Stores call it at their first update."""
        return self

    @property
    def fixed_budget(self) -> int:
        """Tokens kept whatever budget the selector is scaled to (attention sinks); 0 by default."""
        return 0

    def scaled(self, factor: float) -> Selector:
        """This selector keeping about ``factor`` times its budget beyond :attr:`fixed_budget`
        (rounded down, at least one token): how an evaluation fits any policy to a number of
        full-precision tokens. An unbounded selector returns itself; a bounded one must say
        how it scales (the built-ins scale their size; a plugin's selector implements this)."""
        if self.budget is None:
            return self
        raise NotImplementedError(
            f"selector {self.name!r} does not say how it scales to a budget: implement {type(self).__name__}.scaled"
        )

    def oldest_dropped(self, held: int, added: int) -> int | None:
        """When a store holding ``held`` full-precision tokens (exactly this selector's kept
        set, in arrival order) takes ``added`` new ones: how many of the oldest leave, where the
        tokens that leave are always the oldest ones (a window moving on); ``None`` where the
        selector cannot say without :meth:`is_kept`. A store then skips the per-position test,
        which a decode step would otherwise run for every layer, keys and values."""
        return None

    def dropped_run(self, held: int, added: int) -> tuple[int, int] | None:
        """Like :meth:`oldest_dropped`, for selectors whose leaving tokens are one contiguous run
        of the arrival order, not necessarily the oldest (a window behind attention sinks):
        ``(start, count)``, the region indices ``start .. start+count-1`` of the ``held + added``
        candidates leave; ``None`` where the selector cannot say without :meth:`is_kept`."""
        oldest = self.oldest_dropped(held, added)
        return None if oldest is None else (0, oldest)

    @property
    def sinks(self) -> int:
        """How many first tokens are kept for good (attention sinks). In a left-padded batch
        the cache places each row's own first real tokens there (see :mod:`kvpolicy.store.row_sinks`)."""
        return 0


@attrs.define
class AllSelector(Selector):
    """Keep every token in full precision (the 16-bit baseline)."""

    name: ClassVar[str] = "all"

    @property
    def budget(self) -> int | None:
        return None

    def keep(self, length: int) -> torch.Tensor:
        return torch.arange(length, dtype=torch.int64)

    def is_kept(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        return torch.ones(positions.shape, dtype=torch.bool, device=positions.device)

    def may_demote(self, previous: int, length: int) -> bool:
        return False

    def oldest_dropped(self, held: int, added: int) -> int | None:
        return 0


@attrs.define
class SinkSelector(Selector):
    """Keep the first ``size`` tokens (attention sinks, StreamingLLM)."""

    name: ClassVar[str] = "sink"
    size: int = attrs.field(default=4, validator=_positive("sink"), metadata={"doc": "number of first tokens kept"})

    @property
    def budget(self) -> int | None:
        return self.size

    @property
    def sinks(self) -> int:
        return self.size

    def keep(self, length: int) -> torch.Tensor:
        return torch.arange(min(length, self.size), dtype=torch.int64)

    def is_kept(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        return positions < min(length, self.size)

    def may_demote(self, previous: int, length: int) -> bool:
        return length > self.size  # positions past the sinks are never kept

    @property
    def fixed_budget(self) -> int:
        return self.size

    def scaled(self, factor: float) -> Selector:
        return self  # sinks are structural: never scaled


@attrs.define
class WindowSelector(Selector):
    """Keep the newest ``size`` tokens (KIVI's residual, StreamingLLM's window)."""

    name: ClassVar[str] = "window"
    size: int = attrs.field(
        default=128, validator=_positive("window"), metadata={"doc": "number of newest tokens kept"}
    )

    @property
    def budget(self) -> int | None:
        return self.size

    def keep(self, length: int) -> torch.Tensor:
        return torch.arange(max(0, length - self.size), length, dtype=torch.int64)

    def is_kept(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        return positions >= length - self.size

    def may_demote(self, previous: int, length: int) -> bool:
        return length > self.size  # the window's oldest token leaves at every step past its size

    def oldest_dropped(self, held: int, added: int) -> int | None:
        return max(0, held + added - self.size)

    def scaled(self, factor: float) -> Selector:
        return attrs.evolve(self, size=_scaled(self.size, factor))


@functools.lru_cache(maxsize=512)
def _log_prefill(window: int, tokens: int) -> tuple[tuple[int, ...], int]:
    """The LogQuant authors' state after a first update of ``tokens`` tokens: ``(sparse
    positions, start of the recent window)``; the window is ``[start, tokens)``.

    Up to ``W`` tokens all stay in the window; below ``3W`` the first ``W`` form the sparse
    set; from ``3W`` on, the oldest ``2W`` of sparse + window are thinned to every other
    token (the older of each pair survives) until fewer than ``3W`` remain.
    """
    w = window
    if tokens <= w:
        return (), 0
    if tokens < 3 * w:
        return tuple(range(w)), w
    sparse: list[int] = []
    start = 0
    while len(sparse) + tokens - start >= 3 * w:
        take = 2 * w - len(sparse)
        sparse = (sparse + list(range(start, start + take)))[0::2]
        start += take
    return tuple(sparse), start


@attrs.define
class LogSelector(Selector):
    """LogQuant's log-distributed retention with window ``W``, as its authors schedule it
    (at most ``3W`` tokens kept).

    Tokens arrive in a recent window. When a step takes the window past ``2W`` tokens, its
    oldest ``W`` join a sparse set: at the first flush as they are, later merged with the
    sparse set and thinned to every other token, the older of each pair surviving (so
    position 0 stays in full precision for good, an attention sink). Older tokens have
    been thinned more often: their density halves with distance. A first update (the
    prefill) of ``n`` tokens follows the authors' prefill rule (see :func:`_log_prefill`);
    every later token is one decode step (a later multi-token update counts token by token).

    Which tokens are kept therefore depends on the prefill's length: a store binds its
    selector to it (:meth:`for_prefill`). Unbound, the selector assumes a one-token prefill.
    """

    name: ClassVar[str] = "log"
    window: int = attrs.field(
        default=42, validator=_positive("log"), metadata={"doc": "W: the window holds W..2W tokens, at most 3W kept"}
    )
    _prefill: int = attrs.field(default=1, init=False, repr=False)
    _memo: tuple[int, tuple[int, ...], int, int] | None = attrs.field(default=None, init=False, repr=False, eq=False)

    @property
    def budget(self) -> int | None:
        return 3 * self.window

    def for_prefill(self, tokens: int) -> LogSelector:
        bound = LogSelector(window=self.window)
        bound._prefill = max(1, tokens)
        return bound

    def state(self, length: int) -> tuple[tuple[int, ...], int, int]:
        """``(sparse positions, window start, flushes since the prefill)`` after ``length`` tokens."""
        if length <= self._prefill:
            sparse, start = _log_prefill(self.window, length)
            return sparse, start, 0
        memo = self._memo
        if memo is None or memo[0] > length:
            sparse, start = _log_prefill(self.window, self._prefill)
            memo = (self._prefill, sparse, start, 0)
        at, sparse, start, flushes = memo
        w = self.window
        # the window [start, t) flushes when it would exceed 2W tokens: at t = start + 2W + 1
        while start + 2 * w + 1 <= length:
            flushed = tuple(range(start, start + w))
            sparse = (sparse + flushed)[0::2] if sparse else flushed
            start += w
            flushes += 1
        self._memo = (length, sparse, start, flushes)
        return sparse, start, flushes

    def keep(self, length: int) -> torch.Tensor:
        sparse, start, _ = self.state(length)
        return torch.cat([torch.tensor(sparse, dtype=torch.int64), torch.arange(start, length, dtype=torch.int64)])

    def may_demote(self, previous: int, length: int) -> bool:
        if previous < self._prefill:  # the prefill itself (or a state before it)
            return length >= 3 * self.window
        before = self.state(previous)[2]  # the memo holds `previous`: only new flushes are walked
        return self.state(length)[2] != before

    def scaled(self, factor: float) -> Selector:
        return LogSelector(window=_scaled(self.window, factor))


@attrs.define
class NewerLogSelector(Selector):
    """A log-distributed retention that thins toward newer tokens (kvpolicy's first LogQuant).

    Tokens arrive in a recent window. When the window holds more than ``2W`` tokens, its
    oldest ``W`` join a sparse set, which is then thinned to every other token, keeping the
    newer one of each pair, from the first flush on, whatever the prefill. It differs from
    the LogQuant authors' schedule (:class:`LogSelector`), which keeps the older token of
    each pair (so position 0 stays, a sink), does not thin at the first flush and treats
    the prefill by its own rule. Kept for comparison; at most ``3W`` tokens.
    """

    name: ClassVar[str] = "log_newer"
    window: int = attrs.field(
        default=42, validator=_positive("log"), metadata={"doc": "W: the window holds W..2W tokens, at most 3W kept"}
    )
    _memo_flushes: int = attrs.field(default=0, init=False, repr=False, eq=False)
    _memo_sparse: list[int] = attrs.field(factory=list, init=False, repr=False, eq=False)

    @property
    def budget(self) -> int | None:
        return 3 * self.window

    def flushes(self, length: int) -> int:
        """Number of window flushes after ``length`` tokens (flush k happens at t=(k+1)W+1)."""
        return max(0, (length - 1) // self.window - 1) if length > 2 * self.window else 0

    def sparse(self, flushes: int) -> list[int]:
        """Sparse positions after ``flushes`` flushes (sorted)."""
        if flushes < self._memo_flushes:
            self._memo_flushes, self._memo_sparse = 0, []
        sparse = self._memo_sparse
        w = self.window
        for k in range(self._memo_flushes + 1, flushes + 1):
            merged = sparse + list(range((k - 1) * w, k * w))
            # thin to every other token, keeping the newest of each pair
            sparse = merged[(len(merged) - 1) % 2 :: 2]
        self._memo_flushes, self._memo_sparse = flushes, sparse
        return sparse

    def keep(self, length: int) -> torch.Tensor:
        k = self.flushes(length)
        sparse = torch.tensor(self.sparse(k), dtype=torch.int64)
        return torch.cat([sparse, torch.arange(k * self.window, length, dtype=torch.int64)])

    def may_demote(self, previous: int, length: int) -> bool:
        # between flushes the kept set only grows: the window takes every new token
        return self.flushes(length) != self.flushes(previous)

    def scaled(self, factor: float) -> Selector:
        return NewerLogSelector(window=_scaled(self.window, factor))


@attrs.define
class UnionSelector(Selector):
    """Keep a position if any member selector keeps it."""

    name: ClassVar[str] = "union"
    members: tuple[Selector, ...] = attrs.field(converter=tuple)

    @property
    def budget(self) -> int | None:
        budgets = [m.budget for m in self.members]
        return None if any(b is None for b in budgets) else sum(budgets)

    @property
    def sinks(self) -> int:
        return max(m.sinks for m in self.members)

    def keep(self, length: int) -> torch.Tensor:
        return torch.unique(torch.cat([m.keep(length) for m in self.members]))

    def is_kept(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        kept = torch.zeros(positions.shape, dtype=torch.bool, device=positions.device)
        for member in self.members:
            kept |= member.is_kept(positions, length)
        return kept

    def may_demote(self, previous: int, length: int) -> bool:
        # a position the union kept was kept by some member, which keeps it unless it may demote
        return any(m.may_demote(previous, length) for m in self.members)

    def dropped_run(self, held: int, added: int) -> tuple[int, int] | None:
        """Sinks and a window (StreamingLLM): the candidates are the sinks, then the window's
        tokens, then the new ones, so the window's oldest leave, right after the sinks."""
        kinds = sorted(self.members, key=lambda m: type(m).__name__)
        if len(kinds) != 2 or type(kinds[0]) is not SinkSelector or type(kinds[1]) is not WindowSelector:
            return None
        sinks, window = kinds[0].size, kinds[1].size
        return sinks, max(0, held + added - sinks - window)

    @property
    def fixed_budget(self) -> int:
        return sum(m.fixed_budget for m in self.members)

    def scaled(self, factor: float) -> Selector:
        return UnionSelector([m.scaled(factor) for m in self.members])

    def for_prefill(self, tokens: int) -> Selector:
        return UnionSelector([m.for_prefill(tokens) for m in self.members])


def _scaled(size: int, factor: float) -> int:
    """``size * factor`` rounded down (a matched budget never exceeds the one asked for), at least 1."""
    return max(1, math.floor(size * factor + 1e-9))


BUILTIN_SELECTORS: tuple[type[Selector], ...] = (
    AllSelector,
    SinkSelector,
    WindowSelector,
    LogSelector,
    NewerLogSelector,
)
