"""transformers integration on a tiny random Llama: generate, batch + padding, continuation, refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DynamicCache,
    LlamaConfig,
)

import kvpolicy
from kvpolicy import KVPolicyCache, Policy
from kvpolicy.cache import attention_layout
from kvpolicy.generation import cache_kwargs
from tests.conftest import tiny_llama

SHIPPED = ["full", "kivi", "logquant", "partial_logquant", "streaming", "sink_kivi"]


def left_padded_batch(lengths, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(1, vocab, (n,), generator=g)
        mask[row, width - n :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def greedy(model, inputs, cache, n=24, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, past_key_values=cache, max_new_tokens=n, do_sample=False, **kwargs)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_full_policy_equals_dynamic_cache_on_a_padded_batch(model):
    inputs = left_padded_batch([40, 7, 23])
    expected = greedy(model, inputs, DynamicCache(config=model.config), n=40)
    got = greedy(model, inputs, kvpolicy.load_policy("full").make_cache(model), n=40)
    assert torch.equal(got, expected)


def test_full_policy_equals_dynamic_cache_when_sampling(model):
    inputs = left_padded_batch([12, 30])
    outs = []
    for cache in (DynamicCache(config=model.config), kvpolicy.load_policy("full").make_cache(model)):
        torch.manual_seed(123)
        with torch.no_grad():
            outs.append(model.generate(**inputs, past_key_values=cache, max_new_tokens=20, do_sample=True, top_k=20))
    assert torch.equal(outs[0], outs[1])


def test_full_policy_equals_dynamic_cache_in_beam_search(model):
    inputs = left_padded_batch([15, 9])
    expected = greedy(model, inputs, DynamicCache(config=model.config), n=12, num_beams=3)
    got = greedy(model, inputs, kvpolicy.load_policy("full").make_cache(model), n=12, num_beams=3)
    assert torch.equal(got, expected)


def test_continuing_generation_on_the_same_cache(model):
    first = left_padded_batch([20, 11], seed=1)
    dyn, ours = DynamicCache(config=model.config), kvpolicy.load_policy("full").make_cache(model)
    out_dyn, out_ours = greedy(model, first, dyn, n=10), greedy(model, first, ours, n=10)
    follow = torch.randint(1, 256, (2, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.cat([first["attention_mask"], torch.ones(2, 15, dtype=torch.long)], dim=1)
    turn = {"input_ids": torch.cat([out_dyn, follow], 1), "attention_mask": mask}
    second_dyn = greedy(model, turn, dyn, n=10)
    second_ours = greedy(model, {**turn, "input_ids": torch.cat([out_ours, follow], 1)}, ours, n=10)
    assert torch.equal(second_ours, second_dyn)
    assert ours.get_seq_length() == dyn.get_seq_length()


@pytest.fixture(scope="module")
def bf16_model():
    return tiny_llama(dtype=torch.bfloat16)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_policy_generates_within_its_budget(bf16_model, name):
    model = bf16_model
    policy = kvpolicy.load_policy(name)
    cache = policy.make_cache(model)
    inputs = left_padded_batch([300, 170])
    out = greedy(model, inputs, cache, n=20)
    assert out.shape == (2, 320)
    budget = policy.budget()
    for layer in cache.layers:
        assert layer.get_seq_length() == 319  # the last token is produced, not yet cached
        for store, key in ((layer.key_store, "keys"), (layer.value_store, "values")):
            if budget[key] is not None:
                assert len(store.fp_pos) <= budget[key]
    report = cache.memory()
    assert report.tokens == 319
    assert sum(layer.nbytes()["full_precision"] for layer in cache.layers) > 0
    if name == "full":
        assert report.bytes_by_region["codes"] == 0
    else:  # partial_logquant also holds its executor's dequantized copy of the packed values
        assert report.ratio < (0.75 if name == "partial_logquant" else 0.7), report.summary()


def test_quantized_policy_stays_close_to_full_precision_logits(model):
    inputs = left_padded_batch([200])
    logits = {}
    for name in ("full", "logquant", "kivi"):
        cache = kvpolicy.load_policy(name).make_cache(model)
        with torch.no_grad():
            model(**inputs, past_key_values=cache)
            step = model(input_ids=torch.tensor([[5]]), past_key_values=cache)
        logits[name] = step.logits[0, -1].float()
    for name in ("logquant", "kivi"):
        diff = (logits[name] - logits["full"]).norm() / logits["full"].norm()
        assert 0 < diff < 0.2, (name, float(diff))


def test_cache_is_a_transformers_cache_with_one_layer_per_decoder_layer(model):
    cache = kvpolicy.load_policy("logquant").make_cache(model)
    assert isinstance(cache, KVPolicyCache) and len(cache.layers) == model.config.num_hidden_layers
    first, second = cache.layers[0], cache.layers[1]
    assert first.key_store is not second.key_store  # each layer its own tensors...
    # ...and one bookkeeping object for the schedule that every layer's keys and values share
    assert first.key_store.positions is first.value_store.positions is second.key_store.positions


def test_reset_empties_every_layer(model):
    cache = kvpolicy.load_policy("kivi").make_cache(model)
    greedy(model, left_padded_batch([150]), cache, n=4)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.memory().total_bytes == 0
    out = greedy(model, left_padded_batch([10]), cache, n=4)
    assert out.shape == (1, 14)


def test_kvpolicy_attention_is_plain_sdpa_for_other_caches():
    reference = tiny_llama()
    model = tiny_llama()
    kvpolicy.attach(model)
    inputs = left_padded_batch([9, 16])
    expected = greedy(reference, inputs, DynamicCache(config=reference.config))
    assert torch.equal(greedy(model, inputs, DynamicCache(config=model.config)), expected)


def test_attention_layout_reads_gqa_shape():
    config = LlamaConfig(hidden_size=128, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3)

    class Holder:
        pass

    holder = Holder()
    holder.config = config
    assert attention_layout(holder) == (3, 2, 16)


def test_tensors_of_another_dtype_or_batch_are_refused_clearly(model):
    policy = Policy.load("kivi")
    cache = policy.make_cache(model)
    k = torch.randn(2, 1, 5, 64)
    cache.update(k, k, 0)
    with pytest.raises(kvpolicy.errors.CacheMismatchError, match=r"holds torch.float32 .* got torch.float16"):
        cache.update(k.half(), k.half(), 0)
    with pytest.raises(
        kvpolicy.errors.CacheMismatchError, match=r"\(batch, kv_heads, head_dim\)=\(2, 1, 64\); got .*\(3, 1, 64\)"
    ):
        cache.update(torch.randn(3, 1, 1, 64), torch.randn(3, 1, 1, 64), 0)
    cache.batch_repeat_interleave(2)  # a batch operation updates what the layer expects
    cache.update(torch.randn(4, 1, 1, 64), torch.randn(4, 1, 1, 64), 0)
    assert cache.layers[0].key_store.length == 6


def test_output_attentions_is_refused_not_answered_empty():
    """The 'kvpolicy' attention computes no weights: asking for them is an error that says what
    to do, for a kvpolicy cache and for any other cache on a model make_cache switched."""
    from kvpolicy import NotSupportedError, load_policy
    from tests.conftest import tiny_llama

    model = tiny_llama()
    ids = torch.randint(1, 256, (1, 12))
    cache = load_policy("logquant").make_cache(model)
    with pytest.raises(NotSupportedError, match="Generate without output_attentions"):
        model.generate(
            ids, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True, **cache_kwargs(cache)
        )
    with pytest.raises(NotSupportedError, match="set_attn_implementation"):
        model.generate(ids, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)
    model.set_attn_implementation("eager")  # what the message says: attentions come back
    out = model.generate(ids, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)
    assert out.attentions[0][0].shape == (1, 2, 12, 12)


SINK_64 = {
    "name": "sink64",
    "keys": {"retain": [{"type": "sink", "size": 64}, {"type": "window", "size": 64}], "demote": "evict"},
    "values": {"retain": [{"type": "sink", "size": 64}, {"type": "window", "size": 64}], "demote": "evict"},
}


@pytest.mark.parametrize(
    "policy, lengths",
    [("streaming", [3, 1]), ("sink_kivi", [3, 1]), ("streaming", [2, 5, 1]), (SINK_64, [50, 20]), (SINK_64, [63, 1])],
)
def test_sink_policies_equal_dynamic_cache_on_padded_prompts_shorter_than_the_sinks(model, policy, lengths):
    """Prompts narrower than the sink size: a padded row's own decode tokens fill sink positions
    and must stay visible (nothing is evicted or quantized within these lengths)."""
    policy = kvpolicy.Policy.from_dict(policy) if isinstance(policy, dict) else kvpolicy.load_policy(policy)
    inputs = left_padded_batch(lengths, seed=3)
    expected = greedy(
        model, inputs, DynamicCache(config=model.config), n=20, output_logits=True, return_dict_in_generate=True
    )
    got = greedy(model, inputs, policy.make_cache(model), n=20, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected.sequences)
    for mine, theirs in zip(got.logits, expected.logits):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def falcon_alibi():
    """A Falcon-RW-shaped model: ALiBi folded into a float attention mask, parallel attention, biases."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    config = FalconConfig(
        vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, alibi=True,
        new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=True, attn_implementation="sdpa",
    )  # fmt: skip
    model = FalconForCausalLM(config).eval()
    try:  # older transformers run Falcon's attention outside AttentionInterface: refused, not served
        kvpolicy.load_policy("full").make_cache(model)
    except kvpolicy.UnsupportedModelError as err:
        pytest.skip(f"this transformers does not route Falcon through AttentionInterface ({err})")
    model.set_attn_implementation("sdpa")
    return model


