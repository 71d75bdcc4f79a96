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

import kvpolicy
from kvpolicy import Policy, load_policy
from kvpolicy.cache.policy_cache import KVPolicyLayer
from kvpolicy.errors import ConfigError, NotSupportedError
from kvpolicy.generation import cache_kwargs
from kvpolicy.graphs.capability import auto_refusal, serving_refusal, setting_refusal
from kvpolicy.graphs.ring_schedule import RingSchedule
from kvpolicy.graphs.static_cache import RingBuffers, StaticPolicyCache, build_static_cache
from tests.cache.test_cache import left_padded_batch
from tests.conftest import tiny_llama

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
POLICIES = ["kivi", "logquant", "streaming", "sink_kivi", "full", "partial_logquant", "logquant_rot", "logquant_mixed"]


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


def assert_same_but_for_bf16_ties(got, expected, tol: float = 2e-2) -> None:
    """Two bf16 generations (``(sequences, logits [steps, batch, vocab])``) agree: each row's
    logits match to ``tol`` until its tokens first differ, and they may differ only at a step
    where the expected top two logits are within ``2 * tol`` of each other (summation order
    in bf16 can flip a near tie; a random tiny model has many). Later steps read different
    tokens and are not compared."""
    steps = expected[1].shape[0]
    new_got, new_expected = got[0][:, -steps:], expected[0][:, -steps:]
    assert got[0].shape == expected[0].shape
    assert torch.equal(got[0][:, :-steps], expected[0][:, :-steps])
    for row in range(new_expected.shape[0]):
        differ = (new_got[row] != new_expected[row]).nonzero()
        until = int(differ[0]) if len(differ) else steps
        ours, theirs = (
            got[1][: until + (until < steps), row].float(),
            expected[1][: until + (until < steps), row].float(),
        )
        torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
        if until < steps:
            top2 = theirs[-1].topk(2).values
            assert float(top2[0] - top2[1]) <= 2 * tol, f"row {row} differs at step {until}, not at a near tie"


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
        assert isinstance(layer, KVPolicyLayer) and isinstance(layer.ring, RingBuffers)
        schedule = layer.ring.schedule
        paired = schedule.paired
        assert paired == (name == "partial_logquant")
        sides = (
            (layer.ring.ring_keys, eager_layer.key_store, schedule.keys),
            (layer.ring.ring_values, eager_layer.value_store, schedule.values),
        )
        for ring, side, mirror in sides:
            assert mirror.length == side.length
            held = torch.cat([side.fp_pos, side.staging_pos])
            assert torch.equal(torch.cat([mirror.fp_pos, mirror.staging_pos]), held)
            assert torch.equal(mirror.packed_pos, side.packed_pos)
            slots = torch.tensor(schedule.slots_of(held))
            tokens = torch.cat([t for t in (side.fp, side.staging) if t is not None], dim=2)
            torch.testing.assert_close(ring.index_select(2, slots), tokens, **_tolerance(index))
        keys, values = eager_layer.key_store, eager_layer.value_store
        if keys.packed is None or index:
            continue
        # each side's packed buffers: the eager store's packed region, in its order, byte for byte
        for buffers, store in ((layer.ring.packed_keys, keys), (layer.ring.packed_values, values)):
            n_packed = len(store.packed_pos)
            if not n_packed:
                continue
            assert torch.equal(buffers.codes[:, :, :n_packed], store.packed.codes)
            assert torch.equal(buffers.slice_tokens(0, n_packed).scale, store.packed.scale)
        # each packed key's value row: the eager pairing's, read by the fused kernels when paired
        value_row = {p: i for i, p in enumerate(values.packed_pos.tolist())}
        rows = [value_row.get(p, -1) for p in keys.packed_pos.tolist()]
        if paired:
            assert schedule.value_rows[: len(rows)].tolist() == rows
        else:
            assert schedule.value_rows is None and rows == list(range(len(rows)))
        opened = (schedule.packed_bias[0] == 0).nonzero().squeeze(-1).tolist()
        assert opened == [i for i, r in enumerate(rows) if r >= 0]  # attended once its value is packed too


