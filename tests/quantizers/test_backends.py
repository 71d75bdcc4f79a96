"""Library backends (quanto, HQQ): real packing, bounded error, row moves without re-quantizing."""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpolicy.config import QuantSpec
from kvpolicy.errors import ConfigError, MissingDependencyError
from kvpolicy.policy import Policy
from kvpolicy.policy.registry import get_registry
from kvpolicy.quantizers.native import NativeQuantizer
from tests.conftest import tiny_llama

BACKENDS = ["quanto", "hqq"]
WINDOW = [{"type": "window", "size": 8}]
MODULES = {"quanto": "optimum.quanto", "hqq": "hqq.core.quantize"}


def _backend(name):
    pytest.importorskip(MODULES[name])
    return get_registry().quantizer(name)


def _data(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * (1 + torch.rand(shape[:-1] + (1,), generator=g))


@pytest.mark.parametrize("name", BACKENDS)
@settings(max_examples=12, deadline=None)
@given(
    bits=st.sampled_from([2, 4]),
    axis=st.sampled_from(["token", "channel"]),
    batch=st.integers(1, 3),
    blocks=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_codes_are_packed_and_error_is_like_native(name, bits, axis, batch, blocks, seed):
    backend = _backend(name)
    group, heads, d = 32, 2, 64
    n = group * blocks
    x = _data((batch, heads, n, d), seed).to(torch.bfloat16)
    spec = QuantSpec(backend=name, bits=bits, group_size=group, axis=axis)
    packed = backend.quantize(x, spec)
    out = packed.dequantize()
    assert out.shape == x.shape and out.dtype == x.dtype
    # real packing: exactly bits/8 bytes per element for codes, never a 16-bit copy
    sizes = packed.nbytes()
    assert sizes["codes"] == batch * heads * n * d * bits // 8
    assert 0 < sizes["scales"] <= 2 * 4 * batch * heads * n * d // group
    # error comparable to min/max quantization (HQQ optimizes, quanto is min/max)
    native = NativeQuantizer().quantize(x, QuantSpec(bits=bits, group_size=group, axis=axis)).dequantize()
    err = (out.float() - x.float()).abs().mean()
    native_err = (native.float() - x.float()).abs().mean()
    assert err <= 1.25 * native_err + 1e-3


@pytest.mark.parametrize("name", BACKENDS)
def test_slices_concat_and_batch_moves_match_dequantized(name):
    backend = _backend(name)
    spec = QuantSpec(backend=name, bits=2, group_size=32, axis="channel")
    x = _data((3, 2, 96, 64), 1).to(torch.float16)
    a, b = backend.quantize(x[:, :, :32], spec), backend.quantize(x[:, :, 32:], spec)
    joined = backend.concat([a, b])
    full = joined.dequantize()
    assert joined.num_tokens == 96
    assert torch.equal(full[:, :, :32], a.dequantize())
    for start, stop in [(0, 32), (10, 50), (40, 96), (33, 34)]:
        part = joined.slice_tokens(start, stop)
        assert part.num_tokens == stop - start
        assert torch.equal(part.dequantize(), full[:, :, start:stop])
    beam = torch.tensor([2, 0, 0])
    moved = joined.map_batch(lambda t: t.index_select(0, beam))
    assert torch.equal(moved.dequantize(), full.index_select(0, beam))
    assert moved.nbytes()["codes"] == joined.nbytes()["codes"]


@pytest.mark.parametrize("name", BACKENDS)
def test_policy_with_backend_generates_and_reports_packed_bytes(name):
    _backend(name)
    model = tiny_llama()
    policy = Policy.from_dict(
        {
            "name": f"kivi_{name}",
            "keys": {"retain": WINDOW, "quant": {"backend": name, "group_size": 32, "axis": "channel"}},
            "values": {"retain": WINDOW, "quant": {"backend": name, "group_size": 32}},
        }
    )
    ids = torch.randint(0, model.config.vocab_size, (2, 70), generator=torch.Generator().manual_seed(0))
    cache = policy.make_cache(model)
    mask = torch.ones_like(ids)
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 75)
    report = cache.memory()
    assert report.bytes_by_region["codes"] > 0 and report.ratio < 0.6


@pytest.mark.parametrize(("backend", "bits"), [("quanto", 8), ("quanto", 3), ("hqq", 8), ("native", 5), ("native", 16)])
def test_bits_a_backend_cannot_do_are_refused_when_the_policy_loads(backend, bits):
    """Refused by the policy itself, before any model is loaded (no library needed either)."""
    allowed = {"quanto": r"2 \| 4", "hqq": r"2 \| 4", "native": r"2 \| 3 \| 4 \| 8"}[backend]
    with pytest.raises(ConfigError, match=rf"keys.quant.bits: got {bits}; allowed: {allowed} for backend '{backend}'"):
        Policy.from_dict(
            {
                "name": "q",
                "keys": {"retain": WINDOW, "quant": {"backend": backend, "bits": bits}},
                "values": {"retain": WINDOW},
            }
        )


@pytest.mark.parametrize("name", BACKENDS)
def test_missing_package_names_the_extra(name, monkeypatch):
    top = MODULES[name].split(".")[0]
    for module in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, MODULES[name], None)
    policy = Policy.from_dict(
        {"name": "x", "keys": {"retain": WINDOW, "quant": {"backend": name}}, "values": {"retain": WINDOW}}
    )
    with pytest.raises(MissingDependencyError, match=rf"pip install 'kvpolicy\[{name}\]'"):
        policy.new_layer(64)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_dequantizing_some_tokens_equals_picking_from_the_whole(name, axis):
    backend = _backend(name)
    x = _data((2, 2, 96, 64), 3).to(torch.bfloat16)
    spec = QuantSpec(backend=name, bits=2, group_size=32, axis=axis)
    packed = backend.concat([backend.quantize(x[:, :, :32], spec), backend.quantize(x[:, :, 32:], spec)])
    index = torch.tensor([70, 5, 33, 33, 94])
    assert torch.equal(packed.dequantize_tokens(index), packed.dequantize()[:, :, index])


