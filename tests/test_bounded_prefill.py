"""A batch prefilled in bounded forwards.

``generate(prefill_chunk_size=prefill_chunk_size(batch))`` keeps every prefill forward at most
``tokens_per_forward`` tokens over all rows, whatever the batch; each chunk after the first is a
multi-token step over the filled cache, padded rows included. :func:`kvpolicy.generation.prefill`
bounds it by whole rows instead: groups of rows prefilled one forward each, joined row-wise.
"""

from __future__ import annotations

import math

import attrs
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvpolicy import Policy, load_policy
from kvpolicy.errors import NotSupportedError
from kvpolicy.generation import TOKENS_PER_FORWARD, cache_kwargs, forward_cache_kwargs, prefill, prefill_chunk_size
from tests.conftest import tiny_llama


@given(batch=st.integers(1, 5000), budget=st.integers(1, 100_000))
def test_a_forward_holds_at_most_the_budget_and_as_many_tokens_per_row_as_fit(batch, budget):
    chunk = prefill_chunk_size(batch, budget)
    assert chunk >= 1
    if batch <= budget:
        assert batch * chunk <= budget < batch * (chunk + 1)
    else:  # more rows than the budget: one token per row, the least a forward can take
        assert chunk == 1


def test_the_default_budget_is_the_documented_one():
    assert prefill_chunk_size(1) == TOKENS_PER_FORWARD
    assert prefill_chunk_size(64) == TOKENS_PER_FORWARD // 64


@pytest.mark.parametrize(
    ("kwargs", "wording"),
    [
        ({"batch": 0}, "batch must be a positive integer, got 0"),
        ({"batch": 2.5}, "batch must be a positive integer, got 2.5"),
        ({"batch": True}, "batch must be a positive integer, got True"),
        ({"batch": 4, "tokens_per_forward": -8}, "tokens_per_forward must be a positive integer, got -8"),
    ],
)
def test_bad_arguments_are_named(kwargs, wording):
    with pytest.raises(ValueError, match=wording):
        prefill_chunk_size(**kwargs)


def _padded_batch(lengths: list[int], vocab: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(ids, mask)`` of random prompts of ``lengths`` tokens."""
    g = torch.Generator().manual_seed(sum(lengths))
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(1, vocab, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


def _generate(model, ids, mask, policy: Policy | None, chunk: int | None, new_tokens: int = 6):
    extra = {} if policy is None else cache_kwargs(policy.make_cache(model))
    if chunk is not None:
        extra["prefill_chunk_size"] = chunk
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0, **extra,
    )  # fmt: skip
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, 1)


def _with_executor(name: str, executor: str) -> Policy:
    policy = load_policy(name)
    return Policy(attrs.evolve(policy.config, executor=executor), policy.registry)


@pytest.mark.parametrize("name", ["kivi", "logquant", "sink_kivi", "streaming"])
def test_a_padded_batch_prefills_in_forwards_of_bounded_size(name):
    """Five left-padded prompts of up to 300 tokens, 120 tokens per forward: every prefill
    forward holds at most 120 tokens, the prompt takes ceil(300 / 24) forwards, and the
    default executor's logits equal the reference executor's under the same chunks."""
    model = tiny_llama(seed=3)
    ids, mask = _padded_batch([300, 260, 181, 300, 97])
    chunk = prefill_chunk_size(ids.shape[0], tokens_per_forward=120)
    assert chunk == 24
    sizes: list[int] = []
    hook = model.model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(math.prod((args[0] if args else kwargs["hidden_states"]).shape[:2])),
        with_kwargs=True,
    )
    try:
        tokens, logits = _generate(model, ids, mask, _with_executor(name, "auto"), chunk)
    finally:
        hook.remove()
    prefill = [n for n in sizes if n > ids.shape[0]]  # decode steps hold one token per row
    assert len(prefill) == math.ceil(300 / chunk)  # 12 chunks of 24 tokens per row, one of 12
    assert len(sizes) == len(prefill) + 5  # then five decode steps
    assert max(sizes) <= 120
    want_tokens, want_logits = _generate(model, ids, mask, _with_executor(name, "reference"), chunk)
    assert torch.allclose(logits, want_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, want_tokens)


def test_a_policy_that_keeps_everything_prefilled_in_chunks_equals_one_dynamic_cache_forward():
    """``full`` with a chunked prefill gives DynamicCache's one-forward answer on a padded batch."""
    model = tiny_llama(seed=4)
    ids, mask = _padded_batch([150, 64, 150, 9])
    chunk = prefill_chunk_size(ids.shape[0], tokens_per_forward=100)
    tokens, logits = _generate(model, ids, mask, load_policy("full"), chunk)
    want_tokens, want_logits = _generate(model, ids, mask, None, None)
    assert torch.equal(tokens, want_tokens)
    assert torch.allclose(logits, want_logits, atol=1e-4, rtol=1e-4)


def _generate_from(model, ids, cache, new_tokens: int):
    """``generate()`` of unpadded ``ids`` going on from ``cache``: ``(new tokens, logits)``."""
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0, **cache_kwargs(cache),
    )  # fmt: skip
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, 1)


def _rows_prefilled(model, ids, new_cache, tokens_per_forward: int, new_tokens: int = 6):
    """``generate()`` after :func:`prefill`: ``(new tokens, logits, cache, forward sizes of the prefill)``."""
    sizes: list[int] = []
    hook = model.model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(math.prod((args[0] if args else kwargs["hidden_states"]).shape[:2])),
        with_kwargs=True,
    )
    try:
        cache = prefill(model, new_cache, ids, tokens_per_forward=tokens_per_forward)
    finally:
        hook.remove()
    return (*_generate_from(model, ids, cache, new_tokens), cache, sizes)


