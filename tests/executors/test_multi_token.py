"""Multi-token steps (a prefill, a chunked prefill, a second turn) on the default executor.

The full-precision part goes through PyTorch's SDPA kernels with their log-sum-exp
(:func:`kvpolicy.executors.partial.sdpa_partial`), the packed part is dequantized a chunk at a
time, and nothing holds a score matrix. Checked against float64 attention over the same
stored tokens, on CPU in CI and on CUDA on the device.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpolicy import Policy, load_policy
from kvpolicy.executors import AutoExecutor, ChunkedExecutor, ReferenceExecutor
from kvpolicy.executors import partial as pa
from tests.executors.test_executor import FakeAttention, naive_attention, random_left_padding

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


def float64_partial(query, keys, values, scaling, allowed, is_causal):
    """``(o, lse)`` in float64: the yardstick of :func:`pa.sdpa_partial`."""
    scores = torch.einsum("bhrd,bhnd->bhrn", query.double(), keys.double()) * scaling
    r, n = scores.shape[-2:]
    if is_causal:
        allowed_c = torch.arange(n, device=query.device)[None, :] <= torch.arange(r, device=query.device)[:, None]
        allowed = allowed_c[None, None] if allowed is None else allowed & allowed_c
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    weights = torch.nan_to_num(torch.exp(scores - lse.unsqueeze(-1)))
    return weights @ values.double(), lse


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["all", "causal", "mask", "mask_with_empty_rows"])
@pytest.mark.parametrize("kernels", [True, False])
def test_sdpa_partial_matches_float64(device, dtype, kind, kernels, monkeypatch):
    if not kernels:  # the row-blocked fallback where no kernel serves
        monkeypatch.setattr(pa, "_kernel_partial", lambda *a: None)
    g = torch.Generator().manual_seed(hash((dtype, kind)) % 2**16)
    b, h, r, n, d = 2, 3, 37, 37 if kind == "causal" else 53, 64
    query, keys, values = (torch.randn(b, h, x, d, generator=g) for x in (r, n, n))
    allowed = None
    if kind.startswith("mask"):
        allowed = torch.rand(b, 1, r, n, generator=g) > 0.4
        if kind == "mask_with_empty_rows":
            allowed[0, 0, :5] = False
    query, keys, values = (t.to(device, dtype) for t in (query, keys, values))
    allowed = None if allowed is None else allowed.to(device)
    out, lse = pa.sdpa_partial(query, keys, values, 0.125, allowed, is_causal=kind == "causal")
    want_out, want_lse = float64_partial(query, keys, values, 0.125, allowed, kind == "causal")
    assert out.dtype == lse.dtype == torch.float32
    assert out.shape == (b, h, r, d) and lse.shape == (b, h, r)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    seen = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), seen)  # a row that sees nothing: lse -inf, output 0
    assert torch.allclose(lse[seen].double(), want_lse[seen], atol=tol, rtol=tol)
    assert torch.allclose(out.double(), want_out, atol=tol, rtol=tol)


def _second_turn(policy: Policy, device, dtype, batch, groups, first, second, padded, seed):
    """A layer filled by a ``first``-token prefill, then a ``second``-token step (a second turn):
    ``(executor output, float64 attention, rows that are real tokens)``."""
    g = torch.Generator().manual_seed(seed)
    layer = policy.new_layer(head_dim=64)
    module = FakeAttention(groups)
    total = first + second
    pad = random_left_padding(batch, total, first, g) if padded else torch.ones(batch, total, dtype=torch.bool)
    past = 0
    for q in (first, second):
        keys, values = (torch.randn(2, batch, 2, q, 64, generator=g) * 2).to(device, dtype)
        query = torch.randn(batch, 2 * groups, q, 64, generator=g).to(device, dtype)
        step = layer.update(keys, values)[0]._kvpolicy_step[0]
        causal = torch.arange(past + q)[None, :] <= torch.arange(past, past + q)[:, None]
        mask = (causal[None, None] & pad[:, None, None, : past + q]).to(device) if padded else None
        got = layer.executor.attend(module, query, step, mask, scaling=0.125)
        past += q
    cached_k, pos = step.keys.materialize()
    cached_v, _ = step.values.materialize()
    order = torch.argsort(pos)
    pos_v = step.values.materialize()[1]
    order_v = torch.argsort(pos_v)
    keys_all = torch.cat([cached_k[:, :, order], step.new_keys], 2)
    values_all = torch.cat([cached_v[:, :, order_v], step.new_values], 2)
    positions = torch.cat([pos[order].long(), torch.arange(first, total)])
    expected = naive_attention(query.cpu(), keys_all.cpu(), values_all.cpu(), positions, pad, first, 0.125)
    return got.cpu(), expected, pad[:, first:]


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(["logquant", "partial_logquant", "kivi", "sink_kivi", "streaming"]),
    first=st.integers(130, 400),
    second=st.integers(2, 200),
    batch=st.integers(1, 2),
    groups=st.sampled_from([1, 4]),
    padded=st.booleans(),
    rows=st.sampled_from([16, 10**6]),
    seed=st.integers(0, 2**16),
)
def test_second_turn_matches_float64(name, first, second, batch, groups, padded, rows, seed):
    """A multi-token step over a filled cache (packed tokens, kept tokens, staging), in blocks
    of ``rows`` query rows (16: many blocks), on the policy as shipped (executor ``auto``)."""
    policy = load_policy(name)
    assert isinstance(policy.new_layer(64).executor, AutoExecutor)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pa, "PIECE_BYTES", rows * 4 * batch * 2 * groups * 64)
        got, expected, real = _second_turn(policy, "cpu", torch.float32, batch, groups, first, second, padded, seed)
    assert torch.allclose(got[real].double(), expected[real], atol=1e-4, rtol=1e-3)


def test_multi_token_steps_hold_no_score_matrix_and_no_whole_cache(monkeypatch):
    """Every piece of a second turn goes through the SDPA kernels (never the float32 score
    path), and the packed region is dequantized ``chunk_tokens`` at a time, never whole."""
    from kvpolicy.quantizers.native import NativePacked
    from kvpolicy.store import TensorView

    layer = Policy.from_dict(
        {**load_policy("kivi").to_dict(), "executor": {"type": "chunked", "chunk_tokens": 64}}
    ).new_layer(64)
    assert layer.executor.chunk_tokens == 64
    layer.update(torch.randn(1, 2, 600, 64), torch.randn(1, 2, 600, 64))
    keys, _ = layer.update(torch.randn(1, 2, 300, 64), torch.randn(1, 2, 300, 64))
    step = keys._kvpolicy_step[0]

    def refuse(*args, **kwargs):
        raise AssertionError("a score matrix in float32")

    dequantized = []
    original = NativePacked.dequantize

    def counted(self):
        dequantized.append(self.num_tokens)
        return original(self)

    monkeypatch.setattr(pa, "partial", refuse)
    monkeypatch.setattr(TensorView, "materialize", refuse)
    monkeypatch.setattr(NativePacked, "dequantize", counted)
    out = layer.executor.attend(FakeAttention(2), torch.randn(1, 4, 300, 64), step, None, scaling=0.125)
    assert out.shape == (1, 300, 4, 64)
    assert dequantized and max(dequantized) <= 64  # chunk by chunk
    assert sum(dequantized) == 2 * step.keys.packed.num_tokens  # keys and values, each token once


@pytest.mark.parametrize("name", ["logquant", "kivi", "streaming", "full"])
def test_first_prefill_is_exactly_sdpa(name):
    """A first prefill reads no cache: the default executor gives SDPA's output bit for bit,
    so a prompt longer than the budget costs what DynamicCache's prefill costs."""
    layer = load_policy(name).new_layer(64)
    keys, values = torch.randn(2, 1, 2, 500, 64)
    query = torch.randn(1, 8, 500, 64)
    step = layer.update(keys, values)[0]._kvpolicy_step[0]
    got = layer.executor.attend(FakeAttention(4), query, step, None, scaling=0.125)
    expected = ReferenceExecutor().attend(FakeAttention(4), query, step, None, scaling=0.125)
    assert torch.equal(got, expected)


