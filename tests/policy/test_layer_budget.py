"""Per-layer precision chosen by a bit budget, `rotate: auto` and `group_size: head`: the
settings a policy resolves against the model it meets (`logquant_mixed` is built from them)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM

from kvpolicy import Policy
from kvpolicy.cache.layers import LayerSpec, model_layers, normalized_key_layers
from kvpolicy.config import QuantSpec
from kvpolicy.errors import ConfigError
from kvpolicy.policy import layer_quant
from kvpolicy.policy.layer_budget import layer_bits, mean_bits, served_layers, settle_layers
from tests.cache.test_cache import greedy, left_padded_batch
from tests.conftest import TINY, tiny_llama


def tiny_qwen3(layers: int = 2) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen 3 of the tiny Llama's shape: QK-norm (a ``k_norm`` per layer)."""
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(num_hidden_layers=layers, **TINY)).eval()


def _policy(keys: dict | None = None, values: dict | None = None, layers: list | None = None, window: int = 16):
    data = Policy.load("kivi").to_dict()
    for side, quant in (("keys", keys), ("values", values)):
        data[side]["retain"] = [{"type": "window", "size": window}]
        data[side]["quant"].update(quant or {})
    return Policy.from_dict({**data, "layers": layers or []})


FOUR_BIT_KEYS = {"keys": {"quant": {"bits": 4, "group_size": 128}}}


def _budgeted(bits: float) -> dict:
    return {"at": {"earliest_within_bits": bits}, **FOUR_BIT_KEYS}


# -- the budget ---------------------------------------------------------------------


def test_kivi_costs_three_bits_per_element_and_four_bit_keys_in_groups_of_128_cost_more():
    spec = LayerSpec(0, "full_attention", 1, 64)
    assert layer_bits(Policy.load("kivi"), spec) == pytest.approx(3.0)  # 2 bits + 32 bits of scale and zero / 32
    four = _policy(keys={"bits": 4, "group_size": 128})
    assert layer_bits(four, spec) == pytest.approx((4.25 + 3.0) / 2)


def test_a_budgeted_entry_takes_the_earliest_layers_that_fit_and_no_more():
    # base: 2-bit keys in groups of 64 (2.5 bits) and values in groups of 64 (2.5); 4-bit keys: 4.25
    policy = _policy(keys={"group_size": 64}, values={"group_size": 64}, layers=[_budgeted(3.0)])
    specs = [LayerSpec(i, "full_attention", 1, 64, num_layers=10) for i in range(10)]
    settled = settle_layers(policy, specs)
    # each 4-bit layer adds (4.25 - 2.5) / 2 / 10 = 0.0875 to the mean of 2.5: five fit, six do not
    assert [o.at for o in settled.config.layers] == [(0, 1, 2, 3, 4)]
    assert not settled.config.budgeted


def test_layers_an_entry_names_and_layers_the_policy_does_not_cache_are_skipped():
    named = {"at": [0], "values": {"retain": [{"type": "all"}]}}  # layer 0: values in 16-bit
    policy = _policy(keys={"group_size": 64}, values={"group_size": 64}, layers=[named, _budgeted(3.2)])
    kinds = ["full_attention", "sliding_attention"] * 4
    specs = [LayerSpec(i, kind, 1, 64, window=32 if i % 2 else None, num_layers=8) for i, kind in enumerate(kinds)]
    # served: 0, 2, 4, 6; layer 0 named (values 16-bit: (2.5 + 16) / 2 = 9.25 bits): the mean is already
    # (9.25 + 3 * 2.5) / 4 = 4.19 > 3.2, so the budgeted entry cannot start and is refused
    assert [s.index for s in served_layers(policy, specs, "m")] == [0, 2, 4, 6]
    with pytest.raises(ConfigError) as err:
        settle_layers(policy, specs)
    assert err.value.field == "layers[1].at.earliest_within_bits"
    assert "at least 4.188" in str(err.value)
    policy = _policy(keys={"group_size": 64}, values={"group_size": 64}, layers=[named, _budgeted(4.9)])
    assert [o.at for o in settle_layers(policy, specs).config.layers] == [(0,), (2, 4, 6)]  # 3 x 0.219 more


