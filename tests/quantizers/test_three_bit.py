"""3-bit codes in the native backend (issue #38): a 2-bit and a 1-bit plane, no bit wasted,
read by every executor: the chunked path dequantizes them, the Triton kernel reads both planes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpolicy import Policy
from kvpolicy.config import QuantSpec
from kvpolicy.errors import ConfigError
from kvpolicy.executors.kernels.common import fusable
from kvpolicy.generation import cache_kwargs
from kvpolicy.quantizers.native import NativeQuantizer, pack_codes, unpack_codes
from tests.conftest import tiny_llama


@settings(max_examples=80, deadline=None)
@given(
    bits=st.sampled_from([1, 2, 3, 4, 8]), rows=st.integers(1, 5), eighths=st.integers(1, 24), seed=st.integers(0, 99)
)
def test_codes_round_trip_in_exactly_their_bits(bits, rows, eighths, seed):
    d = 8 * eighths
    codes = torch.randint(0, 1 << bits, (2, rows, d), generator=torch.Generator().manual_seed(seed))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, rows, d * bits // 8)
    assert torch.equal(unpack_codes(packed, bits).long(), codes)


def test_three_bit_rows_are_a_two_bit_plane_then_a_one_bit_plane():
    codes = torch.tensor([[5, 3, 7, 0, 6, 1, 2, 4]])  # d = 8: 2 bytes of low bits, 1 byte of high bits
    packed = pack_codes(codes, 3)
    assert torch.equal(packed[..., :2], pack_codes(codes & 3, 2))
    assert torch.equal(packed[..., 2:], pack_codes(codes >> 2, 1))
    assert packed[0, 2].item() == 0b10010101  # high bits of channels 0..7: 1,0,1,0,1,0,0,1


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_three_bit_quantization_rounds_to_the_nearest_of_eight_levels(axis):
    """Every dequantized value is within half a step of the input (step: the group's range / 7),
    and the error lies between the 4-bit and the 2-bit error."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    errors = {}
    for bits in (2, 3, 4):
        spec = QuantSpec(bits=bits, group_size=32, axis=axis)
        packed = NativeQuantizer().quantize(x, spec)
        assert packed.codes.shape[-1] == 64 * bits // 8
        out = packed.dequantize()
        errors[bits] = (out - x).pow(2).mean().item()
        if bits == 3:
            step = packed.scale.unsqueeze(-1 if axis == "token" else -2)
            grouped = (out - x).reshape(2, 3, 64, 2, 32) if axis == "token" else (out - x).reshape(2, 3, 2, 32, 64)
            assert (grouped.abs() <= step / 2 + 1e-5).all()
    assert errors[4] < errors[3] < errors[2]


def test_native_bits_are_checked_with_the_allowed_widths_and_head_sizes():
    with pytest.raises(ConfigError, match=r"2 \| 3 \| 4 \| 8"):
        NativeQuantizer().validate(QuantSpec(bits=5, group_size=32), 64, "keys.quant")
    with pytest.raises(ConfigError, match="a multiple of 8 to pack 3-bit codes"):
        NativeQuantizer().validate(QuantSpec(bits=3, group_size=4, axis="token"), 12, "keys.quant")
    NativeQuantizer().validate(QuantSpec(bits=3, group_size=8, axis="token"), 24, "keys.quant")


def _three_bit(name: str, executor: str = "auto") -> Policy:
    data = Policy.load(name).to_dict()
    for side in ("keys", "values"):
        data[side]["quant"]["bits"] = 3
    return Policy.from_dict({**data, "name": f"{name}_3bit", "executor": {"type": executor}})


@pytest.mark.parametrize("name", ["kivi", "logquant", "partial_logquant"])
def test_a_three_bit_policy_decodes_as_the_reference_executor_does(name):
    """Through ``generate()`` on a prompt past the budget: the default executor's logits equal
    the reference executor's over the same 3-bit tokens, and the cache holds 3 bits per packed
    element (``3/2`` of the 2-bit policy's code bytes)."""
    model = tiny_llama(seed=5)
    ids = torch.randint(1, 256, (2, 400), generator=torch.Generator().manual_seed(1))
    logits, caches = {}, {}
    for executor in ("auto", "reference"):
        cache = _three_bit(name, executor).make_cache(model)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False,
            output_logits=True, return_dict_in_generate=True, **cache_kwargs(cache),
        )  # fmt: skip
        logits[executor], caches[executor] = torch.stack(out.logits), cache
    assert torch.allclose(logits["auto"], logits["reference"], atol=1e-4, rtol=1e-4)
    two_bit = Policy.load(name).make_cache(model)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                   **cache_kwargs(two_bit))  # fmt: skip
    three, two = caches["auto"].memory(), two_bit.memory()
    assert three.bytes_by_region["codes"] == pytest.approx(1.5 * two.bytes_by_region["codes"])


