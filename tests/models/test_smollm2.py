"""End to end on the embedded SmolLM2-135M-Instruct (real weights, CPU, float32)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import kvpolicy

pytestmark = pytest.mark.model

LICENSE = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "LICENSE.txt"


def real_text(chars: int) -> str:
    """Real English prose shipped with the Python installation."""
    if LICENSE.exists():
        return LICENSE.read_text()[:chars]
    import json

    return (json.__doc__ * 20)[:chars]


PROMPTS = [
    real_text(1100),
    "Write a short poem about the sea, the wind and a lighthouse keeper who waits.",
    "def fibonacci(n):",
]


def chat(tokenizer, prompt: str) -> str:
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def batch(tokenizer, prompts):
    return tokenizer([chat(tokenizer, p) for p in prompts], return_tensors="pt", padding=True)


def greedy(model, inputs, cache, n):
    with torch.no_grad():
        return model.generate(**inputs, past_key_values=cache, max_new_tokens=n, do_sample=False)


def test_full_policy_equals_dynamic_cache(smollm):
    model, tokenizer = smollm
    inputs = batch(tokenizer, PROMPTS)
    assert inputs["attention_mask"].min() == 0  # really left-padded
    expected = greedy(model, inputs, DynamicCache(config=model.config), 64)
    got = greedy(model, inputs, kvpolicy.load_policy("full").make_cache(model), 64)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "name", ["kivi", "logquant", "partial_logquant", "streaming", "sink_kivi", "logquant_rot", "logquant_mixed"]
)
def test_every_policy_generates_and_compresses(smollm, name):
    model, tokenizer = smollm
    inputs = batch(tokenizer, [real_text(1500)])
    cache = kvpolicy.load_policy(name).make_cache(model)
    out = greedy(model, inputs, cache, 16)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(out[0]) == inputs["input_ids"].shape[1] + 16 and text.strip()
    report = cache.memory()
    assert report.tokens == inputs["input_ids"].shape[1] + 15
    assert report.bytes_by_region["full_precision"] > 0
    own_dtype_bytes = report.baseline_16bit_bytes * model.dtype.itemsize // 2  # a float32 DynamicCache
    assert report.total_bytes < 0.5 * own_dtype_bytes, report.summary()
    if name == "streaming":
        assert report.bytes_by_region["codes"] == 0
    else:
        assert report.bytes_by_region["codes"] > 0
