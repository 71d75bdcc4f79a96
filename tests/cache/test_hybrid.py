"""Hybrid and sliding-window models: one cache layer per ``config.layer_types`` entry.

Tiny random models of each architecture, built from their transformers config classes with a
window of 16 so that prompts of 40+ tokens run past it: `full` and a quantizing policy whose
budget exceeds the sequence equal DynamicCache exactly; a policy at a small budget serves a
left-padded batch like each row alone; models whose attention needs what kvpolicy does not
compute are refused.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import DynamicCache

import kvpolicy
from kvpolicy import Policy
from kvpolicy.cache.layers import LayerFactory, model_layers
from kvpolicy.cache.sliding import SlidingWindowLayer
from kvpolicy.errors import ConfigError, NotSupportedError, UnsupportedModelError
from kvpolicy.generation import cache_kwargs
from tests.cache.test_cache import greedy, left_padded_batch

WINDOW = 16
COMMON = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, max_position_embeddings=512, pad_token_id=0, bos_token_id=None, eos_token_id=None,
)  # fmt: skip
#: architecture -> (config class, model class, its own settings)
ARCHITECTURES = {
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(num_hidden_layers=3, sliding_window=WINDOW, layer_types=["sliding_attention", "sliding_attention",
                                                                             "full_attention"])),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_hidden_layers=2, sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(num_hidden_layers=2, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM",
                dict(num_hidden_layers=2, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])),
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM",
               dict(num_hidden_layers=2, attention_chunk_size=WINDOW, no_rope_layers=[1, 0], moe_layers=[],
                    intermediate_size_mlp=128, num_local_experts=2)),
}  # fmt: skip
#: architectures refused, and the words the refusal must say
REFUSED = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(num_hidden_layers=2, sliding_window=WINDOW), "soft-capping"),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(num_hidden_layers=2, sliding_window=WINDOW, num_local_experts=2, num_experts_per_tok=1),
                "learned attention sinks"),
}  # fmt: skip


def build(config_name: str, model_name: str, settings: dict, attention: str = "sdpa"):
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**COMMON, **settings})
    config._attn_implementation = attention
    return getattr(transformers, model_name)(config).eval()


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def hybrid(request):
    return request.param, build(*ARCHITECTURES[request.param])


def _logits(model, inputs, cache, n=12):
    out = greedy(model, inputs, cache, n=n, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def test_each_layer_type_gets_its_own_layer(hybrid):
    name, model = hybrid
    cache = Policy.load("kivi").make_cache(model)
    types = [spec.type for spec in model_layers(model)]
    assert len(cache.layers) == len(types)
    for kind, layer in zip(types, cache.layers, strict=True):
        if kind == "full_attention":
            assert isinstance(layer, kvpolicy.KVPolicyLayer)
        else:
            assert isinstance(layer, SlidingWindowLayer) and layer.sliding_window == WINDOW
    assert any(isinstance(layer, SlidingWindowLayer) for layer in cache.layers), name


def test_a_model_without_full_attention_layers_is_told_the_policy_does_not_apply():
    model = build(*ARCHITECTURES["mistral"])
    with pytest.warns(UserWarning, match="every layer of MistralForCausalLM .* sliding-window or chunked"):
        Policy.load("kivi").make_cache(model)


@pytest.mark.parametrize("policy", ["full", "kivi"])
def test_policy_that_quantizes_nothing_equals_dynamic_cache(hybrid, policy):
    """`full`, and `kivi` whose 128-token budget exceeds the 52 tokens: DynamicCache's logits exactly,
    with the sliding layers past their window."""
    _, model = hybrid
    inputs = left_padded_batch([40, 25])
    expected = _logits(model, inputs, DynamicCache(config=model.config))
    got = _logits(model, inputs, Policy.load(policy).make_cache(model))
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])


def _small_budget() -> Policy:
    """KIVI-style, 8 recent tokens in full precision, groups of 8: quantizes from the 9th token on."""
    side = {"retain": [{"type": "window", "size": 8}], "quant": {"bits": 4, "group_size": 8}}
    return Policy.from_dict({
        "name": "small", "keys": {**side, "quant": {**side["quant"], "axis": "channel"}},
        "values": {**side, "quant": {**side["quant"], "axis": "token"}}, "executor": "chunked",
    })  # fmt: skip


@pytest.mark.parametrize("policy", ["streaming", "small"])
def test_left_padded_batch_equals_each_row_alone(hybrid, policy):
    """A policy that demotes (evicts, or quantizes at 4 bits) serves a left-padded batch as it serves each row
    alone: exactly for eviction; within a small drift when quantization groups follow the batch's positions."""
    from kvpolicy.evaluation.agreement import greedy_agreement

    _, model = hybrid
    make = _small_budget() if policy == "small" else Policy.load(policy)
    lengths = [44, 30, 5] if policy == "small" else [300, 150, 20]
    inputs = left_padded_batch(lengths)
    together_tokens, together_logits = _logits(model, inputs, make.make_cache(model), n=16)
    width = inputs["input_ids"].shape[1]
    for row, n in enumerate(lengths):
        ids = inputs["input_ids"][row : row + 1, width - n :]
        alone_tokens, alone_logits = _logits(
            model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, make.make_cache(model), n=16
        )
        if policy == "streaming":
            assert torch.equal(together_tokens[row, width:], alone_tokens[0, n:]), f"row {row}"
            continue
        result = greedy_agreement(together_tokens[row, width:], together_logits[:, row], alone_tokens[0, n:],
                                  alone_logits[:, 0])  # fmt: skip
        assert result.identical or result.divergence_margin <= 0.25, f"row {row}: {result}"
        assert result.drift <= 1.5, f"row {row}: logits drift {result.drift:.3f} std"


