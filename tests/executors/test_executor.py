"""The reference executor against a naive float64 attention over the same stored tokens."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpolicy import Policy
from kvpolicy.store.positions import Positions

POLICY_YAMLS = {
    "kivi": {"retain": [{"type": "window", "size": 8}], "quant": {"bits": 2, "group_size": 8, "axis": "channel"}},
    "log": {"retain": [{"type": "log", "window": 4}], "quant": {"bits": 2, "group_size": 8, "axis": "channel"}},
    "evict": {"retain": [{"type": "sink", "size": 2}, {"type": "window", "size": 6}], "demote": "evict"},
}


class FakeAttention(torch.nn.Module):
    """What transformers' SDPA attention reads from the attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def random_left_padding(batch: int, total: int, prefill: int, g: torch.Generator) -> torch.Tensor:
    """``[batch, total]`` bool, True = real token; each row starts with 0..prefill-1 padding tokens."""
    pad = torch.ones(batch, total, dtype=torch.bool)
    for row in range(batch):
        pad[row, : int(torch.randint(0, prefill, (1,), generator=g))] = False
    return pad


def naive_attention(query, keys, values, positions, pad, past, scaling):
    """float64 softmax(q k^T) v over explicit positions; ``pad``: [B, past+q] bool, True = real token."""
    b, hq, q, d = query.shape
    groups = hq // keys.shape[1]
    k = keys.double().repeat_interleave(groups, dim=1)
    v = values.double().repeat_interleave(groups, dim=1)
    scores = torch.einsum("bhqd,bhnd->bhqn", query.double(), k) * scaling
    query_pos = torch.arange(past, past + q)
    allowed = (positions[None, :] <= query_pos[:, None])[None, None] & pad[:, positions][:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqn,bhnd->bhqd", torch.softmax(scores, dim=-1), v).transpose(1, 2)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(sorted(POLICY_YAMLS)),
    prefill=st.integers(1, 40),
    decode=st.lists(st.integers(1, 3), min_size=1, max_size=8),
    batch=st.integers(1, 3),
    groups=st.sampled_from([1, 2]),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_reference_matches_naive_attention(kind, prefill, decode, batch, groups, padded, seed):
    g = torch.Generator().manual_seed(seed)
    tensor = POLICY_YAMLS[kind]
    policy = Policy.from_dict({"name": kind, "keys": tensor, "values": tensor})
    layer = policy.new_layer(head_dim=16)
    module = FakeAttention(groups)
    kv_heads, d = 2, 16
    total = prefill + sum(decode)
    pad = random_left_padding(batch, total, prefill, g) if padded else torch.ones(batch, total, dtype=torch.bool)
    past = 0
    for q in [prefill, *decode]:
        keys = torch.randn(batch, kv_heads, q, d, generator=g)
        values = torch.randn(batch, kv_heads, q, d, generator=g)
        query = torch.randn(batch, kv_heads * groups, q, d, generator=g)
        tagged_keys, _ = layer.update(keys, values)
        step = tagged_keys._kvpolicy_step[0]
        query_pos = torch.arange(past, past + q)
        mask = (torch.arange(past + q)[None, :] <= query_pos[:, None])[None, None] & pad[:, None, None, : past + q]
        scaling = 1 / math.sqrt(d)
        out = layer.executor.attend(module, query, step, mask, scaling=scaling)
        # expected: the snapshot's tokens (dequantized by the store itself) + the new ones
        cached_k, pos = step.keys.materialize()
        cached_v, pos_v = step.values.materialize()
        order_v = torch.argsort(pos_v)
        order_k = torch.argsort(pos)
        all_k = keys if cached_k is None else torch.cat([cached_k[:, :, order_k], keys], dim=2)
        all_v = values if cached_v is None else torch.cat([cached_v[:, :, order_v], values], dim=2)
        positions = torch.cat([pos[order_k].long(), query_pos])
        expected = naive_attention(query, all_k, all_v, positions, pad[:, : past + q], past, scaling)
        real_rows = pad[:, past : past + q]  # fully padded query rows are undefined; skip them
        assert torch.allclose(out.double()[real_rows], expected[real_rows], atol=1e-5, rtol=1e-4)
        past += q
    assert layer.get_seq_length() == total


def test_evicting_policy_attends_to_fewer_tokens_than_it_has_seen():
    tensor = POLICY_YAMLS["evict"]
    layer = Policy.from_dict({"name": "e", "keys": tensor, "values": tensor}).new_layer(head_dim=16)
    layer.update(torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16))
    keys, _ = layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    step = keys._kvpolicy_step[0]
    assert len(step.keys) == 8 and step.past_length == 30
    assert sorted(step.keys.fp_pos.tolist()) == [0, 1, 24, 25, 26, 27, 28, 29]