def _keys_leave_first() -> Policy:
    """partial_logquant's retention swapped: a window of keys, log-kept values, so a key is
    packed while its value is still held (the paths partial_logquant itself never takes)."""
    data = load_policy("partial_logquant").to_dict()
    keys, values = data["keys"], data["values"]
    return Policy.from_dict({**data, "name": "keys_leave_first", "keys": {**keys, "retain": values["retain"]},
                             "values": {**values, "retain": keys["retain"]}})  # fmt: skip


def _rotated_partial() -> Policy:
    """partial_logquant with keys and values rotated before quantizing (the buffers hold rotated codes)."""
    data = load_policy("partial_logquant").to_dict()
    for side in ("keys", "values"):
        data[side]["quant"] = {**data[side]["quant"], "rotate": "hadamard"}
    return Policy.from_dict({**data, "name": "partial_logquant_rot"})


@pytest.mark.parametrize("policy", [lambda: load_policy("partial_logquant"), _keys_leave_first, _rotated_partial])
def test_paired_schedules_take_every_path_and_equal_eager_decoding(model, policy, monkeypatch):
    """Keys and values retained differently: whichever side is packed first, each position is
    attended once with its own key and value at their precision (tokens and logits equal eager
    decoding's), through every path of the booking."""
    seen = {"keys stay": 0, "values stay": 0, "freed": 0}
    book = RingSchedule.book

    def counted(self):
        booking = book(self)
        for side, name in ((booking.keys, "keys stay"), (booking.values, "values stay")):
            seen[name] += 0 if side.stay is None else len(side.stay)
        seen["freed"] += len(booking.freed)
        return booking

    monkeypatch.setattr(RingSchedule, "book", counted)
    inputs, n = _prompt(2, 301), 140
    expected = _generate(model, inputs, policy().make_cache(model), n)
    got = _generate(model, inputs, policy().make_cache(model, cuda_graphs=True), n)
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)
    assert seen["freed"], seen
    assert seen["keys stay" if policy is _keys_leave_first else "values stay"], seen


def test_free_ring_slots_are_masked_and_held_ones_open(model):
    inputs, n = _prompt(1, 200), 40
    cache = load_policy("kivi").make_cache(model, cuda_graphs=True, max_cache_len=240)
    _generate(model, inputs, cache, n)
    schedule = cache.layers[0].ring.schedule
    held = set(schedule.slot_of.values()) | {schedule.next_slot}
    open_slots = (schedule.ring_bias[0] == 0).nonzero().squeeze(-1).tolist()
    assert set(open_slots) == held
    assert int((schedule.packed_bias[0] == 0).sum()) == len(schedule.keys.packed_pos)


def test_memory_report_counts_the_preallocated_buffers(model):
    cache = load_policy("logquant").make_cache(model, cuda_graphs=True, max_cache_len=512)
    _generate(model, _prompt(1, 300), cache, 4)
    layer = cache.layers[0]
    held = sum(layer.nbytes().values())
    ring = 2 * layer.ring.ring_keys.numel() * layer.ring.ring_keys.element_size()
    packed = sum(sum(p.nbytes().values()) for p in (layer.ring.packed_keys, layer.ring.packed_values))
    stores = [sum(store.nbytes().values()) for store in layer.stores()]
    assert stores == [0, 0] and layer.executor.nbytes() == 0  # the buffers hold the tokens (positions: the cache's)
    assert held == ring + packed
    assert 0 < cache.memory().bytes_by_region["positions"] < packed
    assert layer.ring.packed_keys.num_tokens == layer.ring.schedule.capacity >= 512
    assert cache.memory().tokens == 303  # the prompt and three decode forwards (the 4th token is not cached)


def _library_backend() -> Policy:
    """kivi packed by optimum-quanto (skipped where it is not installed)."""
    pytest.importorskip("optimum.quanto")
    data = load_policy("kivi").to_dict()
    for side in ("keys", "values"):
        data[side]["quant"] = {**data[side]["quant"], "backend": "quanto"}
    return Policy.from_dict({**data, "name": "kivi_quanto"})