def test_memory_report_counts_sliding_layers_as_dynamic_cache_holds_them(hybrid):
    """`full` holds what DynamicCache holds (sliding layers at their window) plus int32 positions."""
    _, model = hybrid
    inputs = left_padded_batch([60])
    cache = Policy.load("full").make_cache(model)
    reference = DynamicCache(config=model.config)
    greedy(model, inputs, cache, n=4)
    greedy(model, inputs, reference, n=4)
    report = cache.memory()
    dynamic = sum(t.numel() * t.element_size() for layer in reference.layers for t in (layer.keys, layer.values))
    assert report.dynamic_cache_bytes == dynamic
    assert report.total_bytes - report.bytes_by_region.get("positions", 0) == dynamic
    windows = [layer for layer in cache.layers if isinstance(layer, SlidingWindowLayer)]
    assert report.bytes_by_region["sliding_window"] == sum(layer.nbytes()["sliding_window"] for layer in windows) > 0
    assert all(layer.held_tokens() == WINDOW - 1 for layer in windows)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_attention_kvpolicy_does_not_compute_is_refused(name):
    *spec, says = REFUSED[name]
    model = build(*spec, attention="eager")
    inputs = left_padded_batch([20])
    with pytest.raises(NotSupportedError, match=says):
        greedy(model, inputs, Policy.load("full").make_cache(model), n=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["logquant", "kivi"])
def test_auto_executor_on_cuda_matches_the_chunked_path_on_a_hybrid_model(name):
    """Gemma 3's shape (1 KV head of 256) on the GPU: `auto` (fused decode kernels) generates what the
    chunked executor generates, within bf16 rounding, past the sliding window and the budget."""
    settings = {**ARCHITECTURES["gemma3"][2], "head_dim": 256, "num_key_value_heads": 1}
    model = build("Gemma3TextConfig", "Gemma3ForCausalLM", settings).to("cuda", torch.bfloat16)
    inputs = {k: v.cuda() for k, v in left_padded_batch([600, 300]).items()}
    steps = torch.randint(1, 256, (24, 2, 1), generator=torch.Generator().manual_seed(1)).cuda()
    logits = {}
    for executor in ("auto", "chunked"):
        policy = Policy.from_dict({**Policy.load(name).to_dict(), "executor": executor})
        cache = policy.make_cache(model)
        mask = inputs["attention_mask"]
        with torch.no_grad():
            out = [model(**inputs, **cache_kwargs(cache), use_cache=True).logits[:, -1]]
            for token in steps:  # the same tokens for both: logits compared step by step
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                out.append(
                    model(input_ids=token, attention_mask=mask, **cache_kwargs(cache), use_cache=True).logits[:, -1]
                )
        logits[executor] = torch.stack(out).float()
    error = (logits["auto"] - logits["chunked"]).abs().max()
    assert error <= 0.05 * logits["chunked"].abs().max(), float(error)


def test_unknown_layer_type_is_refused_with_its_name():
    model = build("LlamaConfig", "LlamaForCausalLM", dict(num_hidden_layers=2))
    model.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(UnsupportedModelError, match="'linear_attention' layers, which no kvpolicy cache layer serves"):
        Policy.load("kivi").make_cache(model)


class _QuantizedWindow(LayerFactory):
    """A third party's factory for sliding layers (here: the policy's layer, to see it chosen)."""

    name = "third_party_window"
    serves = ("sliding_attention",)

    def build(self, policy, spec, model_config=None):
        return policy.new_layer(spec.head_dim, model_config)


def test_a_policy_maps_a_layer_type_to_a_plugin_factory():
    registry = kvpolicy.Registry(load_entry_points=False, plugins={"mine": _Plugin()})
    data = {**Policy.load("kivi").to_dict(), "layer_types": {"sliding_attention": "third_party_window"}}
    model = build(*ARCHITECTURES["cohere2"])
    cache = Policy.from_dict(data, registry).make_cache(model)
    assert [type(layer).__name__ for layer in cache.layers] == ["KVPolicyLayer", "KVPolicyLayer"]
    assert Policy.from_dict(data, registry).to_dict()["layer_types"] == {"sliding_attention": "third_party_window"}
    with pytest.raises(ConfigError, match="layer_types.sliding_attention: got 'policy'.*a factory serving"):
        Policy.from_dict({**data, "layer_types": {"sliding_attention": "policy"}}, registry)
    with pytest.raises(ConfigError, match="layer_types.sliding_attention: got 'windw'.*policy, window"):
        Policy.from_dict({**data, "layer_types": {"sliding_attention": "windw"}}, registry)


class _Plugin:
    @kvpolicy.hookimpl
    def kvpolicy_layers(self):
        return [_QuantizedWindow]
