"""The fused Triton executor against float64 attention over the same stored tokens (CUDA only).

On a machine without CUDA these tests skip, and the CPU fallback of the ``fused`` executor
(the chunked path) is checked instead.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from tests import executor_cases, kernel_cases
from tests.executor_cases import run_case

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _check_shapes(dtype, retention, cases) -> None:
    worst = 0.0
    for i, (batch, (kv, groups), d, n, (kb, vb, kg, vg), padded) in enumerate(cases):
        rel, _ = run_case("cuda", dtype, batch, kv, groups, d, n, kb, vb, kg, vg, padded, retention, seed=i)
        worst = max(worst, rel)
        assert rel <= 1e-2, (batch, kv, groups, d, n, kb, vb, kg, vg, padded, retention, rel)
    print(f"worst relative error {dtype}, {retention} keys: {worst:.2e}")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_matches_float64_reference_on_many_shapes(dtype):
    cases = itertools.product(
        [1, 3],  # batch
        [(1, 4), (3, 3), (8, 4)],  # kv heads, query heads per kv head
        [64, 128],  # head_dim
        [17, 64, 1000, 4133],  # cached tokens (not multiples of the group)
        [(2, 2, 64, 64), (2, 2, 32, 32), (4, 2, 64, 32), (4, 4, 32, 64)],  # bits and groups
        [False, True],  # left padding
    )
    _check_shapes(dtype, "window", cases)


@cuda
@pytest.mark.parametrize("retention", ["window", "log"])
def test_fused_serves_the_head_size_of_gemma(retention):
    """Gemma 2 and 3 attend with heads of 256 (Gemma 3 270M: one KV head, four query heads)."""
    cases = itertools.product(
        [1, 3], [(1, 4), (4, 2)], [256], [17, 1000, 4133], [(2, 2, 64, 64), (2, 2, 32, 32), (4, 2, 64, 32)],
        [False, True],
    )  # fmt: skip
    _check_shapes(torch.bfloat16, retention, cases)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_pairs_keys_and_values_stored_in_different_orders(dtype):
    """Keys under log retention, values under a window (PartialLogQuant's shape): packed keys
    read their value rows where they are; the rest is gathered in full precision."""
    cases = itertools.product(
        [1, 3], [(3, 3), (8, 4)], [64, 128], [17, 1000, 4133], [(2, 2, 64, 64), (2, 2, 32, 32)], [False, True]
    )
    _check_shapes(dtype, "log", cases)


def test_fused_executor_falls_back_to_chunked_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rel, reference = run_case("cpu", torch.float32, 2, 3, 3, 64, 300, 2, 2, 64, 64, True, "window", seed=1)
    assert rel < 1e-5


@pytest.mark.parametrize(("executor", "kernel"), [("fused", None), ("fused-triton", "triton")])
def test_fused_executors_hand_their_kernel_to_the_decode_step(monkeypatch, executor, kernel):
    """``fused`` leaves the packed region's kernel to :func:`kvpolicy.executors.kernels.packed_splits`
    (the first kernel that serves); ``fused-triton`` pins the Triton kernel. Checked on the
    decode call itself, with the kernels replaced by a recorder (CPU)."""
    from kvpolicy.executors import fused
    from kvpolicy.executors.kernels import common, decode

    seen = []

    def recorded(query, *args):
        seen.append(args[-1])
        return torch.zeros(query.shape[0], 1, query.shape[1], query.shape[3], dtype=query.dtype)

    monkeypatch.setattr(common, "interpreted", lambda: True)
    monkeypatch.setattr(fused, "triton_available", lambda: True)
    monkeypatch.setattr(decode, "decode_attention", recorded)
    run_case("cpu", torch.float32, 1, 2, 4, 128, 200, 2, 2, 64, 64, False, "window", seed=0, executor=executor)
    assert seen == [kernel]


@cuda
def test_fused_takes_the_gluon_kernel_where_it_serves_and_fused_triton_never(monkeypatch):
    from kvpolicy.executors.kernels import MmaSplits, TritonSplits, gluon_available

    if not gluon_available():
        pytest.skip("needs Triton with Gluon")
    launched = []

    def recording(cls):
        real = cls.splits

        def call(self, *args, **kwargs):
            launched.append(cls.name)
            return real(self, *args, **kwargs)

        return call

    for cls in (MmaSplits, TritonSplits):
        monkeypatch.setattr(cls, "splits", recording(cls))
    for executor, expected in (("fused", "mma"), ("fused-triton", "triton")):
        launched.clear()
        rel, _ = run_case("cuda", torch.bfloat16, 2, 2, 4, 128, 700, 2, 2, 64, 64, True, "window", 0, executor)
        assert rel <= 1e-2 and launched[0] == expected, (executor, launched)


def _kernel_cases(command: list[str], env: dict[str, str]) -> list[dict]:
    root = pathlib.Path(__file__).parents[2]
    done = subprocess.run(command, cwd=root, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _interpreter_works() -> bool:
    """Triton's interpreter is installed and usable (triton 3.6's breaks on numpy >= 2.4)."""
    if importlib.util.find_spec("triton") is None:
        return False
    import numpy

    return tuple(int(x) for x in numpy.__version__.split(".")[:2]) < (2, 4)


@pytest.mark.skipif(not _interpreter_works(), reason="needs triton's CPU interpreter and numpy < 2.4")
@pytest.mark.parametrize("groups_per_block", [1, 2, 4])
def test_fused_kernel_in_the_triton_interpreter_matches_float64(groups_per_block):
    """The kernel's arithmetic (planar codes, folded scales, 1, 2 or 4 key groups per block,
    each on its own rows, splits, padding) on CPU, in CI. The interpreter runs the Triton
    unpacking, not the PTX."""
    command = [sys.executable, "-m", "tests.kernel_cases", "--groups-per-block", str(groups_per_block)]
    results = _kernel_cases(command, {"TRITON_INTERPRET": "1"})
    assert len(results) == len(kernel_cases.CASES)
    for r in results:
        assert r["shape_ok"] and r["rel_err"] <= 1e-2 and r["lse_err"] <= 1e-2, r
        assert r["step_err"] <= 1e-2 and r["fp_only_err"] <= 1e-2 and r["gather_err"] <= 1e-2, r


@pytest.mark.skipif(not _interpreter_works(), reason="needs triton's CPU interpreter and numpy < 2.4")
def test_fused_executor_in_the_triton_interpreter_matches_float64():
    """The executor's decode path (full-precision segments, padding biases, both kernels) on
    CPU, in CI: cached layers built by a policy, attended by the fused executor."""
    results = _kernel_cases([sys.executable, "-m", "tests.executor_cases"], {"TRITON_INTERPRET": "1"})
    assert len(results) == len(executor_cases.CASES)
    for r in results:
        assert r["path"] == "fused" and r["rel_err"] <= 1e-2, r


@cuda
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="needs compute-sanitizer")
def test_fused_kernel_touches_no_memory_outside_its_tensors():
    """memcheck over every case, including a last split that ends past the packed region."""
    command = ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "3"]
    results = _kernel_cases([*command, sys.executable, "-m", "tests.kernel_cases", "--device", "cuda"], {})
    assert len(results) == len(kernel_cases.CASES)
    for r in results:
        assert r["shape_ok"] and r["rel_err"] <= 1e-2 and r["step_err"] <= 1e-2 and r["gather_err"] <= 1e-2, r


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_ptx_unpacking_constants_give_every_code_exactly(bits):
    """For each plane, the mask selects the plane's bits in both 16-bit halves, and
    ``(1024 + c * 2**shift) * scale + offset`` (one rounding to float16, as ``fma.f16x2``)
    is ``c`` for every code ``c``."""
    import re
    import struct

    from kvpolicy.executors.kernels.triton_device import unpack_ptx

    def half(pattern: int) -> float:
        assert pattern >> 16 == pattern & 0xFFFF  # the same value in both halves
        return struct.unpack("<e", struct.pack("<H", pattern & 0xFFFF))[0]

    for plane in range(8 // bits):
        ptx = unpack_ptx(plane, bits)
        constants = dict(re.findall(r"mov\.b32 (\w), (0x[0-9a-f]+);", ptx))
        mask, scale, offset = (int(constants[name], 16) for name in "msz")
        shift = plane * bits
        assert mask == (((1 << bits) - 1) << shift) * 0x10001
        assert int(constants["o"], 16) == 0x64006400
        for code in range(1 << bits):
            mantissa = struct.unpack("<e", struct.pack("<H", 0x6400 | code << shift))[0]
            assert mantissa == 1024 + code * 2**shift
            exact = mantissa * half(scale) + half(offset)
            assert struct.unpack("<e", struct.pack("<e", exact))[0] == code


def test_groups_per_block_must_be_one_two_or_four():
    from kvpolicy.config import QuantSpec
    from kvpolicy.executors.kernels import MmaLaunch, TritonLaunch, packed_decode_attention
    from kvpolicy.quantizers.native import NativeQuantizer

    backend = NativeQuantizer()
    keys = backend.quantize(torch.randn(1, 1, 64, 64), QuantSpec(bits=2, group_size=64, axis="channel"))
    values = backend.quantize(torch.randn(1, 1, 64, 64), QuantSpec(bits=2, group_size=64, axis="token"))
    with pytest.raises(ValueError, match=r"groups_per_block must be one of \(1, 2, 4\) or None, got 3"):
        TritonLaunch(groups_per_block=3)
    with pytest.raises(TypeError, match="the 'triton' kernel takes TritonLaunch settings"):
        query = torch.randn(1, 1, 4, 64)
        packed_decode_attention(query, keys, values, 0.125, None, kernel="triton", launch=MmaLaunch())


def test_default_groups_per_block_fills_128_token_blocks_within_16_rows():
    """The default stacks key groups up to blocks of 128 tokens (the swept best: 4 groups of
    32, 2 of 64), but never so many that the groups' query rows exceed one 16-row tile."""
    from kvpolicy.executors.kernels.common import next_power_of_2
    from kvpolicy.executors.kernels.triton_splits import GROUPS_PER_BLOCK_CHOICES, default_groups_per_block

    assert [default_groups_per_block(group, 4) for group in (16, 32, 64, 128, 256)] == [4, 4, 2, 1, 1]
    assert [default_groups_per_block(32, heads) for heads in (1, 2, 4, 5, 8, 16, 32)] == [4, 4, 4, 2, 2, 1, 1]
    for group in (16, 32, 64, 128, 256):
        for heads in range(1, 33):
            r = default_groups_per_block(group, heads)
            assert r in GROUPS_PER_BLOCK_CHOICES
            assert r == 1 or (r * group <= 128 and r * next_power_of_2(heads) <= 16)