def _channel_values() -> Policy:
    """partial_logquant whose values are quantized per channel (in groups of tokens)."""
    data = load_policy("partial_logquant").to_dict()
    values = {**data["values"], "quant": {**data["values"]["quant"], "axis": "channel", "group_size": 64}}
    return Policy.from_dict({**data, "name": "channel_values", "values": values})


@pytest.mark.parametrize(
    ("policy", "says"),
    [
        (_channel_values, "retains keys and values differently and its values are not quantized per token"),
        (_library_backend, "keys are quantized by QuantoQuantizer \\(backend 'quanto'\\); the replayed step reads"),
    ],
)
def test_policies_the_replayed_step_cannot_serve_are_refused(model, policy, says):
    with pytest.raises(NotSupportedError, match=says):
        policy().make_cache(model, cuda_graphs=True, max_cache_len=64)


@pytest.mark.parametrize("bad", [0, -5, 1.5, "64", True])
def test_max_cache_len_is_named_when_bad(model, bad):
    with pytest.raises(ConfigError, match="max_cache_len"):
        load_policy("kivi").make_cache(model, cuda_graphs=True, max_cache_len=bad)


@pytest.mark.parametrize("bad", ["yes", 1, None, "graphs"])
def test_cuda_graphs_must_be_true_false_or_auto(model, bad):
    with pytest.raises(ConfigError, match="cuda_graphs.*True, False or 'auto'"):
        load_policy("kivi").make_cache(model, cuda_graphs=bad)


def test_auto_is_eager_on_a_cpu_and_says_why_a_policy_is_not_served(model):
    """``make_cache(model)`` on a CPU builds the eager cache; ``serving_refusal`` names what the
    replayed step does not serve and passes what it does."""
    from kvpolicy.cache import KVPolicyCache
    from kvpolicy.cache.layers import model_layers

    cache = load_policy("logquant").make_cache(model)
    assert type(cache) is KVPolicyCache and not load_policy("logquant").graphs_serve(model)
    specs = model_layers(model)
    for name in ("logquant", "kivi", "streaming", "sink_kivi", "partial_logquant"):
        assert serving_refusal(load_policy(name), model, specs, None) is None
    assert serving_refusal(load_policy("partial_logquant"), model, specs, None) is None
    assert "values are not quantized per token" in serving_refusal(_channel_values(), model, specs, None)
    assert "needs a max_cache_len" in serving_refusal(load_policy("full"), model, specs, None)
    assert serving_refusal(load_policy("full"), model, specs, 64) is None
    # "auto" does not try: the model is on a CPU; nor, on any device, with another executor
    assert auto_refusal(load_policy("logquant"), model) == "CUDA graphs need a model on one CUDA device"
    reference = Policy.from_dict({**load_policy("logquant").config.to_dict(), "executor": "reference"})
    assert "executor 'reference' was chosen" in setting_refusal(reference)


def test_packed_buffers_grow_without_max_cache_len(model, monkeypatch):
    """No declared limit: the buffers start at the prompt's packed tokens plus a headroom and
    grow by a quarter (a headroom at least) as decoding fills them, holding the same tokens as
    eager decoding."""
    monkeypatch.setattr(RingSchedule, "headroom", 32)
    grown = []
    grow = RingSchedule.grow
    monkeypatch.setattr(RingSchedule, "grow", lambda self, tokens: grown.append(grow(self, tokens)) or grown[-1])
    inputs, n = _prompt(2, 150), 90
    expected = _generate(model, inputs, load_policy("kivi").make_cache(model), n)
    cache = load_policy("kivi").make_cache(model, cuda_graphs=True)
    got = _generate(model, inputs, cache, n)
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)
    schedule, layer = cache.layers[0].ring.schedule, cache.layers[0]
    assert grown and grown == sorted(grown)  # once per schedule at least, each time larger
    # from the headroom's 32 tokens, each growth adds the larger of the headroom and a quarter
    # of the capacity (doubling would have reached 128 for the 96 packed tokens)
    assert grown == [64, 96] and len(schedule.keys.packed_pos) == 96
    assert (
        layer.ring.packed_keys.num_tokens
        == schedule.capacity
        == schedule.packed_bias.shape[1]
        >= len(schedule.keys.packed_pos)
    )
    assert layer.get_max_length() == -1  # no declared limit