def test_mismatched_key_value_positions_are_refused():
    policy = Policy.from_dict(
        {
            "name": "asym",
            "keys": {"retain": [{"type": "window", "size": 4}], "quant": {"group_size": 16}},
            "values": {"retain": [{"type": "window", "size": 4}], "quant": {"group_size": 16}},
        }
    )
    layer = policy.new_layer(head_dim=16)
    keys = layer.key_store.positions  # a corrupted store: values evicted on their own, keys quantized
    layer.value_store.positions = Positions(keys.unbound_selector, "evict", keys.block)
    layer.update(torch.randn(1, 1, 10, 16), torch.randn(1, 1, 10, 16))
    keys, _ = layer.update(torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16))
    with pytest.raises(RuntimeError, match="different positions"):
        layer.executor.attend(FakeAttention(1), torch.randn(1, 1, 1, 16), keys._kvpolicy_step[0], None)


# keys, values: equal retention, or different (stored in different orders, paired per step)
CHUNKED_KINDS = [(kind, kind) for kind in sorted(POLICY_YAMLS)] + [("log", "kivi"), ("kivi", "log")]


@settings(max_examples=60, deadline=None)
@given(
    kinds=st.sampled_from(CHUNKED_KINDS),
    prefill=st.integers(1, 60),
    decode=st.lists(st.integers(1, 3), min_size=1, max_size=6),
    batch=st.integers(1, 3),
    groups=st.sampled_from([1, 2, 3]),
    padded=st.booleans(),
    chunk=st.sampled_from([8, 16, 4096]),
    seed=st.integers(0, 2**16),
)
def test_chunked_executor_matches_reference(kinds, prefill, decode, batch, groups, padded, chunk, seed):
    from kvpolicy.executors import ChunkedExecutor, ReferenceExecutor

    g = torch.Generator().manual_seed(seed)
    keys_yaml, values_yaml = (POLICY_YAMLS[kind] for kind in kinds)
    layer = Policy.from_dict({"name": "p", "keys": keys_yaml, "values": values_yaml}).new_layer(head_dim=16)
    chunked = ChunkedExecutor()
    chunked.chunk_tokens = chunk
    module = FakeAttention(groups)
    total = prefill + sum(decode)
    pad = random_left_padding(batch, total, prefill, g) if padded else torch.ones(batch, total, dtype=torch.bool)
    past = 0
    for q in [prefill, *decode]:
        keys, values = torch.randn(2, batch, 2, q, 16, generator=g)
        query = torch.randn(batch, 2 * groups, q, 16, generator=g)
        step = layer.update(keys, values)[0]._kvpolicy_step[0]
        causal = torch.arange(past + q)[None, :] <= torch.arange(past, past + q)[:, None]
        mask = (causal[None, None] & pad[:, None, None, : past + q]) if padded else None
        expected = ReferenceExecutor().attend(module, query, step, mask, scaling=0.25)
        got = chunked.attend(module, query, step, mask, scaling=0.25)
        real = pad[:, past : past + q]
        assert got.shape == expected.shape and got.dtype == expected.dtype
        assert torch.allclose(got[real], expected[real], atol=1e-5, rtol=1e-4)
        past += q


@pytest.mark.parametrize("kinds", [("kivi", "kivi"), ("log", "kivi")])
def test_chunked_executor_never_materializes_the_whole_cache(monkeypatch, kinds):
    from kvpolicy.executors import ChunkedExecutor
    from kvpolicy.quantizers.native import NativePacked
    from kvpolicy.store import TensorView

    def refuse(self):
        raise AssertionError("dequantizes the whole cache")

    keys_yaml, values_yaml = (POLICY_YAMLS[kind] for kind in kinds)
    policy = {"name": "k", "keys": keys_yaml, "values": values_yaml, "executor": "chunked"}
    layer = Policy.from_dict(policy).new_layer(16)
    assert isinstance(layer.executor, ChunkedExecutor)
    layer.executor.chunk_tokens = 16
    seen = []
    original_partial = __import__("kvpolicy.executors.partial", fromlist=["partial"]).partial

    def spy(query, keys, values, scaling, bias):
        seen.append(keys.shape[2])
        return original_partial(query, keys, values, scaling, bias)

    monkeypatch.setattr("kvpolicy.executors.partial.partial", spy)
    monkeypatch.setattr(TensorView, "materialize", refuse)
    layer.update(torch.randn(1, 2, 200, 16), torch.randn(1, 2, 200, 16))
    keys, _ = layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    step = keys._kvpolicy_step[0]
    monkeypatch.setattr(NativePacked, "dequantize", refuse_whole(NativePacked.dequantize, step))
    out = layer.executor.attend(FakeAttention(2), torch.randn(1, 4, 1, 16), step, None, scaling=0.25)
    assert out.shape == (1, 1, 4, 16)
    # one full-precision part (window, staging or gathered tokens, new) and packed chunks of at
    # most 16 tokens; together every cached token once
    assert max(seen[1:]) <= 16 and sum(seen) == len(step.keys) + 1
    assert seen[0] < 64  # the full-precision part stays small


def refuse_whole(dequantize, step):
    """``NativePacked.dequantize`` that fails on a store's whole packed region."""

    def guarded(packed):
        if packed is step.keys.packed or packed is step.values.packed:
            raise AssertionError("dequantizes a whole packed region")
        return dequantize(packed)

    return guarded
