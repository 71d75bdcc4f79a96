"""Stores against a slow, obviously-correct model of the same policy (hypothesis)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpolicy.config import QuantSpec
from kvpolicy.policy import Policy
from kvpolicy.quantizers.native import NativeQuantizer
from kvpolicy.selectors import LogSelector, SinkSelector, UnionSelector, WindowSelector
from kvpolicy.store import TensorStore
from tests.executors.test_executor import FakeAttention, naive_attention

backend = NativeQuantizer()


class ReferenceStore:
    """Keeps every original token; demotes by replaying the selector step by step."""

    def __init__(self, selector, demote, spec, block=None):
        self.selector, self.demote, self.spec = selector, demote, spec
        self.block = block or (spec.group_size if spec.axis == "channel" else 1)
        self.original: dict[int, torch.Tensor] = {}  # position -> [B, H, D]
        self.full: set[int] = set()
        self.queue: list[int] = []  # demoted, waiting for a whole block
        self.quantized: dict[int, torch.Tensor] = {}
        self.evicted: set[int] = set()
        self.length = 0

    def append(self, x):
        if self.length == 0:  # the sequence's prefill: LogQuant's schedule depends on its length
            self.selector = self.selector.for_prefill(x.shape[2])
        for i in range(x.shape[2]):
            self.original[self.length + i] = x[:, :, i]
            self.full.add(self.length + i)
        self.length += x.shape[2]
        keep = set(self.selector.keep(self.length).tolist())
        demoted = sorted(self.full - keep)
        self.full &= keep
        if self.demote == "evict":
            self.evicted.update(demoted)
            return
        self.queue += demoted
        while len(self.queue) >= self.block:
            block, self.queue = self.queue[: self.block], self.queue[self.block :]
            tokens = torch.stack([self.original[p] for p in block], dim=2)
            deq = backend.quantize(tokens, self.spec).dequantize()
            for i, p in enumerate(block):
                self.quantized[p] = deq[:, :, i]

    def expected(self) -> dict[int, torch.Tensor]:
        out = {p: self.original[p] for p in self.full | set(self.queue)}
        out.update(self.quantized)
        return out


selectors = st.one_of(
    st.builds(WindowSelector, size=st.integers(1, 24)),
    st.builds(LogSelector, window=st.integers(1, 12)),
    st.builds(lambda s, w: UnionSelector([SinkSelector(s), WindowSelector(w)]), st.integers(1, 4), st.integers(1, 16)),
)
specs = st.builds(
    QuantSpec,
    bits=st.sampled_from([2, 3, 4, 8]),
    group_size=st.sampled_from([4, 8, 16]),
    axis=st.sampled_from(["token", "channel"]),
)
chunks = st.lists(st.integers(1, 40), min_size=1, max_size=12)  # first = prefill, then decode/chunks


def held_tensor_bytes(store: TensorStore) -> int:
    tensors = [store.fp, store.staging, store.fp_pos, store.staging_pos, store.packed_pos]
    if store.packed is not None:
        tensors += [store.packed.codes, store.packed.scale, store.packed.zero]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@settings(max_examples=120, deadline=None)
@given(
    selector=selectors,
    spec=specs,
    demote=st.sampled_from(["quantize", "evict"]),
    steps=chunks,
    batch=st.integers(1, 3),
    heads=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_store_matches_reference_model(selector, spec, demote, steps, batch, heads, seed):
    g = torch.Generator().manual_seed(seed)
    store = TensorStore(selector, demote, spec, backend)
    reference = ReferenceStore(copy.deepcopy(selector), demote, spec)
    packed_before: set[int] = set()
    for q in steps:
        x = torch.randn(batch, heads, q, 16, generator=g)
        store.append(x)
        reference.append(x)
        view = store.view()
        tensor, positions = view.materialize()
        expected = reference.expected()
        assert sorted(positions.tolist()) == sorted(expected)
        for i, p in enumerate(positions.tolist()):
            assert torch.equal(tensor[:, :, i], expected[p]), f"position {p}"
        # full-precision region: exactly what the selector keeps among live tokens, within budget
        assert set(store.fp_pos.tolist()) == reference.full
        if selector.budget is not None:
            assert len(store.fp_pos) <= selector.budget
        # staging never holds a whole block; demoted tokens never come back
        assert len(store.staging_pos) < store.block
        packed_now = set(store.packed_pos.tolist())
        assert packed_before <= packed_now
        assert not (packed_now & set(store.fp_pos.tolist()))
        packed_before = packed_now
        assert store.evicted == len(reference.evicted)
        # nbytes is the bytes actually held by the store's tensors (its positions: the bookkeeping's)
        assert sum(store.nbytes().values()) + store.positions.nbytes() == held_tensor_bytes(store)


def test_view_taken_before_an_update_is_unchanged_by_it():
    store = TensorStore(WindowSelector(4), "quantize", QuantSpec(bits=2, group_size=4, axis="channel"), backend)
    store.append(torch.randn(1, 1, 6, 16))
    view = store.view()
    before = view.materialize()
    store.append(torch.randn(1, 1, 9, 16))
    after = view.materialize()
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_memory_stays_bounded_over_a_long_decode():
    store = TensorStore(LogSelector(8), "quantize", QuantSpec(bits=2, group_size=8, axis="channel"), backend)
    store.append(torch.randn(1, 2, 30, 16))
    for _ in range(500):
        store.append(torch.randn(1, 2, 1, 16))
    sizes = store.nbytes()
    assert len(store.fp_pos) <= 24 and len(store.staging_pos) < 8
    full_precision_token = 2 * 16 * 4
    assert sizes["full_precision"] <= 24 * full_precision_token
    # 2-bit codes: 16 channels -> 4 bytes per head per token
    assert sizes["codes"] == 2 * 4 * len(store.packed_pos)


def test_policy_stores_share_a_block_so_equal_selectors_pack_in_the_same_order():
    from kvpolicy import load_policy

    for name, block in (("kivi", 32), ("logquant", 64), ("sink_kivi", 32)):
        policy = load_policy(name)
        assert policy.demote_block() == block
        layer = policy.new_layer(head_dim=64)
        layer.update(torch.randn(2, 2, 300, 64), torch.randn(2, 2, 300, 64))
        for _ in range(77):
            layer.update(torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64))
        assert len(layer.key_store.packed_pos) % block == 0
        assert torch.equal(layer.key_store.packed_pos, layer.value_store.packed_pos)
        assert torch.equal(layer.key_store.staging_pos, layer.value_store.staging_pos)


SHIPPED = ["full", "kivi", "sink_kivi", "logquant", "partial_logquant", "streaming"]


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(SHIPPED),
    prefill=st.integers(1, 300),
    decode=st.lists(st.integers(1, 4), min_size=1, max_size=30),
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    groups=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_every_shipped_policy_matches_its_slow_reference(name, prefill, decode, batch, kv_heads, groups, seed):
    """The policy's stores and executor against the reference stores + float64 attention."""
    g = torch.Generator().manual_seed(seed)
    layer = Policy.load(name).new_layer(head_dim=64)
    references = [
        ReferenceStore(copy.deepcopy(store.selector), store.demote, store.spec, store.block)
        for store in (layer.key_store, layer.value_store)
    ]
    past = 0
    for q in [prefill, *decode]:
        keys, values = torch.randn(2, batch, kv_heads, q, 64, generator=g)
        query = torch.randn(batch, kv_heads * groups, q, 64, generator=g)
        held_k, held_v = (r.expected() for r in references)
        step = layer.update(keys, values)[0]._kvpolicy_step[0]
        out = layer.executor.attend(FakeAttention(groups), query, step, None, scaling=0.125)
        positions = sorted(held_k)
        assert positions == sorted(held_v)
        new_pos = list(range(past, past + q))
        all_k = torch.stack([held_k[p] for p in positions] + [keys[:, :, i] for i in range(q)], dim=2)
        all_v = torch.stack([held_v[p] for p in positions] + [values[:, :, i] for i in range(q)], dim=2)
        pad = torch.ones(batch, past + q, dtype=torch.bool)
        expected = naive_attention(query, all_k, all_v, torch.tensor(positions + new_pos), pad, past, 0.125)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4)
        for reference, store, x in zip(references, (layer.key_store, layer.value_store), (keys, values)):
            reference.append(x)
            tensor, stored_pos = store.view().materialize()
            want = reference.expected()
            assert sorted(stored_pos.tolist()) == sorted(want)
            for i, p in enumerate(stored_pos.tolist()):
                assert torch.equal(tensor[:, :, i], want[p]), f"{name}: position {p}"
        past += q


@pytest.mark.parametrize("name", ["full", "kivi"])
def test_stored_tensors_keep_no_larger_buffer_alive(name):
    """GPT-2 splits keys and values out of one fused QKV output: a store that kept those views
    would hold the whole buffer, more than ``memory()`` reports. The bytes behind every stored
    tensor are the bytes reported."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from kvpolicy import load_policy

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=64,
        vocab_size=128,
        n_positions=512,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation="sdpa",
    )
    model = GPT2LMHeadModel(config).eval()
    cache = load_policy(name).make_cache(model)
    with torch.no_grad():
        model(torch.randint(0, 128, (2, 300)), past_key_values=cache, use_cache=True)
    report = cache.memory()
    held = 0
    for layer in cache.layers:
        for store in (layer.key_store, layer.value_store):
            storages = {
                t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (store.fp, store.staging)
                if t is not None
            }
            held += sum(storages.values())
    assert held == report.bytes_by_region["full_precision"] + report.bytes_by_region["staging"]