def test_a_hybrid_model_is_refused():
    from tests.cache.test_hybrid import ARCHITECTURES, build

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


def _auto(model, name: str) -> StaticPolicyCache:
    """What ``make_cache(model)`` builds on CUDA (``cuda_graphs="auto"``), built on this CPU."""
    from kvpolicy.cache.layers import model_layers

    policy = load_policy(name)
    specs = model_layers(model)
    return build_static_cache(policy, model, specs, policy.build_layers(model, specs), None, fallback=True)


def _snapshot(store):
    """Positions, tensors (a packed block's codes) and the kind of each region of ``store``."""
    regions = (store.fp, store.staging, store.packed)
    return (
        [getattr(store, f).clone() for f in ("fp_pos", "staging_pos", "packed_pos")],
        [t if t is None else (t.clone() if isinstance(t, torch.Tensor) else t.codes.clone())
         for t in regions],
        [type(t).__name__ for t in regions],
    )  # fmt: skip


@pytest.mark.parametrize("name", ["kivi", "partial_logquant", "logquant_rot"])
def test_adopting_then_handing_back_restores_the_eager_stores(model, name):
    """adopt() then release() leaves every eager store as it was: positions, full-precision
    tokens and packed codes, bit for bit (for partial_logquant: values packed in the key order
    or pending go back in the value store's order; for logquant_rot: rotated blocks again)."""
    cache = _auto(model, name)
    with torch.no_grad():
        model(**_prompt(2, 301), **cache_kwargs(cache))
    before = [_snapshot(s) for layer in cache.layers for s in (layer.key_store, layer.value_store)]
    cache.adopt()
    assert all(layer.in_ring and layer.key_store.fp is None for layer in cache.layers)
    cache.release("")
    after = [_snapshot(s) for layer in cache.layers for s in (layer.key_store, layer.value_store)]
    for (pos_a, data_a, kinds_a), (pos_b, data_b, kinds_b) in zip(before, after, strict=True):
        assert kinds_a == kinds_b
        assert all(torch.equal(a, b) for a, b in zip(pos_a, pos_b, strict=True))
        for a, b in zip(data_a, data_b, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
    assert not any(layer.in_ring for layer in cache.layers) and cache.decoding.graph is None


@pytest.mark.parametrize("name", ["kivi", "logquant", "partial_logquant"])
def test_auto_hands_a_second_turn_to_the_eager_layers_and_adopts_again(model, name):
    """A second turn on a cache that decoded from its buffers: the turn runs eagerly, the next
    decode step adopts again; tokens and logits equal an eager cache's through both turns."""
    first_inputs, n = _prompt(1, 260), 40
    eager, cache = load_policy(name).make_cache(model), _auto(model, name)
    turns = []
    for c in (eager, cache):
        first = _generate(model, first_inputs, c, n)[0]
        follow = torch.randint(1, 256, (1, 70), generator=torch.Generator().manual_seed(3))
        ids = torch.cat([first[:, :-1], follow], dim=1)  # the last new token was never cached
        turns.append(_generate(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, c, n))
    assert torch.equal(turns[1][0], turns[0][0])
    torch.testing.assert_close(turns[1][1], turns[0][1], rtol=1e-5, atol=1e-5)
    assert cache.adopted and cache.eager_because is None
    assert cache.layers[0].ring.schedule.length == eager.layers[0].key_store.length


def test_auto_decodes_a_padded_batch_and_beam_search_eagerly(model):
    """Calls the replayed step does not serve run on the eager layers, with the eager cache's
    results, and the cache says why it stays eager."""
    padded = left_padded_batch([300, 200])
    expected = _generate(model, padded, load_policy("kivi").make_cache(model), 8)
    cache = _auto(model, "kivi")
    got = _generate(model, padded, cache, 8)
    assert torch.equal(got[0], expected[0]) and cache.eager_because == "a padded batch"
    assert not cache.layers[0].in_ring
    beams = {"max_new_tokens": 6, "num_beams": 2, "do_sample": False}
    with torch.no_grad():
        want = model.generate(**_prompt(1, 200), **cache_kwargs(load_policy("kivi").make_cache(model)), **beams)
        cache = _auto(model, "kivi")
        out = model.generate(**_prompt(1, 200), **cache_kwargs(cache), **beams)
    assert torch.equal(out, want) and cache.eager_because == "beam search"


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
@pytest.mark.parametrize(
    "name", ["kivi", "logquant", "streaming", "partial_logquant", "logquant_rot", "logquant_mixed"]
)
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
    assert_same_but_for_bf16_ties(got, expected)


@cuda
@pytest.mark.parametrize("name", ["kivi", "logquant", "partial_logquant", "logquant_rot"])
def test_the_default_cache_on_cuda_replays_and_grows(name, monkeypatch):
    """``make_cache(model)`` on CUDA (``cuda_graphs="auto"``): a graph cache without a declared
    limit, whose buffers grow mid-generation (a small headroom forces it) and whose step is
    captured again; the same tokens as the eager cache, logits to bf16 rounding."""
    monkeypatch.setattr(RingSchedule, "headroom", 32)
    grown = []
    grow = RingSchedule.grow
    monkeypatch.setattr(RingSchedule, "grow", lambda self, tokens: grown.append(grow(self, tokens)) or grown[-1])
    gpu = tiny_llama(dtype=torch.bfloat16).to("cuda")
    policy = Policy.load(name)
    inputs, n = _prompt(2, 150, "cuda"), 90
    expected = _generate(gpu, inputs, policy.make_cache(gpu, cuda_graphs=False), n)
    cache = policy.make_cache(gpu)
    assert isinstance(cache, StaticPolicyCache) and cache.fallback
    captures = []
    capture = cache.decoding._decode
    monkeypatch.setattr(
        cache.decoding, "_decode", lambda *a: captures.append(cache.decoding.graph is None) or capture(*a)
    )
    got = _generate(gpu, inputs, cache, n)
    # the first decode step; kivi and logquant_rot pack a block every 32 steps, so their buffers
    # grow here and the step is captured again (logquant's groups of 64 fit the first buffers)
    assert sum(captures) == 1 + len(grown)  # one schedule: one growth per step at most
    assert bool(grown) == (name in ("kivi", "logquant_rot"))
    assert cache.decoding.graph is not None and cache.eager_because is None
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1].float(), expected[1].float(), rtol=2e-2, atol=2e-2)


