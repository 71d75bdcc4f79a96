"""Retention matrices come from the real stores and agree with the selectors."""

from __future__ import annotations

import numpy as np

from kvpolicy import Policy, load_policy
from kvpolicy.tools.retention import EVICTED, FULL, QUANTIZED, STAGED, UNSEEN, retention_matrix


def test_logquant_matrix_matches_its_selector():
    policy = load_policy("logquant")
    mats = retention_matrix(policy, steps=300)
    selector = policy.new_layer(head_dim=64).key_store.selector
    for step in (0, 100, 299):
        row = mats["keys"][step]
        length = step + 1
        assert (row[length:] == UNSEEN).all()
        assert set(np.flatnonzero(row == FULL)) == set(selector.keep(length).tolist())
        assert set(np.unique(row[:length])) <= {FULL, STAGED, QUANTIZED}


def test_streaming_matrix_evicts_and_never_quantizes():
    mats = retention_matrix(load_policy("streaming"), steps=200)
    last = mats["values"][-1]
    assert (last == FULL).sum() == 128 and (last == EVICTED).sum() == 200 - 128
    assert not (last == QUANTIZED).any()


def test_partial_logquant_keys_and_values_differ():
    mats = retention_matrix(load_policy("partial_logquant"), steps=300)
    assert (mats["keys"][-1] == FULL).sum() > (mats["values"][-1] == FULL).sum() == 64


def test_a_quantized_position_stays_quantized_in_later_rows():
    mats = retention_matrix(
        Policy.from_dict(
            {
                "name": "k",
                "keys": {"retain": [{"type": "window", "size": 16}], "quant": {"group_size": 8, "axis": "channel"}},
                "values": {"retain": [{"type": "window", "size": 16}], "quant": {"group_size": 8}},
            }
        ),
        steps=100,
    )
    for name in ("keys", "values"):
        quantized = mats[name] == QUANTIZED
        assert (quantized[1:] >= quantized[:-1]).all()