@settings(max_examples=60, deadline=None)
@given(
    num_layers=st.integers(1, 12),
    sliding=st.sets(st.integers(0, 11)),
    head_dim=st.sampled_from([64, 128, 256]),
    key_group=st.sampled_from([32, 64, 128]),
    value_group=st.sampled_from([32, 64, "head"]),
    upgrade_bits=st.sampled_from([4, 8]),
    slack=st.floats(0.0, 4.0),
)
def test_the_budget_is_never_exceeded_and_the_earliest_layers_that_fit_are_taken(
    num_layers, sliding, head_dim, key_group, value_group, upgrade_bits, slack
):
    base = _policy(keys={"group_size": key_group}, values={"group_size": value_group})
    kinds = ["sliding_attention" if i in sliding else "full_attention" for i in range(num_layers)]
    specs = [
        LayerSpec(i, kind, 2, head_dim, window=16 if kind != "full_attention" else None, num_layers=num_layers)
        for i, kind in enumerate(kinds)
    ]
    served = served_layers(base, specs, "m")
    base_bits = mean_bits({s.index: base for s in served}, served) if served else 2.0
    budget = base_bits + slack
    upgrade = {"at": {"earliest_within_bits": budget}, "keys": {"quant": {"bits": upgrade_bits}}}
    policy = _policy(keys={"group_size": key_group}, values={"group_size": value_group}, layers=[upgrade])
    settled = settle_layers(policy, specs)
    taken = [i for o in settled.config.layers for i in o.at]
    per_layer = {s.index: settled.for_layer(s.index, num_layers) for s in served}
    if served:
        assert mean_bits(per_layer, served) <= budget + 1e-9
    assert taken == [s.index for s in served[: len(taken)]]  # the earliest served layers, in order
    if len(taken) < len(served):  # one more would not fit
        trial = {**per_layer, served[len(taken)].index: policy.overrides[0]}
        assert mean_bits(trial, served) > budget


def test_the_settled_cache_holds_four_bit_keys_on_the_earliest_layers():
    model = tiny_llama(layers=4)
    # 2-bit keys and values in groups of 32 (3.0 bits); 4-bit keys in groups of 128 (4.25): one layer adds
    # 0.15625 to the mean, so a budget of 3.35 takes two layers
    policy = _policy(layers=[_budgeted(3.35)])
    cache = policy.make_cache(model)
    greedy(model, left_padded_batch([300]), cache, n=4)
    assert [layer.key_store.packed.bits for layer in cache.layers] == [4, 4, 2, 2]
    assert [layer.key_store.spec.group_size for layer in cache.layers] == [128, 128, 32, 32]
    report = cache.memory()
    # the positions once per bookkeeping object: the 4-bit layers' (blocks of 128) and the 2-bit layers' (32)
    bookkeeping = {id(s.positions): s.positions for layer in cache.layers for s in layer.stores()}
    assert len(bookkeeping) == 2
    assert report.bytes_by_region["positions"] == sum(p.nbytes() for p in bookkeeping.values())
    assert report.total_bytes == sum(sum(layer.nbytes().values()) for layer in cache.layers) + sum(
        p.nbytes() for p in bookkeeping.values()
    )


def test_an_unsettled_budgeted_policy_names_no_layer_s_settings():
    """Which layers a budgeted entry takes depends on the model: asking before is an error, not
    the base settings silently."""
    policy = _policy(layers=[_budgeted(3.35)])
    with pytest.raises(ConfigError, match="settled for a model first"):
        policy.for_layer(0, 4)
    settled = policy.for_model(model_layers(tiny_llama(layers=4)))
    assert settled.for_layer(0, 4).config.keys.quant.bits == 4 and settled.for_layer(3, 4) is settled


def test_a_budget_below_the_policys_own_bits_is_refused_naming_both():
    with pytest.raises(ConfigError, match=r"earliest_within_bits: got 2\.5.*at least 3\.000"):
        _policy(layers=[_budgeted(2.5)]).make_cache(tiny_llama(layers=2))


@pytest.mark.parametrize(
    ("at", "field", "allowed"),
    [
        ({"earliest_within": 3}, "layers[0].at", "earliest_within_bits"),
        ({"earliest_within_bits": 0}, "layers[0].at.earliest_within_bits", "a positive number"),
        ({"earliest_within_bits": "3"}, "layers[0].at.earliest_within_bits", "a positive number"),
        ({"earliest_within_bits": True}, "layers[0].at.earliest_within_bits", "a positive number"),
    ],
)
def test_a_bad_budget_names_its_field(at, field, allowed):
    with pytest.raises(ConfigError) as err:
        _policy(layers=[{"at": at, **FOUR_BIT_KEYS}])
    assert err.value.field == field and allowed in str(err.value)


def test_the_budgeted_form_round_trips_and_within_bits_is_not_a_key():
    policy = Policy.load("logquant_mixed")
    assert Policy.from_dict(policy.to_dict()).config == policy.config
    assert policy.to_dict()["layers"][0]["at"] == {"earliest_within_bits": 3.0}
    with pytest.raises(ConfigError, match="within_bits"):
        _policy(layers=[{"at": [0], "within_bits": 3.0, **FOUR_BIT_KEYS}])


