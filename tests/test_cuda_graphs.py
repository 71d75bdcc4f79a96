"""CUDA-graph decoding (``make_cache(model, cuda_graphs=True, max_cache_len=N)``).

On a CPU the static layers' steps run eagerly (no graph): they must hold exactly the tokens
eager decoding holds (same positions kept, staged and packed, the same packed bytes) and give
the same tokens and logits. On CUDA the steps are captured and replayed: the same again, to
the kernels' rounding. What the replayed step cannot serve is refused when the cache is built
or at the first forward.
"""

from __future__ import annotations

import pytest
import torch

from kvpolicy import Policy, load_policy
from kvpolicy.errors import ConfigError, NotSupportedError
from kvpolicy.generation import cache_kwargs
from kvpolicy.static_cache import StaticPolicyCache, StaticPolicyLayer
from tests.conftest import tiny_llama
from tests.test_cache import left_padded_batch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
POLICIES = ["kivi", "logquant", "streaming", "sink_kivi", "full"]


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def _generate(model, inputs, cache, n):
    with torch.no_grad():
        out = model.generate(
            **inputs, **cache_kwargs(cache), max_new_tokens=n, min_new_tokens=n, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    return out.sequences, torch.stack(out.logits)


def _tolerance(layer: int) -> dict:
    return {"rtol": 0.0, "atol": 0.0} if layer == 0 else {"rtol": 1e-5, "atol": 1e-5}


def _prompt(batch: int, length: int, device="cpu"):
    ids = torch.randint(1, 256, (batch, length), generator=torch.Generator().manual_seed(length)).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("name", POLICIES)
def test_static_steps_equal_eager_decoding(model, name):
    """A prompt past every budget, then enough steps to pack several blocks (kivi packs every 32)."""
    inputs, n = _prompt(2, 301), 70
    eager = load_policy(name).make_cache(model)
    static = load_policy(name).make_cache(model, cuda_graphs=True, max_cache_len=301 + n)
    expected = _generate(model, inputs, eager, n)
    got = _generate(model, inputs, static, n)
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)
    # the same tokens at the same precision: positions, packed bytes and full-precision values
    # (layer 0, whose keys and values come from the token embeddings alone, bit for bit; later
    # layers' inputs differ by the attention's summation order, ~1e-7)
    assert isinstance(static, StaticPolicyCache)
    for index, (eager_layer, layer) in enumerate(zip(eager.layers, static.layers, strict=True)):
        assert isinstance(layer, StaticPolicyLayer)
        schedule, store = layer.schedule, eager_layer.key_store
        assert schedule.length == store.length
        assert schedule.held_positions() == torch.cat([store.fp_pos, store.staging_pos]).tolist()
        assert schedule.store.packed_pos.tolist() == store.packed_pos.tolist()
        slots = torch.tensor([schedule.slot_of[p] for p in schedule.held_positions()])
        for ring, side in ((layer.ring_keys, store), (layer.ring_values, eager_layer.value_store)):
            held = torch.cat([t for t in (side.fp, side.staging) if t is not None], dim=2)
            torch.testing.assert_close(ring.index_select(2, slots), held, **_tolerance(index))
        if store.packed is not None and index == 0:
            n_packed = store.packed.num_tokens
            assert torch.equal(layer.packed_keys.codes[:, :, :n_packed], store.packed.codes)
            assert torch.equal(layer.packed_values.codes[:, :, :n_packed], eager_layer.value_store.packed.codes)
            assert torch.equal(layer.packed_values.scale[:, :, :n_packed], eager_layer.value_store.packed.scale)


def test_free_ring_slots_are_masked_and_held_ones_open(model):
    inputs, n = _prompt(1, 200), 40
    cache = load_policy("kivi").make_cache(model, cuda_graphs=True, max_cache_len=240)
    _generate(model, inputs, cache, n)
    schedule = cache.layers[0].schedule
    held = set(schedule.slot_of.values()) | {schedule.next_slot}
    open_slots = (schedule.ring_bias[0] == 0).nonzero().squeeze(-1).tolist()
    assert set(open_slots) == held
    assert int((schedule.packed_bias[0] == 0).sum()) == len(schedule.store.packed_pos)