def _hqq_kivi(**options) -> dict:
    data = Policy.load("kivi").to_dict()
    for side in ("keys", "values"):
        data[side]["quant"].update(backend="hqq", options=dict(options))
    return data


def test_backend_options_come_from_the_policy_and_change_what_is_packed():
    pytest.importorskip("hqq")
    from kvpolicy.config import QuantSpec
    from kvpolicy.quantizers.hqq import HQQQuantizer

    x = torch.randn(1, 2, 64, 64, generator=torch.Generator().manual_seed(0))
    backend = HQQQuantizer()
    error = {}
    for optimize in (True, False):
        spec = QuantSpec(backend="hqq", bits=2, group_size=64, axis="token", options={"optimize": optimize})
        error[optimize] = float((backend.quantize(x, spec).dequantize() - x).norm())
    assert error[True] < error[False]  # HQQ's solver lowers the reconstruction error
    policy = Policy.from_dict(_hqq_kivi(optimize=False))
    assert policy.to_dict()["keys"]["quant"]["options"] == {"optimize": False}
    assert "options" not in Policy.load("kivi").to_dict()["keys"]["quant"]


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"optimise": False}, "keys.quant.options.optimise: got False; allowed: an option of backend 'hqq' "
                              "(its options: optimize)"),
        ({"optimize": "no"}, "keys.quant.options.optimize: got 'no'; allowed: true | false"),
    ],
)  # fmt: skip
def test_a_bad_backend_option_is_named_with_the_accepted_ones(options, says):
    with pytest.raises(ConfigError) as err:
        Policy.from_dict(_hqq_kivi(**options))
    assert says in str(err.value)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"fast": True}, "keys.quant.options.fast: got True; allowed: an option of backend 'native' "
                         "(its options: fit)"),
        ({"fit": "l2"}, "keys.quant.options.fit: got 'l2'; allowed: minmax | mse"),
    ],
)  # fmt: skip
def test_a_bad_native_option_is_named_with_the_accepted_ones(options, says):
    data = Policy.load("kivi").to_dict()
    data["keys"]["quant"]["options"] = options
    with pytest.raises(ConfigError) as err:
        Policy.from_dict(data)
    assert says in str(err.value)


def _group_errors(x: torch.Tensor, spec) -> torch.Tensor:
    """Squared reconstruction error of each group of ``x`` ``[B, H, n, D]`` under ``spec``."""
    from kvpolicy.quantizers.native import NativeQuantizer

    err = (NativeQuantizer().quantize(x, spec).dequantize() - x).square()
    b, h, n, d = x.shape
    g = spec.group_size
    if spec.axis == "token":
        return err.reshape(b, h, n, d // g, g).sum(-1)
    return err.reshape(b, h, n // g, g, d).sum(-2)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([2, 4]),
    axis=st.sampled_from(["token", "channel"]),
    outliers=st.floats(1.0, 20.0),
    seed=st.integers(0, 2**16),
)
def test_the_mse_fit_never_reconstructs_a_group_worse_than_min_max(bits, axis, outliers, seed):
    """``fit: mse`` tries min/max itself among its candidates, so no group's error can grow; the
    packed format (codes, scale and zero shapes and dtypes) is the one the kernels read."""
    from kvpolicy.config import QuantSpec
    from kvpolicy.quantizers.native import NativeQuantizer

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, 64, 32, generator=g)
    x = x * torch.where(torch.rand(x.shape, generator=g) < 0.02, outliers, 1.0)  # a few large values
    plain = QuantSpec(bits=bits, group_size=16, axis=axis)
    fitted = QuantSpec(bits=bits, group_size=16, axis=axis, options={"fit": "mse"})
    assert (_group_errors(x, fitted) <= _group_errors(x, plain) * (1 + 1e-5) + 1e-9).all()
    a, b = NativeQuantizer().quantize(x, plain), NativeQuantizer().quantize(x, fitted)
    for name in ("codes", "scale", "zero"):
        assert getattr(a, name).shape == getattr(b, name).shape and getattr(a, name).dtype == getattr(b, name).dtype


def test_the_mse_fit_lowers_the_error_of_two_bit_gaussian_groups():
    from kvpolicy.config import QuantSpec

    x = torch.randn(1, 4, 256, 64, generator=torch.Generator().manual_seed(1))
    for axis in ("token", "channel"):
        plain = _group_errors(x, QuantSpec(bits=2, group_size=32, axis=axis)).sum()
        fitted = _group_errors(x, QuantSpec(bits=2, group_size=32, axis=axis, options={"fit": "mse"})).sum()
        assert fitted < 0.8 * plain, (axis, float(fitted / plain))
