"""Host bookkeeping of a static cache: which position sits in which ring slot, and what each
decode step packs and frees.

Which positions stay, stage, pack or leave is decided by the eager stores' own
:class:`~kvpolicy.store.positions.Positions`, taken by reference at adoption; a
:class:`RingSchedule` adds the ring slots and, after each step, a :class:`Booking`. Keys and
values retained differently (``partial_logquant``) are paired as the eager executors pair them
(:class:`~kvpolicy.executors.pairing.PackedPairing`): a packed key is read with its value row
(``value_rows``) once that value is packed too; until then its position keeps a ring slot
holding the packed side's dequantized token.
"""

from __future__ import annotations

import attrs
import torch

from kvpolicy.errors import NotSupportedError
from kvpolicy.executors.pairing import PackedPairing
from kvpolicy.store import TensorStore, aligned
from kvpolicy.store.positions import Positions
from kvpolicy.transfer import indices_to, to_device


@attrs.frozen
class SidePacking:
    """What one side packs in a step: ring ``slots`` (packing order) at packed ``offset``;
    ``index``: those slots on the device (one upload for every layer); ``stay``/``stay_slots``:
    which of them (indices into ``slots``, and their slots) keep their slot, their other side
    not packed yet, holding the dequantized token."""

    slots: list[int]
    offset: int
    index: torch.Tensor | None = None
    stay: torch.Tensor | None = None
    stay_slots: torch.Tensor | None = None

    @property
    def packed_through(self) -> int:
        return self.offset + len(self.slots)


NOTHING_PACKED = SidePacking([], 0)


@attrs.frozen
class Booking:
    """What one step changed: what ``keys`` and ``values`` pack (one object when retained
    alike) and the ring slots ``freed`` (packed on both sides, or evicted)."""

    keys: SidePacking
    values: SidePacking
    freed: list[int]

    @property
    def packed_through(self) -> int:
        """Packed tokens the fuller side's buffers hold once this booking is applied."""
        return max(self.keys.packed_through, self.values.packed_through)


NOTHING_LEFT = Booking(NOTHING_PACKED, NOTHING_PACKED, [])


