"""Native quantizer: packing is exact, sizes are as computed, round-trip error within the bound."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpolicy.config import QuantSpec
from kvpolicy.errors import ConfigError
from kvpolicy.quantizers.native import NativeQuantizer, pack_codes, unpack_codes

backend = NativeQuantizer()


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), rows=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_pack_unpack_is_exact_and_dense(bits, rows, seed):
    g = torch.Generator().manual_seed(seed)
    d = 64
    codes = torch.randint(0, 1 << bits, (rows, d), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, d * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


def _random(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(shape[:-1] + (1,), generator=g) * 4
    return (torch.randn(shape, generator=g) * scale + torch.randn(shape, generator=g)).to(dtype)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    axis=st.sampled_from(["token", "channel"]),
    group=st.sampled_from([16, 32, 64]),
    blocks=st.integers(1, 3),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_round_trip_error_within_half_a_step(bits, axis, group, blocks, batch, seed):
    heads, d = 2, 64
    n = group * blocks if axis == "channel" else blocks * 5
    x = _random((batch, heads, n, d), seed)
    spec = QuantSpec(bits=bits, group_size=group, axis=axis)
    packed = backend.quantize(x, spec)
    out = packed.dequantize()
    assert out.shape == x.shape and out.dtype == x.dtype
    # error bound: half a quantization step of the element's group (float32 arithmetic slack)
    if axis == "token":
        step = packed.scale.repeat_interleave(group, dim=-1)
    else:
        step = packed.scale.repeat_interleave(group, dim=-2)
    err = (out - x).abs()
    assert bool((err <= step / 2 * (1 + 1e-4) + 1e-6).all())
    # the group range bounds every step: scale = (max - min) / (2**bits - 1)
    assert float(step.max()) <= float((x.max() - x.min()) / ((1 << bits) - 1)) * (1 + 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_round_trip(dtype):
    x = _random((2, 3, 64, 64), 7, dtype)
    packed = backend.quantize(x, QuantSpec(bits=4, group_size=64, axis="channel"))
    out = packed.dequantize()
    assert out.dtype == dtype
    step = packed.scale.float().repeat_interleave(64, dim=-2)
    eps = torch.finfo(dtype).eps
    # half a step, the 16-bit rounding of the stored scale (clamped top code) and of the result
    bound = step / 2 + 15 * step * eps + x.float().abs() * eps
    assert bool(((out.float() - x.float()).abs() <= bound).all())


@pytest.mark.parametrize(
    "bits,group,axis,expected_codes,expected_scales",
    [
        # B=2, H=3, n=64, D=64, 16-bit scale+zero
        (2, 64, "channel", 2 * 3 * 64 * 64 // 4, 2 * 2 * 3 * (64 // 64) * 64 * 2),
        (2, 32, "token", 2 * 3 * 64 * 64 // 4, 2 * 2 * 3 * 64 * (64 // 32) * 2),
        (4, 64, "token", 2 * 3 * 64 * 64 // 2, 2 * 2 * 3 * 64 * 1 * 2),
        (8, 16, "channel", 2 * 3 * 64 * 64, 2 * 2 * 3 * 4 * 64 * 2),
    ],
)
def test_packed_size_is_exactly_as_computed(bits, group, axis, expected_codes, expected_scales):
    x = _random((2, 3, 64, 64), 1, torch.bfloat16)
    packed = backend.quantize(x, QuantSpec(bits=bits, group_size=group, axis=axis))
    assert packed.nbytes() == {"codes": expected_codes, "scales": expected_scales}


def test_two_bit_group_64_costs_two_and_a_half_bits_per_element():
    x = _random((1, 8, 1024, 128), 3, torch.bfloat16)
    packed = backend.quantize(x, QuantSpec(bits=2, group_size=64, axis="channel"))
    bits_per_element = 8 * sum(packed.nbytes().values()) / x.numel()
    assert bits_per_element == pytest.approx(2.5)


def test_channel_axis_needs_whole_groups():
    with pytest.raises(ValueError, match="multiple of group_size=32"):
        backend.quantize(torch.zeros(1, 1, 33, 64), QuantSpec(group_size=32, axis="channel"))


def test_validate_names_bits_and_group():
    with pytest.raises(ConfigError, match=r"keys.quant.bits: got 5; allowed: 2 \| 3 \| 4 \| 8"):
        backend.validate(QuantSpec(bits=5), 64, "keys.quant")
    with pytest.raises(ConfigError, match="values.quant.group_size: got 48.*divisor of head_dim=64"):
        backend.validate(QuantSpec(group_size=48, axis="token"), 64, "values.quant")
    backend.validate(QuantSpec(group_size=48, axis="channel"), 64, "keys.quant")  # groups along tokens: fine


def test_constant_group_does_not_divide_by_zero():
    x = torch.full((1, 1, 4, 64), 3.25)
    out = backend.quantize(x, QuantSpec(bits=2, group_size=64, axis="token")).dequantize()
    assert torch.equal(out, x)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packing_is_planar(bits):
    """Byte j holds channels j, j + W, j + 2W, ... (W bytes per row): the fused kernel relies on it."""
    d = 32
    width = d * bits // 8
    codes = torch.arange(d) % (1 << bits)
    packed = pack_codes(codes[None], bits)[0]
    for j in range(width):
        expected = sum(int(codes[j + i * width]) << (i * bits) for i in range(8 // bits))
        assert int(packed[j]) == expected


@settings(max_examples=30, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    axis=st.sampled_from(["token", "channel"]),
    blocks=st.integers(1, 3),
    picks=st.lists(st.integers(0, 10**6), min_size=1, max_size=12),
    seed=st.integers(0, 2**16),
)
def test_dequantizing_some_tokens_equals_dequantizing_all_then_picking(bits, axis, blocks, picks, seed):
    """``dequantize_tokens`` reads only the picked rows (and their groups' scales), with the
    same arithmetic: bit-identical to slicing the whole dequantized region."""
    g = torch.Generator().manual_seed(seed)
    n = 16 * blocks
    x = torch.randn(2, 3, n, 32, generator=g).to(torch.bfloat16)
    packed = NativeQuantizer().quantize(x, QuantSpec(bits=bits, group_size=16, axis=axis))
    index = torch.tensor([p % n for p in picks])
    assert torch.equal(packed.dequantize_tokens(index), packed.dequantize()[:, :, index])


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    axis=st.sampled_from(["token", "channel"]),
    batch=st.integers(2, 7),
    slice_rows=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_quantizing_in_slices_of_batch_rows_is_bit_identical(bits, axis, batch, slice_rows, dtype, seed):
    """A long block is quantized a few batch rows at a time (bounded float32 transients);
    codes, scales and zeros are exactly those of quantizing it whole, and the input is left
    as it was (the work is done in place on a copy, also for float32 input)."""
    heads, n, d = 2, 32, 64
    x = _random((batch, heads, n, d), seed, dtype)
    before = x.clone()
    spec = QuantSpec(bits=bits, group_size=16, axis=axis)
    whole = NativeQuantizer().quantize(x, spec)
    slicing = NativeQuantizer()
    slicing.slice_bytes = slice_rows * heads * n * d * 4
    sliced = slicing.quantize(x, spec)
    assert torch.equal(x, before)
    for name in ("codes", "scale", "zero"):
        assert torch.equal(getattr(sliced, name), getattr(whole, name)), name
    assert sliced.codes.is_contiguous() and sliced.scale.shape == whole.scale.shape


@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("rotate", ["none", "hadamard"])
def test_a_packed_buffer_takes_blocks_and_rows_in_place_and_keeps_the_layout(axis, rotate):
    """What the CUDA-graph buffers do with packed tokens: a zeroed buffer in a block's layout,
    blocks written at an offset, per-token rows copied across; read back, the same bytes."""
    from kvpolicy.quantizers.native import NativeQuantizer

    spec = QuantSpec(bits=2, group_size=16, axis=axis, rotate=rotate)
    g = torch.Generator().manual_seed(0)
    first, second = (NativeQuantizer().quantize(torch.randn(2, 2, 32, 16, generator=g), spec) for _ in range(2))
    buffer = first.allocate(128)
    assert buffer.num_tokens == 128 and not buffer.codes.any() and buffer.rotation is first.rotation
    buffer.write(first, 0)
    buffer.write(second, 32)
    for block, start in ((first, 0), (second, 32)):
        read = buffer.slice_tokens(start, start + 32)
        assert all(torch.equal(getattr(read, n), getattr(block, n)) for n in ("codes", "scale", "zero"))
    torch.testing.assert_close(
        buffer.slice_tokens(0, 64).dequantize(), torch.cat([first.dequantize(), second.dequantize()], 2)
    )
    if axis == "token":  # rows: second's tokens 3 and 5 into rows 100 and 90
        buffer.write_rows(second, torch.tensor([3, 5]), torch.tensor([100, 90]))
        torch.testing.assert_close(
            buffer.dequantize_tokens(torch.tensor([100, 90])), second.dequantize_tokens(torch.tensor([3, 5]))
        )