def _gluon_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    from kvpolicy.executors.kernels import gluon_available

    return gluon_available()


gluon = pytest.mark.skipif(not _gluon_available(), reason="needs triton with Gluon")


@cuda
@gluon
@pytest.mark.parametrize("stages", [0, 2])
def test_mma_kernel_matches_float64_on_fresh_cases(stages):
    """The Gluon kernel on every case of ``tests.mma_cases`` (query heads 1-8, key groups
    16-128, value groups 32-128, padding, values paired by rows, bf16 and fp16)."""
    from tests.mma_cases import check

    for result in check(
        [{"stages": stages}, {"stages": stages, "block_tokens": 32, "exact_keys": True}],
        torch.Generator().manual_seed(1),
    ):
        assert result["finite"] and result["rel_err"] <= 1e-2, result


@gluon
@pytest.mark.parametrize("stages", [0, 2])
def test_mma_kernel_compiles_for_sm90_without_a_shared_memory_round_trip(stages):
    """Compiled for the H100/H200 here (no GPU needed): the main loop's 72 matrix products
    (32 scores, 8 key offsets, 32 values per 64 tokens) take their operands from registers
    loaded in place; no shared-memory store or barrier there when reading straight from global
    memory, and with the ``cp.async`` stages shared memory is written only by the copies."""
    from kvpolicy.executors.kernels.inspection import compile_for, mma_kernel_source

    compiled = compile_for(mma_kernel_source(stages=stages), {"num_warps": 1})
    loop = compiled.loop_opcodes()
    assert loop["HMMA"] == 72
    assert loop["MOVM"] == 16  # the probabilities transposed in registers: 8 per value group of 64
    assert loop["STS"] == 0
    if stages == 0:
        assert compiled.shared_bytes == 0 and loop["LDS"] == 0 and loop["BAR"] == 0
    else:
        assert compiled.stack_bytes == 0  # no spills at the default
        assert loop["LDGSTS"] > 0 and loop["BAR"] <= 2
        assert compiled.shared_bytes == stages * 5 * 1024  # codes 2 x 2 KB, scales 4 x 256 B per stage


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("mode", ["exact", "offset", "subnormal"])
def test_pair_unpacking_constants_give_every_code(mode):
    """Plane ``i``'s two bits kept in place (bits ``2i, 2i + 1`` of a half): under the exponent
    of ``2**(10 - 2i)`` they give ``2**(10 - 2i) + c`` exactly, which the exact variant's
    ``add.f16x2`` turns into ``c`` and the keys' variant leaves for ``key_offsets`` to take off
    (``-(1024 >> 2i)``); under a zero exponent (values) the subnormal ``c * 2**(2i - 24)``,
    which the kernel scales back by ``2**(24 - 2i)`` at the end."""
    import re
    import struct

    from kvpolicy.executors.kernels.mma_device import unpack_pairs_ptx

    def half(pattern: int) -> float:
        assert pattern >> 16 == pattern & 0xFFFF  # the same value in both halves
        return struct.unpack("<e", struct.pack("<H", pattern & 0xFFFF))[0]

    exact, subnormal = mode == "exact", mode == "subnormal"
    for half_word in (0, 1):
        ptx = unpack_pairs_ptx(exact, half_word, subnormal)
        assert ptx.count("lop3.b32") == 8 and ptx.count("add.rn.f16x2") == (8 if exact else 0)
        # bytes 2 * half_word and 2 * half_word + 1 of both words, one per 16-bit half
        assert f"prmt.b32 w, $8, $9, {0x7632 if half_word else 0x5410:#06x};" in ptx
    constants = dict(re.findall(r"mov\.b32 (\w\d), (0x[0-9a-f]+);", ptx))
    for i in range(4):
        mask, magic, offset = (int(constants[f"{name}{i}"], 16) for name in "moz")
        assert mask == (3 << 2 * i) * 0x10001
        for code in range(4):
            value = struct.unpack("<e", struct.pack("<H", (magic | code << 2 * i) & 0xFFFF))[0]
            if subnormal:
                assert magic == 0 and value == code * 2.0 ** (2 * i - 24)
                assert value * 2.0 ** (24 - 2 * i) == code  # the kernel's scale back
                continue
            assert half(magic) == 2 ** (10 - 2 * i) == 1024 >> 2 * i
            assert value == 2 ** (10 - 2 * i) + code
            assert struct.unpack("<e", struct.pack("<e", value + half(offset)))[0] == code