class RingSchedule:
    """Host bookkeeping shared by the layers of one retention schedule (see the module
    docstring). ``slots``: ring size; ``max_cache_len``: the declared limit (the packed buffers
    hold that many tokens; decoding past it is refused), or ``None``: buffers sized at adoption
    and grown on demand; ``paired``: keys and values retained differently (a slot holds a
    position while either side of it is not packed)."""

    #: packed tokens a schedule without ``max_cache_len`` makes room for beyond the prompt's
    #: (at least; an eighth of the length for a long one) before its first growth
    headroom = 256
    #: each growth adds at least this fraction of the capacity (geometric; at most a fifth unused)
    growth = 0.25

    def __init__(self, slots: int, max_cache_len: int | None, paired: bool = False):
        #: the eager stores' bookkeeping of keys and of values, set by :meth:`start`
        self.keys: Positions | None = None
        self.values: Positions | None = None
        #: tokens this schedule has booked (its positions may be a step ahead, booked by another schedule)
        self.length = 0
        self.slots = slots
        self.max_cache_len = max_cache_len
        self.paired = paired
        #: packed tokens the buffers of each side hold (whole packing blocks), set by :meth:`start`
        self.capacity = 0
        self.slot_of: dict[int, int] = {}
        self.free: list[int] = []
        self.next_slot = -1
        self.slot_index: torch.Tensor | None = None  # int64 [1] on the device: the next token's slot
        self.ring_bias: torch.Tensor | None = None  # float32 [B, slots]
        self.packed_bias: torch.Tensor | None = None  # float32 [B, capacity]: 0 for an attended packed key
        self.value_rows: torch.Tensor | None = None  # int32 [capacity] (paired): each packed key's value row, -1 none

    def sides(self) -> tuple[Positions, ...]:
        """The bookkeeping this schedule books each step on (keys', or keys' and values')."""
        return (self.keys, self.values) if self.paired else (self.keys,)

    @property
    def demoted(self) -> bool:
        """Whether either side quantized or evicted a token yet (what the eager stores would say)."""
        return any(side.demoted for side in self.sides())

    def nbytes(self) -> int:
        """Bytes of what the ring adds on the device: biases, slot index, value rows."""
        tensors = (self.slot_index, self.ring_bias, self.packed_bias, self.value_rows)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def held_positions(self) -> list[int]:
        """Positions in a ring slot (full precision or staging on either side): the eager order
        when aligned, ascending when paired."""
        if not self.paired:
            return torch.cat([self.keys.fp_pos, self.keys.staging_pos]).tolist()
        return sorted({p for s in self.sides() for p in torch.cat([s.fp_pos, s.staging_pos]).tolist()})

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.keys.block) * self.keys.block

    def start(self, keys: TensorStore, values: TensorStore, batch: int, device: torch.device) -> None:
        """Take over the bookkeeping of the eager stores after their multi-token steps: the held
        tokens take ring slots ``0..m-1`` in :meth:`held_positions` order."""
        if self.max_cache_len is not None and keys.length > self.max_cache_len:
            raise NotSupportedError(f"a prompt of {keys.length} tokens exceeds max_cache_len={self.max_cache_len}")
        self.keys, self.values = keys.positions, values.positions
        if not self.paired and self.values is not self.keys:
            raise RuntimeError("stores retained alike book on one shared Positions (see share_positions)")
        self.length = self.keys.length
        held = self.held_positions()
        if len(held) >= self.slots:
            raise RuntimeError(f"{len(held)} held tokens do not fit {self.slots} ring slots")
        packed = max(len(side.packed_pos) for side in self.sides())
        limit = self.max_cache_len if self.max_cache_len is not None else packed + max(self.headroom, self.length // 8)
        self.capacity = self._blocks(limit)
        self.slot_of = {p: s for s, p in enumerate(held)}
        self.free = list(range(self.slots - 1, len(held) - 1, -1))
        self.ring_bias = torch.full((batch, self.slots), float("-inf"), dtype=torch.float32, device=device)
        self.ring_bias[:, : len(held)] = 0.0
        self.packed_bias = torch.full((batch, self.capacity), float("-inf"), dtype=torch.float32, device=device)
        if self.paired:
            self.value_rows = torch.full((self.capacity,), -1, dtype=torch.int32, device=device)
            self._pair()
        else:
            self.packed_bias[:, :packed] = 0.0
        self.slot_index = torch.zeros(1, dtype=torch.int64, device=device)
        self._take_next_slot()

    def grow(self, tokens: int) -> int:
        """Room for at least ``tokens`` packed tokens a side (at least :attr:`growth` more than
        the capacity, and :attr:`headroom`); returns it."""
        capacity = self._blocks(max(tokens, self.capacity + max(self.headroom, int(self.growth * self.capacity))))
        bias = self.packed_bias.new_full((self.packed_bias.shape[0], capacity), float("-inf"))
        bias[:, : self.capacity].copy_(self.packed_bias)
        self.packed_bias = bias
        if self.value_rows is not None:
            rows = self.value_rows.new_full((capacity,), -1)
            rows[: self.capacity].copy_(self.value_rows)
            self.value_rows = rows
        self.capacity = capacity
        return capacity

    def slots_of(self, positions: torch.Tensor | list[int]) -> list[int]:
        """The ring slot of each of ``positions`` (held ones)."""
        if isinstance(positions, torch.Tensor):
            positions = positions.tolist()
        return [self.slot_of[p] for p in positions]

    def _check_room(self) -> None:
        if self.max_cache_len is not None and self.length + 1 > self.max_cache_len:
            raise NotSupportedError(
                f"decoding past max_cache_len={self.max_cache_len} tokens: build the cache with a larger max_cache_len"
            )

    def book(self) -> Booking:
        """After a decode step wrote position :attr:`length` into :attr:`next_slot`: book it
        on every side (or take the move another schedule booked); say what leaves."""
        self._check_room()
        self.slot_of[self.length] = self.next_slot
        moves = [side.step(self.length, 1) for side in self.sides()]
        self.length += 1
        if not any(move.ready or (move.evict and move.left) for move in moves):
            return NOTHING_LEFT  # every held token stays in a slot (most steps)
        held = set(self.held_positions())
        device = self.ring_bias.device
        packings = []
        for side, move in zip(self.sides(), moves, strict=True):
            offset = len(side.packed_pos) - move.ready
            packed = side.packed_pos[offset:].tolist()
            if not packed:
                packings.append(NOTHING_PACKED)
                continue
            slots = [self.slot_of[p] for p in packed]
            stay = [i for i, p in enumerate(packed) if p in held]
            stay_index = (indices_to(stay, device), indices_to([slots[i] for i in stay], device)) if stay else ()
            packings.append(SidePacking(slots, offset, indices_to(slots, device), *stay_index))
        freed = [self.slot_of.pop(p) for p in [p for p in self.slot_of if p not in held]]
        return Booking(packings[0], packings[-1], freed)

    def commit(self, booking: Booking) -> None:
        """After the layers packed what ``booking`` says: open the packed keys now attended,
        free the slots, choose the next token's slot."""
        if self.paired:
            if booking.keys.slots or booking.values.slots:
                self._pair()
        elif booking.keys.slots:
            self.packed_bias[:, booking.keys.offset : booking.keys.packed_through] = 0.0
        if booking.freed:
            self.ring_bias.index_fill_(1, indices_to(booking.freed, self.ring_bias.device), float("-inf"))
            self.free.extend(booking.freed)
        self._take_next_slot()

    def _pair(self) -> None:
        """Pair each packed key with its packed value row (the eager executors' pairing), and
        open the packed keys that have one."""
        rows = PackedPairing.of(self.keys, self.values).value_rows
        n = len(rows)
        if n:
            rows = to_device(rows.to(torch.int32), self.value_rows.device)
            self.value_rows[:n].copy_(rows)
            self.packed_bias[:, :n] = torch.where(rows >= 0, 0.0, float("-inf"))

    def _take_next_slot(self) -> None:
        if not self.free:
            raise RuntimeError("the ring has no free slot: its size is below the policy's budget plus a block")
        self.next_slot = self.free.pop()
        self.ring_bias[:, self.next_slot] = 0.0  # the next step writes it before attending
        self.slot_index.fill_(self.next_slot)


def schedule_for(keys: TensorStore, values: TensorStore, max_cache_len: int | None) -> RingSchedule:
    """The schedule of a layer whose stores are ``keys`` and ``values``, with its ring size:
    the most full-precision tokens the policy holds plus a packing block being staged and the
    next token (and, for keys and values retained differently, both sides' budgets and
    blocks: a slot per position either side of which is not packed), never more than a
    declared ``max_cache_len`` can use."""
    paired = not aligned(keys, values)
    budget = keys.unbound_selector.budget
    if paired:
        slots = budget + values.unbound_selector.budget + keys.block + values.block + 1
    else:
        slots = budget + keys.block + 1 if budget is not None else max_cache_len + 1
    if max_cache_len is not None:
        slots = min(slots, max_cache_len + 1)
    return RingSchedule(slots, max_cache_len, paired)