def test_memory_report_counts_the_preallocated_buffers(model):
    cache = load_policy("logquant").make_cache(model, cuda_graphs=True, max_cache_len=512)
    _generate(model, _prompt(1, 300), cache, 4)
    layer = cache.layers[0]
    held = sum(layer.nbytes().values())
    ring = 2 * layer.ring_keys.numel() * layer.ring_keys.element_size()
    packed = sum(sum(p.nbytes().values()) for p in (layer.packed_keys, layer.packed_values))
    assert held == ring + packed
    assert layer.packed_keys.num_tokens == layer.schedule.capacity >= 512
    assert cache.memory().tokens == 303  # the prompt and three decode forwards (the 4th token is not cached)


@pytest.mark.parametrize(
    ("policy", "says"),
    [
        ("partial_logquant", "retains keys and values differently"),
        ("logquant_rot", "rotate='hadamard'"),
    ],
)
def test_policies_the_replayed_step_cannot_serve_are_refused(model, policy, says):
    with pytest.raises(NotSupportedError, match=says):
        load_policy(policy).make_cache(model, cuda_graphs=True, max_cache_len=64)


@pytest.mark.parametrize("bad", [None, 0, -5, 1.5, "64", True])
def test_max_cache_len_is_required_and_named(model, bad):
    with pytest.raises(ConfigError, match="max_cache_len"):
        load_policy("kivi").make_cache(model, cuda_graphs=True, max_cache_len=bad)


def test_a_hybrid_model_is_refused():
    from tests.test_hybrid import ARCHITECTURES, build

    gemma = build(*ARCHITECTURES["gemma3"])
    with pytest.raises(NotSupportedError, match="sliding_attention layers"):
        load_policy("kivi").make_cache(gemma, cuda_graphs=True, max_cache_len=64)


def test_padding_decoding_past_capacity_and_a_second_turn_are_refused(model):
    with pytest.raises(NotSupportedError, match="without padding"):
        _generate(model, left_padded_batch([30, 20]), load_policy("kivi").make_cache(
            model, cuda_graphs=True, max_cache_len=64), 4)  # fmt: skip
    with pytest.raises(NotSupportedError, match="past max_cache_len=40"):
        _generate(model, _prompt(1, 30), load_policy("kivi").make_cache(model, cuda_graphs=True, max_cache_len=40), 20)
    cache = load_policy("kivi").make_cache(model, cuda_graphs=True, max_cache_len=200)
    first = _generate(model, _prompt(1, 30), cache, 4)[0]
    with pytest.raises(NotSupportedError, match="one token id per row"):
        _generate(model, {"input_ids": torch.cat([first, first[:, :5]], 1)}, cache, 2)


def test_beam_search_is_refused(model):
    cache = load_policy("kivi").make_cache(model, cuda_graphs=True, max_cache_len=64)
    with pytest.raises(NotSupportedError, match="keeps its batch fixed"), torch.no_grad():
        model.generate(**_prompt(1, 20), **cache_kwargs(cache), max_new_tokens=4, num_beams=2, do_sample=False)


def test_other_caches_still_reach_the_models_own_forward(model):
    """The forward wrapper is installed once and passes every other cache through."""
    from transformers import DynamicCache

    load_policy("kivi").make_cache(model, cuda_graphs=True, max_cache_len=64)
    wrapped = model.forward
    load_policy("kivi").make_cache(model, cuda_graphs=True, max_cache_len=64)
    assert model.forward is wrapped
    inputs = _prompt(1, 40)
    expected = _generate(model, inputs, load_policy("full").make_cache(model), 6)
    got = _generate(model, inputs, DynamicCache(config=model.config), 6)
    assert torch.equal(got[0], expected[0])


@cuda
@pytest.mark.parametrize("name", ["kivi", "logquant", "streaming"])
def test_replayed_steps_equal_eager_decoding_on_cuda(name):
    """The graph path (captured at the first decode step, replayed after) against the eager
    cache with the same kernels: the same tokens, logits to bf16 rounding."""
    gpu = tiny_llama(dtype=torch.bfloat16).to("cuda")
    policy = Policy.load(name)
    inputs, n = _prompt(2, 301, "cuda"), 70
    expected = _generate(gpu, inputs, policy.make_cache(gpu), n)
    cache = policy.make_cache(gpu, cuda_graphs=True, max_cache_len=301 + n)
    got = _generate(gpu, inputs, cache, n)
    assert cache.decoding.graph is not None  # captured, then replayed
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1].float(), expected[1].float(), rtol=2e-2, atol=2e-2)
