"""End to end on the embedded Gemma 3 270M (real weights, CPU, float32): a hybrid model whose
18 layers are 15 sliding-window layers of 512 tokens and 3 global layers."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvpolicy
from kvpolicy.cache.sliding import SlidingWindowLayer
from tests.models.test_smollm2 import real_text

pytestmark = pytest.mark.model

SHIPPED = ["full", "kivi", "sink_kivi", "logquant", "partial_logquant", "streaming", "logquant_rot", "logquant_mixed"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def gemma3():
    from kvpolicy.models import load_default_model

    return load_default_model(dtype=torch.float32, name="gemma3-270m")


@pytest.fixture(scope="module")
def long_prompt(gemma3):
    """About 2,000 tokens of real prose: four times the sliding window."""
    _, tokenizer = gemma3
    inputs = tokenizer(real_text(9000), return_tensors="pt")
    assert 1800 <= inputs["input_ids"].shape[1] <= 2600
    return inputs


def _generate(model, inputs, cache):
    with torch.no_grad():
        return model.generate(**inputs, cache=cache, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)  # fmt: skip


def test_the_layers_are_hybrid(gemma3):
    model, _ = gemma3
    cache = kvpolicy.load_policy("logquant").make_cache(model)
    kinds = ["window" if isinstance(layer, SlidingWindowLayer) else "policy" for layer in cache.layers]
    assert kinds == (["window"] * 5 + ["policy"]) * 3
    assert all(layer.sliding_window == 512 for layer in cache.layers if isinstance(layer, SlidingWindowLayer))


def test_full_policy_equals_dynamic_cache(gemma3, long_prompt):
    model, _ = gemma3
    expected = _generate(model, long_prompt, DynamicCache(config=model.config))
    got = _generate(model, long_prompt, kvpolicy.load_policy("full").make_cache(model))
    assert torch.equal(got.sequences, expected.sequences)
    assert torch.equal(torch.stack(got.logits), torch.stack(expected.logits))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_policy_generates_and_reports_its_true_bytes(gemma3, long_prompt, name):
    model, tokenizer = gemma3
    cache = kvpolicy.load_policy(name).make_cache(model)
    out = _generate(model, long_prompt, cache)
    prompt = long_prompt["input_ids"].shape[1]
    assert tokenizer.decode(out.sequences[0, prompt:], skip_special_tokens=True).strip()
    report = cache.memory()
    assert report.tokens == prompt + NEW_TOKENS - 1
    # every tensor the cache holds, counted from the layers themselves
    held = 0
    for layer in cache.layers:
        if isinstance(layer, SlidingWindowLayer):
            assert layer.keys.shape == (1, 1, 511, 256)
            held += 2 * layer.keys.numel() * 4
        else:
            held += sum(sum(store.nbytes().values()) for store in (layer.key_store, layer.value_store))
            held += layer.executor.nbytes()  # memos of dequantized tokens (partial_logquant's values)
    rotations = {id(m): m for layer in cache.layers if hasattr(layer, "rotations") for m in layer.rotations()}
    held += sum(m.numel() * m.element_size() for m in rotations.values())  # shared: counted once
    bookkeeping = {id(s.positions): s.positions for layer in cache.layers if hasattr(layer, "stores")
                   for s in layer.stores()}  # fmt: skip
    held += sum(p.nbytes() for p in bookkeeping.values())  # positions, shared by a schedule's stores: once
    assert report.total_bytes == held
    assert report.bytes_by_region["sliding_window"] == 15 * 2 * 511 * 256 * 4
    # what a float32 DynamicCache holds for the same tokens: windows for 15 layers, everything for 3
    assert report.dynamic_cache_bytes == (15 * 511 + 3 * report.tokens) * 2 * 256 * 4
    if name == "full":
        assert report.total_bytes > report.dynamic_cache_bytes
    else:
        assert report.total_bytes < report.dynamic_cache_bytes
        assert "sliding-window layers" in report.summary()