def test_full_equals_dynamic_cache_under_an_alibi_float_mask(falcon_alibi):
    inputs = left_padded_batch([40, 20])
    expected = greedy(falcon_alibi, inputs, DynamicCache(config=falcon_alibi.config), n=20)
    assert torch.equal(
        greedy(falcon_alibi, inputs, kvpolicy.load_policy("full").make_cache(falcon_alibi), n=20), expected
    )


@pytest.mark.parametrize("name", ["streaming", "kivi", "logquant", "sink_kivi", "partial_logquant"])
def test_demoting_policies_refuse_an_alibi_float_mask_at_the_first_forward(falcon_alibi, name):
    from kvpolicy.errors import NotSupportedError

    cache = kvpolicy.load_policy(name).make_cache(falcon_alibi)
    with pytest.raises(NotSupportedError, match="float mask"):
        greedy(falcon_alibi, left_padded_batch([40, 20]), cache, n=2)


@pytest.mark.parametrize("name", ["full", "kivi", "partial_logquant"])
def test_a_compiled_model_decodes_with_a_kvpolicy_cache_as_the_eager_model_does(name):
    """``torch.compile`` (aot_eager on a CPU) compiles the model's layers and runs the cache's
    bookkeeping and attention eagerly between them: the same logits as without compiling."""
    import torch._dynamo

    model = tiny_llama(layers=2)
    ids = torch.randint(1, 256, (1, 150), generator=torch.Generator().manual_seed(4))
    compiled = torch.compile(model, backend="aot_eager", dynamic=True)
    logits = []
    try:
        for forward in (model, compiled):
            cache, steps = kvpolicy.load_policy(name).make_cache(model), []
            with torch.no_grad():
                out = forward(ids, cache=cache, use_cache=True)
                for _ in range(6):
                    steps.append(out.logits[:, -1])
                    out = forward(out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
            logits.append(torch.stack(steps))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("name", "schedules"), [("logquant", 1), ("partial_logquant", 2)])
def test_each_retention_schedule_books_a_step_once(name, schedules, monkeypatch):
    """One bookkeeping source: every layer and side on a schedule applies the move its first store booked."""
    from kvpolicy.store.positions import Positions

    model = tiny_llama(layers=4)
    cache = kvpolicy.load_policy(name).make_cache(model)
    booked: list[int] = []
    advance = Positions.advance
    monkeypatch.setattr(Positions, "advance", lambda self, q: booked.append(id(self)) or advance(self, q))
    greedy(model, left_padded_batch([150]), cache, n=3)  # the prefill and two decode forwards
    assert len(set(booked)) == schedules and len(booked) == 3 * schedules
    assert all(store.length == 152 for layer in cache.layers for store in layer.stores())