# -- rotate: auto and group_size: head ----------------------------------------------


def test_auto_rotates_unless_keys_are_normalized_or_the_head_is_not_a_power_of_two():
    auto = QuantSpec(bits=2, group_size=32, axis="channel", rotate="auto")
    assert layer_quant(auto, 64).rotate == "hadamard"
    assert layer_quant(auto, 64, unrotated_by_auto=True).rotate == "none"
    assert layer_quant(auto, 96).rotate == "none"
    assert layer_quant(QuantSpec(rotate="hadamard"), 64, unrotated_by_auto=True).rotate == "hadamard"  # as written


def test_a_head_group_covers_the_head_and_only_per_token_groups_may_ask_for_it():
    assert layer_quant(QuantSpec(group_size="head", axis="token"), 256).group_size == 256
    with pytest.raises(ConfigError, match="axis token only"):
        QuantSpec(group_size="head", axis="channel")
    with pytest.raises(ConfigError, match="a positive integer, or `head`"):
        QuantSpec(group_size="all", axis="token")


def test_qk_norm_layers_are_found_and_auto_leaves_their_keys_unrotated():
    qwen, llama = tiny_qwen3(), tiny_llama()
    assert normalized_key_layers(qwen) == {0, 1} and normalized_key_layers(llama) == set()
    assert all(s.normalized_keys for s in model_layers(qwen))
    auto = _policy(keys={"rotate": "auto"}, values={"rotate": "auto", "group_size": "head"})
    on_qwen, on_llama = auto.make_cache(qwen).layers[0], auto.make_cache(llama).layers[0]
    assert on_qwen.key_store.spec.rotate == "none"
    assert on_llama.key_store.spec.rotate == "hadamard"
    assert on_llama.value_store.spec.group_size == 64


@pytest.mark.parametrize(("model", "resolved"), [(tiny_qwen3, "none"), (tiny_llama, "hadamard")])
def test_auto_generates_exactly_what_its_resolved_rotation_generates(model, resolved):
    model = model()
    inputs = left_padded_batch([90, 40])
    auto = greedy(model, inputs, _policy(keys={"rotate": "auto"}).make_cache(model), n=12)
    written = greedy(model, inputs, _policy(keys={"rotate": resolved}).make_cache(model), n=12)
    assert torch.equal(auto, written)


def test_logquant_mixed_keeping_everything_in_16_bit_equals_dynamic_cache():
    """The budget machinery adds nothing of its own: with every token kept, the cache is DynamicCache."""
    model = tiny_llama(layers=3)
    data = Policy.load("logquant_mixed").to_dict()
    for side in ("keys", "values"):
        data[side]["retain"] = [{"type": "all"}]
    data["layers"][0]["at"] = {"earliest_within_bits": 16.0}
    inputs = left_padded_batch([70, 30])
    expected = greedy(model, inputs, DynamicCache(config=model.config), n=16)
    assert torch.equal(greedy(model, inputs, Policy.from_dict(data).make_cache(model), n=16), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_logquant_mixed_replays_on_cuda_as_it_decodes_eagerly_and_near_the_reference(head_dim):
    """The default cache on CUDA (fused kernels over 4-bit and 2-bit keys and whole-head value
    groups, replayed from a CUDA graph) against eager decoding with the same kernels (the same
    tokens) and against the reference executor (logits to bf16 rounding)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvpolicy.graphs.static_cache import StaticPolicyCache
    from tests.graphs.test_cuda_graphs import _generate, _prompt, assert_same_but_for_bf16_ties

    torch.manual_seed(0)
    config = LlamaConfig(
        **{**TINY, "hidden_size": 256, "num_attention_heads": 4, "head_dim": head_dim}, num_hidden_layers=3
    )
    gpu = LlamaForCausalLM(config).to(torch.bfloat16).to("cuda").eval()
    policy = Policy.load("logquant_mixed")
    inputs = _prompt(2, 400, "cuda")
    cache = policy.make_cache(gpu)
    got = _generate(gpu, inputs, cache, 150)
    assert isinstance(cache, StaticPolicyCache) and cache.decoding.graph is not None
    assert cache.layers[0].key_store.spec.bits == 4 and cache.layers[-1].key_store.spec.bits == 2
    assert all(layer.ring.fused for layer in cache.layers)
    expected = _generate(gpu, inputs, policy.make_cache(gpu, cuda_graphs=False), 150)
    assert_same_but_for_bf16_ties(got, expected)
    reference = Policy.from_dict({**policy.to_dict(), "executor": "reference"})
    near = _generate(gpu, inputs, reference.make_cache(gpu), 4)
    torch.testing.assert_close(near[1].float(), got[1][:4].float(), rtol=3e-2, atol=3e-2)
