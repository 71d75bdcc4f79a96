"""Which positions a retention schedule keeps, stages, packs and evicts: host bookkeeping.

A :class:`Positions` object runs a selector over the sequence, one append at a time, and
keeps the int32 positions of each region (full precision, staging, packed) on the host. Each
append returns a :class:`Move`, what happened in region indices, which the stores that hold
tensors apply: the eager :class:`~kvpolicy.store.TensorStore` to its regions, the CUDA-graph
ring (:mod:`kvpolicy.graphs.ring_schedule`) to its slots.

One object serves every store with the same selector, demotion and block: the keys and values
of a layer when they are retained alike, and every layer of the cache that shares the
schedule (:func:`share_positions`). The first store to see a step advances it; the others
apply the same :class:`Move`, so the bookkeeping runs once per step and cannot drift between
layers or between the eager and the graph paths.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
import torch

from kvpolicy.selectors import Selector


@attrs.frozen
class Move:
    """One append of ``tokens`` tokens, in region indices of the regions before it.

    ``run``: ``(start, count)`` held tokens leave as one run (``count`` may be 0), the new
    tokens join the full-precision region after the rest; otherwise ``candidates`` (the held
    tokens, then the new ones) lose ``dropped`` tokens: the oldest ``dropped`` when ``oldest``,
    else those at ``drop`` (int64 CPU), ``keep`` staying. ``ready``: tokens of the staging
    buffer (then the demoted ones) packed by this move; ``evict``: the demoted tokens leave.
    """

    tokens: int
    run: tuple[int, int] | None = None
    dropped: int = 0
    oldest: bool = True
    keep: torch.Tensor | None = None
    drop: torch.Tensor | None = None
    ready: int = 0
    evict: bool = False

    @property
    def left(self) -> int:
        """Tokens that left the full-precision region (staged, packed or evicted)."""
        return self.run[1] if self.run is not None else self.dropped


class Positions:
    """The positions of one retention schedule's regions (int32 CPU tensors, arrival order).

    ``selector``: as configured (each sequence binds it to its prefill, see
    ``Selector.for_prefill``); ``demote``: ``"quantize"`` (stage, then pack ``block`` tokens at
    a time) or ``"evict"``.
    """

    def __init__(self, selector: Selector, demote: str, block: int):
        self.unbound_selector = selector
        self.demote = demote
        self.block = block
        self.reset()

    def reset(self) -> None:
        self.selector = self.unbound_selector
        self.length = 0
        self.fp_pos = self.staging_pos = self.packed_pos = torch.empty(0, dtype=torch.int32)
        self.evicted = 0
        #: the move of the last append (what the other stores of this schedule apply)
        self.last: Move | None = None

    @property
    def key(self) -> tuple:
        """What decides the positions: stores with equal keys may share one object."""
        return (repr(self.unbound_selector), self.demote, self.block)

    @property
    def demoted(self) -> bool:
        """Whether any token has left the full-precision region (staged, packed or evicted)."""
        return bool(len(self.staging_pos) or len(self.packed_pos) or self.evicted)

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in (self.fp_pos, self.staging_pos, self.packed_pos))

    def advance(self, q: int) -> Move:
        """Book ``q`` new tokens (positions ``length .. length+q-1``) and demote what the selector drops."""
        new_pos = torch.arange(self.length, self.length + q, dtype=torch.int32)
        previous, self.length = self.length, self.length + q
        if previous == 0:
            self.selector = self.unbound_selector.for_prefill(q)
        held = len(self.fp_pos)
        run = self.selector.dropped_run(held, q) if held else None
        if run is not None and run[0] + run[1] <= held:  # only held tokens leave: one copy, no test
            start, count = run
            stop, pos = start + count, self.fp_pos
            self.fp_pos = torch.cat([pos[:start], pos[stop:], new_pos])
            return self._demote(Move(q, run=(start, count)), pos[start:stop])
        cand_pos = torch.cat([self.fp_pos, new_pos])
        dropped = self.selector.oldest_dropped(held, q)
        oldest = dropped is not None
        if dropped is None:
            dropped = 0
            if self.selector.may_demote(previous, self.length):
                kept = self.selector.is_kept(cand_pos, self.length)
                idx_drop = kept.logical_not().nonzero().squeeze(-1)
                dropped = len(idx_drop)
                oldest = bool(dropped) and int(idx_drop[-1]) == dropped - 1
        if not dropped:
            self.fp_pos = cand_pos
            self.last = Move(q)
            return self.last
        if oldest:  # the oldest arrivals leave (a window moving on)
            self.fp_pos, demoted = cand_pos[dropped:], cand_pos[:dropped]
            return self._demote(Move(q, dropped=dropped), demoted)
        idx_keep = kept.nonzero().squeeze(-1)
        self.fp_pos, demoted = cand_pos[idx_keep], cand_pos[idx_drop]
        return self._demote(Move(q, dropped=dropped, oldest=False, keep=idx_keep, drop=idx_drop), demoted)

    def step(self, applied: int, q: int) -> Move:
        """The move that takes a holder of ``applied`` tokens (a store, a ring) ``q`` tokens on:
        booked now when the holder is level with this bookkeeping, else the move another holder
        of the schedule booked."""
        if self.length == applied:
            return self.advance(q)
        if self.length == applied + q and self.last is not None and self.last.tokens == q:
            return self.last
        raise RuntimeError(
            f"a holder of {applied} tokens got {q} more while its schedule holds {self.length}: "
            "the holders that share a schedule append the same tokens at every step"
        )

    def _demote(self, move: Move, pos: torch.Tensor) -> Move:
        """Positions ``pos`` left the full-precision region: evict them, or stage them and pack
        whole blocks."""
        if self.demote == "evict":
            self.evicted += len(pos)
            move = attrs.evolve(move, evict=True)
        elif len(pos):
            joined = torch.cat([self.staging_pos, pos])
            ready = (len(joined) // self.block) * self.block
            if ready:
                self.packed_pos = torch.cat([self.packed_pos, joined[:ready]])
            self.staging_pos = joined[ready:]
            move = attrs.evolve(move, ready=ready)
        self.last = move
        return move

    def crop_to(self, length: int) -> None:
        """Forget every position from ``length`` on; only while nothing was ever demoted."""
        if self.demoted:
            raise RuntimeError("a store that has demoted tokens cannot be cropped")
        self.length = min(self.length, max(0, length))
        self.fp_pos = self.fp_pos[self.fp_pos < self.length]
        self.last = None


def share_positions(stores: Iterable) -> None:
    """Give every store in ``stores`` (objects with a ``positions`` attribute, all empty) the one
    :class:`Positions` object of its schedule: stores with equal selector, demotion and block
    then book each step once."""
    shared: dict[tuple, Positions] = {}
    for store in stores:
        store.positions = shared.setdefault(store.positions.key, store.positions)