def test_the_graph_path_holds_and_replays_three_bit_tokens_as_eager_decoding_does():
    model = tiny_llama(seed=6)
    ids = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(2))
    got = {}
    for graphs in (False, True):
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
            **cache_kwargs(_three_bit("kivi").make_cache(model, cuda_graphs=graphs)),
        )  # fmt: skip
        got[graphs] = (out.sequences, torch.stack(out.logits))
    assert torch.equal(got[True][0], got[False][0])
    assert torch.allclose(got[True][1], got[False][1], atol=1e-5, rtol=1e-5)


def _packed(bits: int, axis: str, d: int = 128, device: str = "cpu"):
    x = torch.randn(1, 2, 32, d, device=device)
    return NativeQuantizer().quantize(x, QuantSpec(bits=bits, group_size=32, axis=axis))


def test_three_bit_regions_are_fusable():
    """The Triton kernel reads both planes (its arithmetic is checked against float64 by
    tests.kernel_cases, in Triton's interpreter in CI and on the GPU by benchmarks/gpu_tests.sh)."""
    grouped = torch.empty(1, 2, 4, 128)
    assert fusable(grouped, _packed(3, "channel"), _packed(3, "token"))
    assert fusable(grouped, _packed(2, "channel"), _packed(3, "token"))
    # 3 bits at head size 64: the 1-bit plane has 8 bytes a row, which the PTX unpacking reads
    # wrong on the GPU (benchmarks/results/gpu_tests_h100_pairing_3bit.txt), so it is not fused
    assert not fusable(torch.empty(1, 2, 4, 64), _packed(3, "channel", 64), _packed(3, "token", 64))
    assert not fusable(torch.empty(1, 2, 4, 64), _packed(2, "channel", 64), _packed(3, "token", 64))
    assert fusable(torch.empty(1, 2, 4, 64), _packed(2, "channel", 64), _packed(2, "token", 64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_gluon_kernel_leaves_three_bit_codes_to_the_triton_kernel():
    from kvpolicy.executors.kernels.mma_splits import MmaSplits
    from kvpolicy.executors.kernels.triton_splits import TritonSplits

    grouped = torch.empty(1, 2, 4, 128, device="cuda")
    keys, values = _packed(3, "channel", device="cuda"), _packed(3, "token", device="cuda")
    assert not MmaSplits().serves(grouped, keys, values)
    assert TritonSplits().serves(grouped, keys, values)


def test_three_bit_launches_drop_the_register_cap_unless_one_is_named():
    from kvpolicy.executors.kernels.triton_splits import MAX_REGISTERS, TritonLaunch, register_cap

    default = TritonLaunch()
    assert register_cap(default, 2, 2) == register_cap(default, 3, 2) == MAX_REGISTERS
    assert register_cap(default, 3, 3) is None
    assert register_cap(TritonLaunch(max_registers=96), 3, 3) == 96
    assert register_cap(TritonLaunch(max_registers=None), 2, 2) is None