def test_auto_resolves_per_device():
    assert AutoExecutor.resolves_to("cpu").startswith("chunked")
    assert isinstance(AutoExecutor(), ChunkedExecutor)


@cuda
@pytest.mark.parametrize("name", ["logquant", "partial_logquant", "kivi"])
@pytest.mark.parametrize("padded", [False, True])
def test_second_turn_on_cuda_matches_float64(name, padded):
    """The CUDA kernels (flash without a mask, memory-efficient with one) in bf16."""
    got, expected, real = _second_turn(load_policy(name), "cuda", torch.bfloat16, 2, 4, 700, 300, padded, seed=3)
    err = (got[real].double() - expected[real]).norm() / expected[real].norm()
    assert err < 1e-2, err


def test_packed_chunks_shrink_with_the_batch(monkeypatch):
    """A chunk's dequantized keys and values stay under PIECE_BYTES at any batch, in whole
    per-channel groups (the kernel reads keys group by group)."""
    layer = load_policy("kivi").new_layer(64)  # key groups of 32 tokens along the channel axis
    layer.update(torch.randn(4, 2, 700, 64), torch.randn(4, 2, 700, 64))
    packed = layer.key_store.packed
    executor = layer.executor
    assert executor.tokens_per_chunk(packed) == executor.chunk_tokens  # small batch: the setting
    per_token = 2 * 4 * 4 * 2 * 64  # keys and values, float32, batch 4, 2 heads of 64
    monkeypatch.setattr(pa, "PIECE_BYTES", 100 * per_token)
    assert executor.tokens_per_chunk(packed) == 96  # 100 tokens fit: three groups of 32
    monkeypatch.setattr(pa, "PIECE_BYTES", 1)
    assert executor.tokens_per_chunk(packed) == 32  # never less than one group


