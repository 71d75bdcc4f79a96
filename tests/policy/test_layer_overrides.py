"""Per-layer precision: a policy's `layers` section changes keys/values on the layers it names."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvpolicy import Policy
from kvpolicy.errors import ConfigError
from kvpolicy.quantizers.native import NativePacked
from tests.cache.test_cache import greedy, left_padded_batch
from tests.conftest import tiny_llama

SIXTEEN_BIT_ENDS = {"at": [0, -1], "keys": {"retain": [{"type": "all"}]}, "values": {"retain": [{"type": "all"}]}}


def _kivi(*layers, **changes) -> Policy:
    data = Policy.load("kivi").to_dict()
    for side in ("keys", "values"):
        data[side]["retain"] = [{"type": "window", "size": 16}]
    return Policy.from_dict({**data, "layers": list(layers), **changes})


def test_named_layers_take_their_settings_and_the_others_the_policys():
    model = tiny_llama(layers=4)
    four_bit_keys = {"at": [1], "keys": {"quant": {"bits": 4}}}
    cache = _kivi(SIXTEEN_BIT_ENDS, four_bit_keys).make_cache(model)
    greedy(model, left_padded_batch([80]), cache, n=4)
    packed_bits = [
        layer.key_store.packed.bits if layer.key_store.packed is not None else None for layer in cache.layers
    ]
    assert packed_bits == [None, 4, 2, None]  # 16-bit ends hold nothing packed
    assert isinstance(cache.layers[2].value_store.packed, NativePacked)
    assert cache.layers[1].value_store.packed.bits == 2  # only keys changed on layer 1
    report = cache.memory()
    held = [sum(layer.nbytes().values()) for layer in cache.layers]
    bookkeeping = {id(s.positions): s.positions for layer in cache.layers for s in layer.stores()}  # shared
    assert report.total_bytes == sum(held) + sum(p.nbytes() for p in bookkeeping.values())
    assert held[0] > held[1] > held[2]  # 16-bit > 4-bit keys > 2-bit


def test_sixteen_bit_layers_everywhere_equal_dynamic_cache():
    model = tiny_llama(layers=2)
    inputs = left_padded_batch([70, 30])
    every = {**SIXTEEN_BIT_ENDS, "at": [0, 1]}
    expected = greedy(model, inputs, DynamicCache(config=model.config), n=20)
    assert torch.equal(greedy(model, inputs, _kivi(every).make_cache(model), n=20), expected)


def test_the_section_round_trips_and_is_shown(capsys):

    policy = _kivi(SIXTEEN_BIT_ENDS)
    assert Policy.from_dict(policy.to_dict()).config == policy.config
    assert policy.to_dict()["layers"] == [SIXTEEN_BIT_ENDS]


@pytest.mark.parametrize(
    ("layers", "field", "allowed"),
    [
        ([{"at": [], "keys": {"quant": {"bits": 4}}}], "layers[0].at", "non-empty list of layer indices"),
        ([{"at": [0], "keys": {"quant": {"bits": 5}}}], "layers[0].keys.quant.bits", "2 | 3 | 4 | 8"),
        ([{"at": [0], "keys": {"quant": {"bitz": 4}}}], "layers[0].keys.quant.bitz", "one of the keys"),
        ([{"at": [0], "keys": {"retian": []}}], "layers[0].keys.retian", "one of the keys"),
        ([{"at": [0]}], "layers[0]", "a 'keys' and/or 'values' section"),
        ([{"at": [0], "values": {"demote": "evict"}}], "layers[0].values.demote", "eviction must apply"),
    ],
)
def test_a_bad_override_names_its_field(layers, field, allowed):
    with pytest.raises(ConfigError) as err:
        _kivi(*layers)
    assert err.value.field == field and allowed in str(err.value)


def test_an_index_outside_the_model_is_refused_before_the_model_is_touched():
    model = tiny_llama(layers=2)
    policy = _kivi({"at": [0, 5], "keys": {"quant": {"bits": 4}}})
    with pytest.raises(ConfigError, match=r"layers\[0\].at: got 5.*a layer index of this model: -2 .. 1"):
        policy.make_cache(model)
    assert model.config._attn_implementation == "sdpa"
