"""Rotation before quantization: the Hadamard transform is orthonormal, a rotated store
round-trips, attention is unchanged by rotation in full precision, and rotation lowers the
error of quantizing a tensor with an outlier channel."""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpolicy import Policy
from kvpolicy.config import QuantSpec
from kvpolicy.errors import ConfigError
from kvpolicy.quantizers.native import NativeQuantizer
from kvpolicy.quantizers.rotation import hadamard
from kvpolicy.selectors import WindowSelector
from kvpolicy.store import TensorStore
from tests.cache.test_cache import greedy, left_padded_batch
from tests.cache.test_hybrid import build


@pytest.mark.parametrize("d", [1, 2, 16, 64, 256])
def test_hadamard_is_orthonormal_and_fixed(d):
    h = hadamard(d)
    assert torch.allclose(h @ h.T, torch.eye(d), atol=1e-6)
    assert torch.equal(h, hadamard(d))
    assert torch.allclose(h.abs(), torch.full((d, d), d**-0.5))


@settings(max_examples=50, deadline=None)
@given(d=st.sampled_from([8, 32, 64]), n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_rotating_and_rotating_back_round_trips(d, n, seed):
    x = torch.randn(2, 3, n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    h = hadamard(d).double()
    assert torch.allclose((x @ h) @ h.T, x, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(d=st.sampled_from([16, 64]), n=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_attention_over_rotated_keys_and_values_equals_attention_without_rotation(d, n, seed):
    """q.k = (qR).(kR) and softmax(.)V R R^T = softmax(.)V: in full precision, attending rotated
    keys with a rotated query and rotating the output back changes nothing."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, m, d, generator=g, dtype=torch.float64) for m in (3, n, n))
    r = hadamard(d).double()
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    rotated = torch.nn.functional.scaled_dot_product_attention(q @ r, k @ r, v @ r) @ r.T
    assert torch.allclose(plain, rotated, atol=1e-10)


def test_a_rotated_store_packs_rotated_codes_and_reads_tokens_back_unrotated():
    spec = QuantSpec(bits=8, group_size=16, axis="token", rotate="hadamard")
    store = TensorStore(WindowSelector(4), "quantize", spec, NativeQuantizer())
    x = torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(0))
    store.append(x)
    got, positions = store.view().materialize()
    expected = x[:, :, positions.long()]
    assert torch.allclose(got, expected, atol=0.05)  # 8 bits: close to what was written
    # what is packed is the rotated tokens, not the tokens
    plain = NativeQuantizer().quantize(x[:, :, :36], attrs.evolve(spec, rotate="none"))
    assert plain.rotation is None and torch.equal(store.packed.rotation, hadamard(16))
    assert not torch.equal(store.packed.codes, plain.codes)
    # the stored tokens are the rotated ones; dequantize rotates back
    torch.testing.assert_close(store.packed.dequantize_stored().float() @ hadamard(16).T, store.packed.dequantize())


def test_rotation_lowers_the_error_of_an_outlier_channel_at_two_bits():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 256, 64, generator=g)
    x[..., 7] *= 30  # one outlier channel, as keys have
    spec = QuantSpec(bits=2, group_size=64, axis="token")
    plain = NativeQuantizer().quantize(x, spec).dequantize()
    rotated = NativeQuantizer().quantize(x, attrs.evolve(spec, rotate="hadamard")).dequantize()
    error = lambda y: float((y - x).norm() / x.norm())  # noqa: E731
    assert error(rotated) < 0.7 * error(plain)  # measured: 0.30 against 0.54


def _rotating_kivi(**quant) -> Policy:
    data = Policy.load("kivi").to_dict()
    for side in ("keys", "values"):
        data[side]["quant"].update(quant)
    return Policy.from_dict(data)


def test_rotation_is_written_and_read_back_and_a_bad_value_is_named():
    policy = _rotating_kivi(rotate="hadamard")
    assert policy.to_dict()["keys"]["quant"]["rotate"] == "hadamard"
    assert "rotate" not in Policy.load("kivi").to_dict()["keys"]["quant"]
    with pytest.raises(ConfigError, match="values.quant.rotate: got 'fourier'.*none | hadamard"):
        _rotating_kivi(rotate="fourier")


def test_rotation_needs_a_power_of_two_head_dim():
    model = build("LlamaConfig", "LlamaForCausalLM", dict(num_hidden_layers=1, head_dim=24))
    with pytest.raises(ConfigError, match="keys.quant.rotate: got 'hadamard'.*power-of-two head_dim \\(it is 24\\)"):
        _rotating_kivi(rotate="hadamard", group_size=8).make_cache(model)


@pytest.mark.parametrize("executor", ["reference", "chunked", "fused"])
def test_a_rotating_policy_generates_on_every_executor_and_they_agree(executor):
    """On CPU the fused executor's steps take the chunked path, so all three read the same dequantized tokens."""
    model = build("LlamaConfig", "LlamaForCausalLM", dict(num_hidden_layers=2))
    inputs = left_padded_batch([60, 200])
    data = _rotating_kivi(rotate="hadamard", group_size=16).to_dict()
    for side in ("keys", "values"):
        data[side]["retain"] = [{"type": "window", "size": 16}]
    reference = greedy(model, inputs, Policy.from_dict({**data, "executor": "reference"}).make_cache(model), n=12)
    got = greedy(model, inputs, Policy.from_dict({**data, "executor": executor}).make_cache(model), n=12)
    assert torch.equal(got, reference)


def _emulated_decode_attention(calls):
    """A torch stand-in for :func:`decode.decode_attention` (no biases, no value rows): what the
    kernels compute from the codes and tensors they are handed, recording what they were handed."""

    def attend(query, full, keys, values, scaling, fp_bias=None, packed_bias=None, value_rows=None, kernel=None):
        assert fp_bias is None and packed_bias is None and value_rows is None
        calls.append((type(keys).__name__, type(values).__name__, keys.rotation is not None))
        k = torch.cat([keys.dequantize_stored(), *(k for k, _ in full)], 2).double()  # codes as stored
        v = torch.cat([values.dequantize_stored(), *(v for _, v in full)], 2).double()
        groups = query.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        weights = torch.softmax(torch.einsum("bhqd,bhnd->bhqn", query.double(), k) * scaling, -1)
        return torch.einsum("bhqn,bhnd->bhqd", weights, v).transpose(1, 2).to(query.dtype)

    return attend


@pytest.mark.parametrize("rotate", ["none", "hadamard"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_fused_step_hands_the_kernels_rotated_codes_and_rotates_the_output_back(monkeypatch, rotate, head_dim):
    """The fused executor's decode step, with the kernels replaced by a torch emulation (CPU, CI):
    the kernels get the stored native codes (rotated ones where the policy rotates, read as
    stored, the rotation recorded in the block) and the result equals float64
    attention over the dequantized, rotated-back tokens. The same test on the device runs the
    real kernels (``test_the_fused_kernels_read_rotated_codes_on_cuda``)."""
    from kvpolicy.executors.kernels import common, decode
    from tests.executor_cases import run_case

    calls: list = []
    monkeypatch.setattr(common, "interpreted", lambda: True)
    monkeypatch.setattr("kvpolicy.executors.fused.triton_available", lambda: True)
    monkeypatch.setattr(decode, "decode_attention", _emulated_decode_attention(calls))
    shape = (2, 2, 2, head_dim, 150, 2, 2, 32, 32, False, "window")
    rel, _ = run_case("cpu", torch.float32, *shape, seed=3, rotate=rotate)
    assert calls == [("NativePacked", "NativePacked", rotate == "hadamard")]
    assert rel < 1e-5, rel


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("retention", ["window", "log"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_the_fused_kernels_read_rotated_codes_on_cuda(retention, head_dim):
    """Rotated policies on the real kernels against float64 attention over the rotated-back
    tokens: batches with left padding, bf16, 2 and 4 bits, keys and values paired or not."""
    from tests.executor_cases import kernel_calls, run_case

    with kernel_calls() as calls:
        for seed, (bits, padded) in enumerate([((2, 2), False), ((2, 2), True), ((4, 2), True)]):
            rel, _ = run_case("cuda", torch.bfloat16, 3, 2, 4, head_dim, 1000, *bits, 32, 32, padded, retention,
                              seed=seed, rotate="hadamard")  # fmt: skip
            assert rel <= 1e-2, (bits, padded, rel)
    assert len(calls) == 3


def _qk_norm_models():
    from transformers import (
        HunYuanDenseV1Config,
        HunYuanDenseV1ForCausalLM,
        PersimmonConfig,
        PersimmonForCausalLM,
        StableLmConfig,
        StableLmForCausalLM,
    )

    small = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return {
        "stablelm (k_layernorm)": lambda: StableLmForCausalLM(StableLmConfig(**small, qk_layernorm=True)),
        "persimmon (k_layernorm)": lambda: PersimmonForCausalLM(PersimmonConfig(**small, qk_layernorm=True)),
        "hunyuan dense (key_layernorm)": lambda: HunYuanDenseV1ForCausalLM(HunYuanDenseV1Config(**small, head_dim=32)),
    }


@pytest.mark.parametrize("family", list(_qk_norm_models()))
def test_rotate_auto_leaves_keys_of_qk_norm_models_unrotated_whatever_the_norm_is_called(family):
    from kvpolicy.cache.layers import model_layers
    from kvpolicy.config import QuantSpec
    from kvpolicy.policy import layer_quant

    specs = model_layers(_qk_norm_models()[family]())
    assert all(spec.normalized_keys for spec in specs)
    auto = QuantSpec(bits=2, group_size=32, axis="channel", rotate="auto")
    assert {layer_quant(auto, spec.head_dim, spec.normalized_keys).rotate for spec in specs} == {"none"}


def test_rotate_auto_leaves_biased_keys_unrotated_and_still_rotates_their_values():
    """Qwen2's key projection adds a bias; ``auto`` keeps those keys in per-channel groups
    unrotated, and rotates values and the keys of a model without the bias."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from kvpolicy import load_policy
    from kvpolicy.cache.layers import model_layers

    small = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    qwen = Qwen2ForCausalLM(Qwen2Config(**small, num_key_value_heads=1))
    llama = LlamaForCausalLM(LlamaConfig(**small, num_key_value_heads=1))
    assert [spec.biased_keys for spec in model_layers(qwen)] == [True, True]
    assert [spec.biased_keys for spec in model_layers(llama)] == [False, False]
    policy = load_policy("logquant_mixed")  # keys `rotate: auto`, values `rotate: hadamard`
    for model, keys_rotated in ((qwen, False), (llama, True)):
        cache = policy.make_cache(model, cuda_graphs=False)
        for layer in cache.layers:
            assert (layer.key_store.spec.rotate == "hadamard") is keys_rotated
            assert layer.value_store.spec.rotate == "hadamard"


@pytest.mark.parametrize("backend", ["quanto", "hqq"])
def test_a_backend_that_does_not_rotate_refuses_rotate_and_names_what_it_takes(backend):
    data = Policy.load("kivi").to_dict()
    data["keys"]["quant"].update(backend=backend, rotate="hadamard")
    with pytest.raises(ConfigError, match=f"keys.quant.rotate.*none for backend '{backend}'"):
        Policy.from_dict(data)
