"""Host bookkeeping of a static cache: which position sits in which ring slot, and what
leaves the full-precision set at each decode step.

A :class:`RingSchedule` is shared by the layers of one retention schedule
(:mod:`kvpolicy.graphs.static_cache`). Which positions stay, stage, pack or leave is decided
by the eager stores' own bookkeeping, the :class:`~kvpolicy.store.positions.Positions` object
they share, handed over by reference at adoption: the static layers hold exactly the tokens
eager decoding holds. The schedule adds what a ring needs (which slot holds which position)
and after each step says, as a :class:`Booking`, which ring slots the layers pack and which
they free. A :class:`PairedRingSchedule` does the same for keys and values retained
differently.
"""

from __future__ import annotations

import attrs
import torch

from kvpolicy.errors import NotSupportedError
from kvpolicy.store import TensorStore, aligned
from kvpolicy.store.positions import Positions
from kvpolicy.transfer import indices_to


@attrs.frozen
class Booking:
    """What one step changed: ``packed_slots``, the ring slots to quantize (in packing order) at
    packed offset ``offset``, and ``packed_index``, the same slots on the device (one upload for
    every layer); ``freed`` ring slots (packed or evicted)."""

    packed_slots: list[int]
    offset: int
    freed: list[int]
    packed_index: torch.Tensor | None = None

    @property
    def packed_through(self) -> int:
        """Packed tokens the buffers hold once this booking is applied."""
        return self.offset + len(self.packed_slots)


NOTHING_LEFT = Booking([], 0, [])