def test_kernel_choice_names_the_allowed_kernels():
    from kvpolicy.config import QuantSpec
    from kvpolicy.executors.kernels import packed_splits
    from kvpolicy.quantizers.native import NativeQuantizer

    backend = NativeQuantizer()
    keys = backend.quantize(torch.randn(1, 1, 64, 128), QuantSpec(bits=2, group_size=64, axis="channel"))
    values = backend.quantize(torch.randn(1, 1, 64, 128), QuantSpec(bits=2, group_size=64, axis="token"))
    query = torch.randn(1, 1, 4, 128)
    with pytest.raises(ValueError, match=r"kernel must be one of \('mma', 'triton'\) or None, got 'cuda'"):
        packed_splits(query, keys, values, 0.1, None, kernel="cuda")
    with pytest.raises(ValueError, match="kernel='mma' does not serve these shapes"):
        packed_splits(query, keys, values, 0.1, None, kernel="mma")  # a CPU tensor


def test_decode_fusable_is_the_one_check_of_the_executor_and_the_graph_buffers():
    """What the fused executor asks at each step and the CUDA-graph buffers once at adoption:
    one query token, a power-of-two head size of 16 or more shared by keys and values, and a
    packed region in the kernels' layout or none (a ring of full-precision tokens alone)."""
    from kvpolicy.config import QuantSpec
    from kvpolicy.executors.kernels import decode_fusable
    from kvpolicy.quantizers.native import NativeQuantizer

    def packed(d: int, axis: str, tokens: int = 64):
        spec = QuantSpec(bits=2, group_size=32, axis=axis)
        return NativeQuantizer().quantize(torch.randn(1, 2, tokens, d), spec)

    query = torch.empty(1, 4, 1, 64)
    keys, values = packed(64, "channel"), packed(64, "token")
    assert decode_fusable(query, 64, keys, values)
    assert decode_fusable(query, 64, None, None)  # nothing packed: the full-precision kernel alone
    assert not decode_fusable(torch.empty(1, 4, 2, 64), 64, keys, values)  # two query tokens
    assert not decode_fusable(query, 128, keys, values)  # keys and values of different head sizes
    assert not decode_fusable(torch.empty(1, 4, 1, 80), 80, None, None)  # not a power of two
    assert not decode_fusable(torch.empty(1, 4, 1, 8), 8, None, None)  # below the matrix units' 16
    assert not decode_fusable(query, 64, keys, packed(64, "token", tokens=32))  # 64 keys, 32 values
    assert decode_fusable(query, 64, keys, packed(64, "token", tokens=32), paired_by_rows=True)
