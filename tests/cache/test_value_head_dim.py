"""Keys and values of different head sizes (MiMo V2's attention: keys of ``head_dim``, values of
``v_head_dim``).

A tiny MiMo V2 Flash with every layer full attention (its sliding layers ask for learned sinks,
which kvpolicy refuses), keys of 64 channels and values of 32: each store holds its own side's
head size, so a policy that keeps everything equals DynamicCache exactly, a quantizing policy
agrees with the reference executor, and the memory report counts each side at its own size.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import DynamicCache

import kvpolicy
from kvpolicy import Policy
from kvpolicy.cache.layers import model_layers
from kvpolicy.errors import ConfigError
from kvpolicy.evaluation.agreement import greedy_agreement
from tests.cache.test_cache import greedy, left_padded_batch

KEY_DIM, VALUE_DIM = 64, 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = transformers.MiMoV2FlashConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=KEY_DIM, v_head_dim=VALUE_DIM, n_routed_experts=4,
        num_experts_per_tok=2, layer_types=["full_attention"] * 2, mlp_layer_types=["dense"] * 2,
        pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    config._attn_implementation = "eager"  # MiMo V2 declares no SDPA support
    model = transformers.MiMoV2FlashForCausalLM(config).eval()
    kvpolicy.attach(model)  # as make_cache does: DynamicCache runs through the same attention (SDPA) too
    return model


def _logits(model, inputs, cache, n=8):
    out = greedy(model, inputs, cache, n=n, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def _small_budget(executor: str) -> Policy:
    """8 recent tokens in full precision, 4 bits in groups of 8 (keys per channel, values per token)."""
    side = {"retain": [{"type": "window", "size": 8}], "quant": {"bits": 4, "group_size": 8}}
    return Policy.from_dict({
        "name": "small", "keys": {**side, "quant": {**side["quant"], "axis": "channel"}},
        "values": {**side, "quant": {**side["quant"], "axis": "token"}}, "executor": executor,
    })  # fmt: skip


def test_the_layer_spec_reads_the_value_head_size(model):
    specs = model_layers(model)
    assert [(s.head_dim, s.value_head_dim) for s in specs] == [(KEY_DIM, VALUE_DIM)] * 2


@pytest.mark.parametrize("policy", ["full", "kivi"])
def test_policy_that_quantizes_nothing_equals_dynamic_cache(model, policy):
    """`full`, and `kivi` whose budget exceeds the sequence: DynamicCache's tokens and logits exactly."""
    inputs = left_padded_batch([40, 25])
    expected = _logits(model, inputs, DynamicCache(config=model.config))
    got = _logits(model, inputs, Policy.load(policy).make_cache(model))
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])


def test_each_store_holds_its_own_head_size(model):
    cache = _small_budget("chunked").make_cache(model)
    greedy(model, left_padded_batch([40]), cache, n=4)
    layer = cache.layers[0]
    assert layer.key_store.fp.shape[-1] == KEY_DIM and layer.value_store.fp.shape[-1] == VALUE_DIM
    keys, _ = layer.key_store.view().materialize()
    values, _ = layer.value_store.view().materialize()
    assert keys.shape[-1] == KEY_DIM and values.shape[-1] == VALUE_DIM
    assert layer.key_store.packed is not None and layer.value_store.packed is not None


def test_quantized_steps_agree_with_the_reference_executor(model):
    """The chunked executor (the CPU default) and the reference executor attend 32-channel values
    under 64-channel scores alike, through the prefill and every decode step."""
    inputs = left_padded_batch([60, 33])
    reference = _logits(model, inputs, _small_budget("reference").make_cache(model), n=12)
    chunked = _logits(model, inputs, _small_budget("chunked").make_cache(model), n=12)
    assert torch.equal(chunked[0], reference[0])
    torch.testing.assert_close(chunked[1], reference[1], rtol=1e-4, atol=1e-4)
    dynamic = _logits(model, inputs, DynamicCache(config=model.config), n=12)
    width = inputs["input_ids"].shape[1]
    for row in range(2):  # 4 bits drift from the 16-bit answer; they do not give a wrong one
        result = greedy_agreement(chunked[0][row, width:], chunked[1][:, row], dynamic[0][row, width:],
                                  dynamic[1][:, row])  # fmt: skip
        assert result.identical or result.divergence_margin <= 0.25, f"row {row}: {result}"
        assert result.drift <= 1.5, f"row {row}: logits drift {result.drift:.3f} std"


def test_memory_report_counts_each_side_at_its_own_size(model):
    inputs = left_padded_batch([50])
    cache, reference = Policy.load("full").make_cache(model), DynamicCache(config=model.config)
    greedy(model, inputs, cache, n=4)
    greedy(model, inputs, reference, n=4)
    report = cache.memory()
    dynamic = sum(t.numel() * t.element_size() for layer in reference.layers for t in (layer.keys, layer.values))
    assert report.dynamic_cache_bytes == dynamic
    assert report.total_bytes - report.bytes_by_region["positions"] == dynamic


def test_memory_bound_counts_values_at_their_head_size(model):
    policy = _small_budget("chunked")
    cache = policy.make_cache(model)
    greedy(model, left_padded_batch([90]), cache, n=6)
    tokens = cache.get_seq_length()
    bound = policy.memory_bound(tokens, 1, 2, KEY_DIM, element_size=4, value_head_dim=VALUE_DIM)
    held = sum(cache.layers[0].nbytes().values())
    assert held <= bound < policy.memory_bound(tokens, 1, 2, KEY_DIM, element_size=4)


def test_a_group_that_does_not_fit_the_values_names_the_values_side(model):
    """`logquant` groups values per token by 64: more than the 32 value channels, and the error says so."""
    with pytest.raises(ConfigError, match=r"values\.quant\.group_size.*head_dim=32"):
        Policy.load("logquant").make_cache(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the fused kernels decline this shape")
def test_auto_on_cuda_declines_the_fused_kernels_and_matches_chunked(model):
    """The fused decode kernels read keys and values of one head size; `auto` falls back to the
    chunked path here, with the same output."""
    gpu = model.to("cuda", torch.bfloat16)
    inputs = {k: v.cuda() for k, v in left_padded_batch([60, 33]).items()}
    chunked = _logits(gpu, inputs, _small_budget("chunked").make_cache(gpu), n=8)
    auto = _logits(gpu, inputs, _small_budget("auto").make_cache(gpu), n=8)
    model.to("cpu", torch.float32)
    assert torch.equal(auto[0], chunked[0])
    torch.testing.assert_close(auto[1], chunked[1])