class RingSchedule:
    """Host bookkeeping shared by the layers of one retention schedule: which position sits in
    which ring slot, and what leaves the full-precision set at each step (decided by the eager
    stores' :class:`~kvpolicy.store.positions.Positions`, :attr:`keys` and :attr:`values`, taken
    by reference at :meth:`start`; one object when both sides are retained alike).

    ``max_cache_len``: the declared limit (the packed buffers hold that many tokens, and
    decoding past it is refused), or ``None``: buffers sized at adoption and grown on demand.
    """

    #: packed tokens a schedule without ``max_cache_len`` makes room for beyond the prompt's
    #: (at least; an eighth of the length for a long one) before its first growth
    headroom = 256

    def sides(self) -> tuple[Positions, ...]:
        """The bookkeeping this schedule books each step on (keys', or keys' and values')."""
        return (self.keys,)

    @property
    def demoted(self) -> bool:
        """Whether either side quantized or evicted a token yet (what the eager stores would say)."""
        return any(side.demoted for side in self.sides())

    def nbytes(self) -> int:
        """Bytes of what a ring adds to the bookkeeping: the biases and slot index on the device
        (the positions are the eager stores', counted with them)."""
        tensors = (self.slot_index, self.ring_bias, self.packed_bias)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def __init__(self, slots: int, max_cache_len: int | None):
        #: the eager stores' bookkeeping of keys and of values, set by :meth:`start`
        self.keys: Positions | None = None
        self.values: Positions | None = None
        #: tokens this schedule has booked (its positions may be a step ahead, booked by another schedule)
        self.booked = 0
        self.slots = slots
        self.max_cache_len = max_cache_len
        #: packed tokens the buffers hold (whole packing blocks), set by :meth:`start`
        self.capacity = 0
        self.slot_of: dict[int, int] = {}
        self.free: list[int] = []
        self.next_slot = -1
        self.slot_index: torch.Tensor | None = None  # int64 [1] on the device: the next token's slot
        self.ring_bias: torch.Tensor | None = None  # float32 [B, slots]
        self.packed_bias: torch.Tensor | None = None  # float32 [B, capacity]

    @property
    def length(self) -> int:
        return self.booked

    def held_positions(self) -> list[int]:
        """Positions in full precision (kept, then staged), as the eager store orders them."""
        return torch.cat([self.keys.fp_pos, self.keys.staging_pos]).tolist()

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.keys.block) * self.keys.block

    def start(self, keys: TensorStore, values: TensorStore, batch: int, device: torch.device) -> None:
        """Take over the bookkeeping of the eager stores after their multi-token steps (one
        object for both sides here; two for a :class:`PairedRingSchedule`): the held tokens take
        ring slots ``0..m-1`` in :meth:`held_positions` order."""
        if self.max_cache_len is not None and keys.length > self.max_cache_len:
            raise NotSupportedError(f"a prompt of {keys.length} tokens exceeds max_cache_len={self.max_cache_len}")
        self.keys, self.values = keys.positions, values.positions
        if len(self.sides()) == 1 and self.values is not self.keys:
            raise RuntimeError("stores retained alike book on one shared Positions (see share_positions)")
        store = self.keys
        self.booked = store.length
        held = self.held_positions()
        if len(held) >= self.slots:
            raise RuntimeError(f"{len(held)} held tokens do not fit {self.slots} ring slots")
        packed = len(store.packed_pos)
        limit = self.max_cache_len if self.max_cache_len is not None else packed + max(self.headroom, store.length // 8)
        self.capacity = self._blocks(limit)
        self.slot_of = {p: s for s, p in enumerate(held)}
        self.free = list(range(self.slots - 1, len(held) - 1, -1))
        self.ring_bias = torch.full((batch, self.slots), float("-inf"), dtype=torch.float32, device=device)
        self.ring_bias[:, : len(held)] = 0.0
        self.packed_bias = torch.full((batch, self.capacity), float("-inf"), dtype=torch.float32, device=device)
        self.packed_bias[:, :packed] = 0.0
        self.slot_index = torch.zeros(1, dtype=torch.int64, device=device)
        self._take_next_slot()

    def grow(self, tokens: int) -> int:
        """Room for at least ``tokens`` packed tokens (at least double the capacity); returns it."""
        capacity = self._blocks(max(tokens, 2 * self.capacity))
        bias = torch.full((self.packed_bias.shape[0], capacity), float("-inf"), dtype=torch.float32,
                          device=self.packed_bias.device)  # fmt: skip
        bias[:, : self.capacity].copy_(self.packed_bias)
        self.packed_bias, self.capacity = bias, capacity
        return capacity

    def slots_of(self, positions: torch.Tensor | list[int]) -> list[int]:
        """The ring slot of each of ``positions`` (held ones)."""
        if isinstance(positions, torch.Tensor):
            positions = positions.tolist()
        return [self.slot_of[p] for p in positions]

    def _advance(self) -> list[int]:
        """Book the step's token on every side (or take the move another schedule booked);
        returns each side's packed tokens before it."""
        moves = [side.step(self.booked, 1) for side in self.sides()]
        self.booked += 1
        return [len(side.packed_pos) - move.ready for side, move in zip(self.sides(), moves, strict=True)]

    def _check_room(self) -> None:
        if self.max_cache_len is not None and self.length + 1 > self.max_cache_len:
            raise NotSupportedError(
                f"decoding past max_cache_len={self.max_cache_len} tokens: build the cache with a larger max_cache_len"
            )

    def book(self) -> Booking:
        """After a decode step wrote position ``length`` into :attr:`next_slot`: what leaves."""
        self._check_room()
        self.slot_of[self.length] = self.next_slot
        (packed_before,) = self._advance()
        if len(self.keys.fp_pos) + len(self.keys.staging_pos) == len(self.slot_of):
            return NOTHING_LEFT  # every held token stays in full precision (most steps)
        held = set(self.held_positions())
        packed = self.keys.packed_pos[packed_before:].tolist()
        packed_slots = [self.slot_of[p] for p in packed]
        freed = [self.slot_of.pop(p) for p in [p for p in self.slot_of if p not in held]]
        index = indices_to(packed_slots, self.ring_bias.device) if packed_slots else None
        return Booking(packed_slots, packed_before, freed, index)

    def commit(self, booking: Booking) -> None:
        """After the layers packed what ``booking`` says: open the packed block, free the
        slots, choose the next token's slot."""
        if booking.packed_slots:
            stop = booking.offset + len(booking.packed_slots)
            self.packed_bias[:, booking.offset : stop] = 0.0
        if booking.freed:
            self.ring_bias.index_fill_(1, indices_to(booking.freed, self.ring_bias.device), float("-inf"))
            self.free.extend(booking.freed)
        self._take_next_slot()

    def _take_next_slot(self) -> None:
        if not self.free:
            raise RuntimeError("the ring has no free slot: its size is below the policy's budget plus a block")
        self.next_slot = self.free.pop()
        self.ring_bias[:, self.next_slot] = 0.0  # the next step writes it before attending
        self.slot_index.fill_(self.next_slot)


@attrs.frozen
class PairedBooking:
    """What one step of a :class:`PairedRingSchedule` changed, as host lists and their device
    copies (``index``: one upload for every layer).

    ``key_slots``: ring slots whose keys are packed, at key offsets ``key_offset..``;
    ``dequantized_keys``: indices into ``key_slots`` whose value is not packed (their ring key
    becomes the packed key's dequantized value); ``value_slots``: ring slots whose values are
    packed, each to packed row ``value_rows[i]`` (its key's offset) or, where that is ``-1``
    (its key is not packed), to the pending row of its slot (and its ring value becomes the
    dequantized row); ``settled``: ``(slot, key offset)`` pairs whose pending value row moves
    into the packed region; ``opened``: key offsets both of whose sides are now packed;
    ``freed``: their ring slots."""

    key_slots: list[int]
    key_offset: int
    dequantized_keys: list[int]
    value_slots: list[int]
    value_rows: list[int]
    settled: list[tuple[int, int]]
    opened: list[int]
    freed: list[int]
    index: dict[str, torch.Tensor] = attrs.field(factory=dict)

    @property
    def packed_through(self) -> int:
        """Packed keys (and value rows) the buffers hold once this booking is applied."""
        return self.key_offset + len(self.key_slots)


class PairedRingSchedule(RingSchedule):
    """A :class:`RingSchedule` for keys and values retained differently (PartialLogQuant: log
    retention for keys, a window for values).

    A ring slot holds a position while either side of it is not packed: its key in full
    precision (or, once the key is packed, its dequantized value) and likewise its value. The
    packed key region is the eager key store's, in its order; the packed value region is
    indexed by key offset (values are quantized per token, so a row can sit anywhere), so the
    replayed step reads packed key ``i`` with packed value row ``i``, exactly as for aligned
    stores, and ``packed_bias`` opens key ``i`` once its value is packed too. A value packed
    before its key waits in a pending row of its slot.
    """

    def __init__(self, slots: int, max_cache_len: int | None):
        super().__init__(slots, max_cache_len)
        #: packed key offset of each position in a slot whose key is packed
        self.key_offset: dict[int, int] = {}
        #: positions in a slot whose value is packed (in a pending row) and key is not
        self.pending: set[int] = set()

    def sides(self) -> tuple[Positions, ...]:
        return (self.keys, self.values)

    def held_positions(self) -> list[int]:
        """Positions in a ring slot (either side not packed), in slot order at adoption."""
        return sorted({p for s in self.sides() for p in torch.cat([s.fp_pos, s.staging_pos]).tolist()})

    def start(self, keys: TensorStore, values: TensorStore, batch: int, device: torch.device) -> None:
        """Take over the bookkeeping of both eager stores (see :meth:`RingSchedule.start`)."""
        super().start(keys, values, batch, device)  # slots: held_positions() in order
        key_index = {p: i for i, p in enumerate(self.keys.packed_pos.tolist())}
        value_packed = set(self.values.packed_pos.tolist())
        self.key_offset = {p: key_index[p] for p in self.slot_of if p in key_index}
        self.pending = {p for p in self.slot_of if p in value_packed}
        self.packed_bias.fill_(float("-inf"))
        both = [i for p, i in key_index.items() if p in value_packed]
        if both:
            self.packed_bias.index_fill_(1, indices_to(both, device), 0.0)

    def book(self) -> PairedBooking | Booking:
        self._check_room()
        self.slot_of[self.length] = self.next_slot
        keys_before, values_before = self._advance()
        new_keys = self.keys.packed_pos[keys_before:].tolist()
        new_values = self.values.packed_pos[values_before:].tolist()
        if not new_keys and not new_values:
            return NOTHING_LEFT  # only staging moved (most steps)
        for i, p in enumerate(new_keys):
            self.key_offset[p] = keys_before + i
        settled, opened, freed, dequantized = [], [], [], []
        just_packed = set(new_values)

        def settle(p: int) -> None:
            opened.append(self.key_offset.pop(p))
            freed.append(self.slot_of.pop(p))
            self.pending.discard(p)

        key_slots = [self.slot_of[p] for p in new_keys]
        value_slots = [self.slot_of[p] for p in new_values]
        value_rows = [self.key_offset.get(p, -1) for p in new_values]
        for i, p in enumerate(new_keys):
            if p in self.pending:  # its value was packed before: the pending row moves in
                settled.append((self.slot_of[p], self.key_offset[p]))
                settle(p)
            elif p not in just_packed:
                dequantized.append(i)
        for p, row in zip(new_values, value_rows, strict=True):
            if row >= 0:
                settle(p)
            else:
                self.pending.add(p)
        index = {
            name: indices_to(values, self.ring_bias.device)
            for name, values in (
                ("key_slots", key_slots),
                ("dequantized_keys", dequantized),
                ("dequantized_key_slots", [key_slots[i] for i in dequantized]),
                ("value_slots", value_slots),
                ("direct", [i for i, r in enumerate(value_rows) if r >= 0]),
                ("direct_rows", [r for r in value_rows if r >= 0]),
                ("pending", [i for i, r in enumerate(value_rows) if r < 0]),
                ("pending_slots", [s for s, r in zip(value_slots, value_rows, strict=True) if r < 0]),
                ("settled_slots", [s for s, _ in settled]),
                ("settled_rows", [r for _, r in settled]),
            )
            if values
        }
        return PairedBooking(
            key_slots, keys_before, dequantized, value_slots, value_rows, settled, opened, freed, index
        )

    def commit(self, booking) -> None:
        if isinstance(booking, PairedBooking):
            if booking.opened:
                self.packed_bias.index_fill_(1, indices_to(booking.opened, self.ring_bias.device), 0.0)
            booking = Booking([], 0, booking.freed)
        super().commit(booking)


def schedule_for(keys: TensorStore, values: TensorStore, max_cache_len: int | None) -> RingSchedule:
    """The schedule of a layer whose stores are ``keys`` and ``values``, with its ring size:
    the most full-precision tokens the policy holds plus a packing block being staged and the
    next token (and, for keys and values retained differently, both sides' budgets and
    blocks: a slot per position either side of which is not packed), never more than a
    declared ``max_cache_len`` can use."""
    budget = keys.unbound_selector.budget
    if not aligned(keys, values):
        slots = budget + values.unbound_selector.budget + keys.block + values.block + 1
    else:
        slots = budget + keys.block + 1 if budget is not None else max_cache_len + 1
    if max_cache_len is not None:
        slots = min(slots, max_cache_len + 1)
    if not aligned(keys, values):
        return PairedRingSchedule(slots, max_cache_len)
    return RingSchedule(slots, max_cache_len)