class _WindowForFullLayers:
    """A third party's factory for full-attention layers that keeps a full-precision window."""

    name = "third_party_full_window"
    serves = ("full_attention",)

    def build(self, plan, spec, model_config=None):
        from kvpolicy.cache.sliding import SlidingWindowLayer

        return SlidingWindowLayer(window=16)


class _FactoryPlugin:
    @kvpolicy.hookimpl
    def kvpolicy_layers(self):
        return [_WindowForFullLayers]


def test_the_graph_path_builds_the_layers_the_eager_cache_builds_and_refuses_foreign_ones():
    """Both paths take their layers from the policy's layer factories (``Policy.build_layers``):
    a plugin's factory for full-attention layers is used by the eager cache, and the graph path
    refuses it by name instead of building the policy's own layers in its place."""
    registry = kvpolicy.Registry(load_entry_points=False, plugins={"mine": _FactoryPlugin()})
    data = {**load_policy("kivi").to_dict(), "layer_types": {"full_attention": "third_party_full_window"}}
    policy = Policy.from_dict(data, registry)
    model = tiny_llama()
    eager = policy.make_cache(model, cuda_graphs=False)
    assert {type(layer).__name__ for layer in eager.layers} == {"SlidingWindowLayer"}
    with pytest.raises(NotSupportedError, match="builds a SlidingWindowLayer layer; the replayed step serves"):
        policy.make_cache(model, cuda_graphs=True)
    graphed = load_policy("kivi").make_cache(model, cuda_graphs=True)
    assert type(graphed) is StaticPolicyCache and all(type(layer) is KVPolicyLayer for layer in graphed.layers)
