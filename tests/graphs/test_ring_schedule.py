"""Property tests of the ring schedules (``kvpolicy.graphs.ring_schedule``): the host bookkeeping of
the CUDA-graph cache, replayed next to the eager stores for random prompts and step counts.

After every step: the schedule books on the eager stores' own bookkeeping object (one
:class:`~kvpolicy.store.positions.Positions`, applied by the stores and by the ring); every
cached position is attended exactly once (in a ring slot, or as a packed key whose value is
packed too, never both); the ring never overflows and its bias opens exactly the held
slots and the next one; the packed bias opens exactly the packed keys whose values are
packed (paired with the value rows the eager executors read); and a position that left
the ring never comes back (no re-promotion).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpolicy import Policy, load_policy
from kvpolicy.graphs.ring_schedule import schedule_for
from kvpolicy.store.positions import share_positions

HEAD_DIM = 64


def _keys_leave_first() -> Policy:
    """partial_logquant with the two sides' retention swapped: keys are packed first."""
    data = load_policy("partial_logquant").to_dict()
    keys, values = data["keys"], data["values"]
    return Policy.from_dict({**data, "name": "keys_leave_first", "keys": {**keys, "retain": values["retain"]},
                             "values": {**values, "retain": keys["retain"]}})  # fmt: skip


POLICIES = {name: load_policy(name) for name in ("logquant", "kivi", "partial_logquant", "sink_kivi", "streaming")}
POLICIES["keys_leave_first"] = _keys_leave_first()


def _regions(store) -> tuple[list[int], list[int]]:
    """(positions held in full precision or staging, packed positions in packing order)."""
    return torch.cat([store.fp_pos, store.staging_pos]).tolist(), store.packed_pos.tolist()


def _check(schedule, keys, values, ever_settled: set[int]) -> None:
    paired = schedule.paired
    mirrors = ((keys, schedule.keys), (values, schedule.values))
    for store, booked in mirrors:
        assert booked is store.positions and booked.length == store.length == schedule.length
    (held_k, packed_k), (held_v, packed_v) = _regions(keys), _regions(values)
    if not paired:
        assert packed_k == packed_v  # aligned stores pack the same positions in the same order
    settled = set(packed_k) & set(packed_v)
    in_ring = set(schedule.slot_of)
    cached = set(held_k) | set(packed_k) | set(held_v) | set(packed_v)
    assert in_ring.isdisjoint(settled) and in_ring | settled == cached  # each cached position once
    assert ever_settled <= settled  # no re-promotion
    ever_settled |= settled
    slots = list(schedule.slot_of.values())
    assert len(set(slots)) == len(slots) and schedule.next_slot not in slots
    assert len(slots) + 1 <= schedule.slots
    open_slots = set((schedule.ring_bias[0] == 0).nonzero().squeeze(-1).tolist())
    assert open_slots == set(slots) | {schedule.next_slot}
    offset = {p: i for i, p in enumerate(packed_k)}
    opened = set((schedule.packed_bias[0] == 0).nonzero().squeeze(-1).tolist())
    assert opened == {offset[p] for p in settled}
    if paired:  # each packed key's value row, as the eager pairing reads it
        row = {p: i for i, p in enumerate(packed_v)}
        assert schedule.value_rows[: len(packed_k)].tolist() == [row.get(p, -1) for p in packed_k]
    else:
        assert schedule.value_rows is None


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(POLICIES)),
    prefill=st.integers(1, 420),
    steps=st.integers(1, 260),
)
def test_ring_schedules_attend_every_position_once_and_never_overflow(name, prefill, steps):
    layer = POLICIES[name].new_layer(HEAD_DIM)
    keys, values = layer.key_store, layer.value_store
    share_positions([keys, values])  # as the cache does: one bookkeeping object when they are aligned
    schedule = schedule_for(keys, values, None)
    assert schedule.paired == (not layer.aligned)
    keys.append(torch.zeros(1, 1, prefill, HEAD_DIM))
    values.append(torch.zeros(1, 1, prefill, HEAD_DIM))
    schedule.start(keys, values, 1, torch.device("cpu"))
    ever_settled: set[int] = set()
    _check(schedule, keys, values, ever_settled)
    for _ in range(steps):
        keys.append(torch.zeros(1, 1, 1, HEAD_DIM))
        values.append(torch.zeros(1, 1, 1, HEAD_DIM))
        booking = schedule.book()
        if booking.packed_through > schedule.capacity:  # as StaticPolicyCache.book_step does
            schedule.grow(booking.packed_through)
        schedule.commit(booking)
        _check(schedule, keys, values, ever_settled)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_declared_limit_sizes_the_packed_buffers_once_and_is_enforced(name):
    layer = POLICIES[name].new_layer(HEAD_DIM)
    keys, values = layer.key_store, layer.value_store
    schedule = schedule_for(keys, values, 300)
    keys.append(torch.zeros(1, 1, 200, HEAD_DIM))
    values.append(torch.zeros(1, 1, 200, HEAD_DIM))
    schedule.start(keys, values, 1, torch.device("cpu"))
    capacity = schedule.capacity
    assert capacity >= 300 and capacity % keys.block == 0
    for _ in range(100):
        booking = schedule.book()
        assert booking.packed_through <= capacity
        schedule.commit(booking)
    from kvpolicy.errors import NotSupportedError

    with pytest.raises(NotSupportedError, match="past max_cache_len=300"):
        schedule.book()
