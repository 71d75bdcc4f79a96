"""Pairing keys with values stored in different orders (``kvpolicy.pairing``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpolicy.executors import pairing
from kvpolicy.executors.pairing import pair_regions
from kvpolicy.policy import Policy

RETAIN = {
    "window4": [{"type": "window", "size": 4}],
    "window9": [{"type": "window", "size": 9}],
    "log3": [{"type": "log", "window": 3}],
    "sink_window": [{"type": "sink", "size": 2}, {"type": "window", "size": 5}],
}


def layer_of(key_retain: str, value_retain: str, group: int):
    def side(retain, axis):
        return {"retain": RETAIN[retain], "quant": {"bits": 2, "group_size": group, "axis": axis}}

    policy = Policy.from_dict({"name": "p", "keys": side(key_retain, "channel"), "values": side(value_retain, "token")})
    return policy.new_layer(head_dim=8)


def by_position(view):
    """``{position: [B, H, D] tensor}`` of everything a view holds, dequantized."""
    tensor, positions = view.materialize()
    return {int(p): tensor[:, :, i] for i, p in enumerate(positions)}


@settings(max_examples=60, deadline=None)
@given(
    key_retain=st.sampled_from(sorted(RETAIN)),
    value_retain=st.sampled_from(sorted(RETAIN)),
    group=st.sampled_from([4, 8]),
    prefill=st.integers(1, 30),
    steps=st.lists(st.integers(1, 3), min_size=1, max_size=25),
    seed=st.integers(0, 2**16),
)
def test_every_cached_token_is_attended_once_with_its_own_key_and_value(
    key_retain, value_retain, group, prefill, steps, seed
):
    g = torch.Generator().manual_seed(seed)
    layer = layer_of(key_retain, value_retain, group)
    for q in [prefill, *steps]:
        step = layer.update(*torch.randn(2, 2, 3, q, 8, generator=g))[0]._kvpolicy_step[0]
        regions = pair_regions(step.keys, step.values, step.aligned)
        keys, values = by_position(step.keys), by_position(step.values)
        seen = regions.full_precision_pos.tolist()
        # gathered pairs: each token's own key and value, exactly as stored (dequantized if packed)
        offset = 0
        for k, v in regions.full_precision:
            for i in range(k.shape[2]):
                position = seen[offset + i]
                assert torch.equal(k[:, :, i], keys[position]) and torch.equal(v[:, :, i], values[position])
            offset += k.shape[2]
        assert offset == len(seen)
        if regions.packed_keys is not None:
            key_positions = regions.packed_pos
            if regions.value_rows is None:
                value_positions, paired = step.values.packed_pos, torch.ones(len(key_positions), dtype=torch.bool)
            else:
                paired = regions.value_rows >= 0
                value_positions = step.values.packed_pos[regions.value_rows[paired]]
            assert torch.equal(key_positions[paired], value_positions)
            seen += key_positions[paired].tolist()
        # every cached position exactly once
        assert sorted(seen) == sorted(keys)
        if key_retain == value_retain:  # nothing to gather: the stores' own regions
            assert regions.value_rows is None and regions.packed_keys is step.keys.packed


def test_equal_retention_passes_the_stores_tensors_through():
    layer = layer_of("window4", "window4", 4)
    layer.update(*torch.randn(2, 1, 2, 20, 8))
    step = layer.update(*torch.randn(2, 1, 2, 1, 8))[0]._kvpolicy_step[0]
    regions = pair_regions(step.keys, step.values, step.aligned)
    assert regions.value_rows is None and regions.packed_keys is step.keys.packed
    assert regions.full_precision[0][0] is step.keys.fp and regions.full_precision[0][1] is step.values.fp


@pytest.mark.parametrize("pattern", ["runs", "scattered"])
def test_gather_takes_runs_as_slices_and_scattered_slots_by_index(pattern):
    """Runs of consecutive slots (across region boundaries too) come back as slices; more
    runs than ``MAX_RUNS`` are gathered by index. Either way: the tokens at those slots."""
    layer = layer_of("window9", "window9", 4)
    layer.update(*torch.randn(2, 1, 2, 30, 8))
    step = layer.update(*torch.randn(2, 1, 2, 1, 8))[0]._kvpolicy_step[0]
    view = step.keys
    tensor, _ = view.materialize()  # region order: full precision, staging, packed
    n = tensor.shape[2]
    if pattern == "runs":  # a packed run, then the staging/full-precision boundary, then the start
        slots = torch.cat([torch.arange(n - 6, n - 2), torch.arange(5, 12), torch.arange(0, 3)])
    else:
        slots = torch.arange(n - 1, -1, -2)
    assert (len(torch.diff(slots).ne(1).nonzero()) >= pairing.MAX_RUNS) == (pattern == "scattered")
    assert torch.equal(pairing.gather(view, slots), tensor[:, :, slots])