def _one_forward_prefilled(model, ids, cache, new_tokens: int = 6):
    """The reference of a row-wise prefill: every row's prompt but its last token in one
    forward into ``cache``, then the same ``generate()``: ``(new tokens, logits)``."""
    with torch.no_grad():
        model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1, **forward_cache_kwargs(model, cache))
    return _generate_from(model, ids, cache, new_tokens)


@pytest.mark.parametrize("name", ["logquant", "kivi", "partial_logquant", "dynamic"])
def test_rows_prefilled_in_groups_decode_as_the_whole_batch_prefilled_in_one_forward(name):
    """Five prompts of 200 tokens, 420 tokens per forward: groups of 2, 2 and 1 rows, each one
    forward of 199 tokens a row; the joined cache then decodes the tokens and logits (and, for
    a policy, holds the bytes) of one forward of all five rows with the same last step."""
    model = tiny_llama(seed=5)
    ids = torch.randint(1, 256, (5, 200), generator=torch.Generator().manual_seed(5))
    if name == "dynamic":
        from transformers import DynamicCache

        def new_cache():
            return DynamicCache(config=model.config)
    else:

        def new_cache():
            return load_policy(name).make_cache(model)

    tokens, logits, cache, sizes = _rows_prefilled(model, ids, new_cache, tokens_per_forward=420)
    assert sizes == [2 * 199, 2 * 199, 199]
    whole = new_cache()  # the reference: every row in one forward, then the same generate()
    want_tokens, want_logits = _one_forward_prefilled(model, ids, whole)
    assert torch.equal(tokens, want_tokens)
    assert torch.allclose(logits, want_logits, atol=1e-4, rtol=1e-4)
    if name != "dynamic":
        assert cache.memory() == whole.memory()


def test_rows_prefilled_with_a_policy_that_keeps_everything_equal_one_dynamic_cache_generate():
    model = tiny_llama(seed=6)
    ids = torch.randint(1, 256, (3, 90), generator=torch.Generator().manual_seed(6))
    tokens, logits, _, sizes = _rows_prefilled(model, ids, lambda: load_policy("full").make_cache(model), 100)
    assert sizes == [89, 89, 89]
    want_tokens, want_logits = _generate(model, ids, torch.ones_like(ids), None, None)
    assert torch.equal(tokens, want_tokens)
    assert torch.allclose(logits, want_logits, atol=1e-4, rtol=1e-4)


def test_prefill_refuses_a_padded_batch_and_names_bad_arguments():
    model = tiny_llama(seed=7)
    ids, mask = _padded_batch([40, 30])
    with pytest.raises(NotSupportedError, match="padded"):
        prefill(model, lambda: load_policy("kivi").make_cache(model), ids, attention_mask=mask)
    with pytest.raises(ValueError, match="tokens_per_forward must be a positive integer, got 0"):
        prefill(model, lambda: load_policy("kivi").make_cache(model), ids, tokens_per_forward=0)


def test_caches_of_prompts_of_different_lengths_are_not_joined():
    model = tiny_llama(seed=8)
    caches = []
    for length in (70, 71):
        cache = load_policy("kivi").make_cache(model)
        with torch.no_grad():
            model(input_ids=torch.ones(1, length, dtype=torch.long), **forward_cache_kwargs(model, cache))
        caches.append(cache)
    with pytest.raises(ValueError, match="same positions; one holds 70 tokens, another 71"):
        caches[0].concat_batch(caches[1:])


@pytest.mark.parametrize("kind", ["kivi", "dynamic"])
def test_rows_of_a_hybrid_model_are_joined_with_their_sliding_layers(kind):
    """Gemma 3's sliding-window layers (full precision, transformers' own layer kind) join
    row-wise beside the policy's layers: the joined cache decodes what one forward of every
    row decodes."""
    from transformers import DynamicCache

    from tests.cache.test_hybrid import ARCHITECTURES, build

    model = build(*ARCHITECTURES["gemma3"])
    ids = torch.randint(1, 200, (3, 80), generator=torch.Generator().manual_seed(9))

    def new_cache():
        return DynamicCache(config=model.config) if kind == "dynamic" else load_policy(kind).make_cache(model)

    tokens, logits, _, sizes = _rows_prefilled(model, ids, new_cache, tokens_per_forward=100)
    assert sizes == [79, 79, 79]
    whole = new_cache()
    want_tokens, want_logits = _one_forward_prefilled(model, ids, whole)
    assert torch.equal(tokens, want_tokens)
    assert torch.allclose(logits, want_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the joined cache then decodes from a CUDA graph")
@pytest.mark.parametrize("name", ["logquant", "kivi", "partial_logquant"])
def test_rows_joined_on_cuda_decode_from_a_graph_as_one_forward_of_every_row(name):
    model = tiny_llama(seed=10).cuda()
    ids = torch.randint(1, 256, (5, 300), generator=torch.Generator().manual_seed(10)).cuda()
    tokens, logits, cache, sizes = _rows_prefilled(model, ids, lambda: load_policy(name).make_cache(model), 700, 12)
    assert sizes == [2 * 299, 2 * 299, 299]
    assert cache.adopted  # decoded from the CUDA-graph buffers
    whole = load_policy(name).make_cache(model)
    want_tokens, want_logits = _one_forward_prefilled(model, ids, whole, 12)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logits, want_logits, rtol=1e-3, atol=1e-3)