@pytest.mark.parametrize("name", ["logquant", "partial_logquant", "kivi"])
def test_chunked_prefill_through_generate_matches_the_reference_executor(name):
    """``generate(prefill_chunk_size=...)``: every chunk after the first is a multi-token step
    over a filled cache (transformers hands it a plain causal mask); the default executor's
    logits equal the reference executor's within float32 rounding."""
    import attrs

    from kvpolicy.generation import cache_kwargs
    from tests.conftest import tiny_llama

    model = tiny_llama(seed=2)
    ids = torch.randint(1, 256, (2, 700), generator=torch.Generator().manual_seed(0))
    logits = {}
    for executor in ("auto", "reference"):
        policy = load_policy(name)
        policy = Policy(attrs.evolve(policy.config, executor=executor), policy.registry)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, prefill_chunk_size=128,
            output_logits=True, return_dict_in_generate=True, **cache_kwargs(policy.make_cache(model)),
        )  # fmt: skip
        logits[executor] = torch.stack(out.logits)
    assert torch.allclose(logits["auto"], logits["reference"], atol=1e-4, rtol=1e-4)


def test_a_plain_causal_mask_is_dropped_and_any_other_kept():
    from kvpolicy.executors import is_plain_causal

    past, q = 5, 3
    causal = torch.arange(past + q)[None, :] <= torch.arange(past, past + q)[:, None]
    assert is_plain_causal(None, past, q)
    assert is_plain_causal(causal[None, None].expand(2, 1, q, past + q), past, q)
    padded = causal[None, None].repeat(2, 1, 1, 1)
    padded[1, :, :, 0] = False
    assert not is_plain_causal(padded, past, q)
