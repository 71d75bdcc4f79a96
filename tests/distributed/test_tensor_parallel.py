"""Tensor parallelism through transformers (``tp_plan="auto"``): kvpolicy caches per rank.

Two ranks run ``examples/tensor_parallel.py`` through torchrun: on CPU (gloo) in CI with
the embedded model, on two GPUs (NCCL) where present. Each is compared with one process
running the same checkpoint.

Tolerance, in standard deviations of the one-process logits at the same step: tensor
parallelism sums ``o_proj`` and ``down_proj`` partial products across ranks in another
order than one process does. With a 16-bit cache that moves float32 logits by about
1e-5 of their spread (``TP_FULL_TOLERANCE``). A quantizing policy can turn such a
difference into a 2-bit code on the other side of a rounding edge, and a flipped code
moves an attention score by a whole quantization step: ``TP_QUANTIZED_TOLERANCE``.
Measured worst cases (``benchmarks/tp_agreement.py``, results in benchmarks/results/):
0.016 on CPU (SmolLM2, logquant/partial_logquant), 0.11 on two H200s (random Llama,
kivi, fused executor, whose float32 dots run in TF32). Greedy tokens must agree wherever
one process's top-two logits are further apart than twice the tolerance.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from benchmarks.tp_agreement import example, row_agreements
from kvpolicy.distributed import NVLINK_MULTICAST_OFF, memory_by_rank, replicate_kv_heads, safe_environment
from tests.conftest import tiny_llama

#: float32 logit drift, tensor-parallel vs one process, in logit standard deviations
TP_FULL_TOLERANCE = 1e-3
TP_QUANTIZED_TOLERANCE = 0.25


def run_both(checkpoint: Path, policy: str, tmp_path: Path, *extra: str) -> tuple[dict, dict]:
    """``(two ranks, one process)`` results of the example on ``checkpoint``."""
    ex = example()
    common = ["--checkpoint", str(checkpoint), "--policy", policy, "--dtype", "float32", *extra]
    ex.main([*common, "--nproc", "2", "--out", str(tmp_path / "tp.pt")])
    ex.main([*common, "--single", "--out", str(tmp_path / "one.pt")])
    return torch.load(tmp_path / "tp.pt"), torch.load(tmp_path / "one.pt")


def assert_within_tolerance(tp: dict, one: dict, policy: str) -> None:
    assert tp["world"] == 2 and one["world"] == 1
    tolerance = TP_FULL_TOLERANCE if policy == "full" else TP_QUANTIZED_TOLERANCE
    for row, result in enumerate(row_agreements(tp, one)):
        assert result.identical or policy != "full", f"row {row}: full differs at token {result.agreed}"
        assert result.drift <= tolerance, f"row {row}: logits drift by {result.drift:.3g} standard deviations"
        if not result.identical:  # the rows go different ways from there: only at a near tie
            assert result.divergence_margin <= 2 * tolerance, f"row {row} step {result.agreed}: not a near tie"


def assert_memory_split_by_rank(tp: dict, one: dict, heads_per_rank_vs_one: float) -> None:
    """Each rank holds its own heads' bytes; the ranks' total is their sum."""
    ranks = tp["memory"]
    assert len(ranks) == 2 and ranks[0]["total_bytes"] == ranks[1]["total_bytes"] > 0
    assert ranks[0]["total_bytes"] == pytest.approx(heads_per_rank_vs_one * one["memory"][0]["total_bytes"], rel=0.02)
    assert f"total over 2 ranks: {sum(r['total_bytes'] for r in ranks) / 2**20:.2f} MiB" in tp["summary"]


def test_replicated_heads_compute_the_same_function():
    model = tiny_llama(layers=2)  # 2 query heads, 1 KV head
    ids = torch.randint(1, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        replicate_kv_heads(model, 2)
        after = model(ids).logits
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (4, 2, 64)
    assert model.model.layers[0].self_attn.k_proj.out_features == 2 * 64
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_launcher_environment_keeps_nvlink_multicast_off(monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    env = safe_environment()
    assert {k: env[k] for k in NVLINK_MULTICAST_OFF} == {
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1",
    }
    assert os.environ["NCCL_NVLS_ENABLE"] == "1", "the caller's environment is not changed"


def test_memory_by_rank_outside_torchrun_is_this_process(tmp_path):
    import kvpolicy

    model = tiny_llama()
    cache = kvpolicy.load_policy("kivi").make_cache(model)
    with torch.no_grad():
        model(torch.randint(1, 256, (1, 300)), past_key_values=cache, use_cache=True)
    ranked = memory_by_rank(cache)
    assert len(ranked.per_rank) == 1 and ranked.total_bytes == cache.memory().total_bytes


@pytest.fixture(scope="module")
def default_checkpoint(tmp_path_factory):
    """The embedded SmolLM2 with its 3 KV heads replicated to 6, saved once."""
    from kvpolicy.models import default_model_path

    try:
        default_model_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return example().prepare_checkpoint("default", 2, tmp_path_factory.mktemp("smollm2_tp"))


@pytest.mark.model
@pytest.mark.parametrize("policy", ["full", "logquant"])
def test_two_cpu_ranks_match_one_process(default_checkpoint, policy, tmp_path):
    tp, one = run_both(default_checkpoint, policy, tmp_path, "--max-new-tokens", "16")
    assert_within_tolerance(tp, one, policy)
    if policy == "logquant":  # the 400-token row really went through 2-bit storage
        assert tp["memory"][0]["codes"] > 0
    # replicated heads: each rank holds all of SmolLM2's 3 KV heads, as one process does with 6
    assert_memory_split_by_rank(tp, one, heads_per_rank_vs_one=0.5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("policy", ["full", "kivi", "logquant"])
def test_two_gpus_match_one_gpu(policy, tmp_path):
    checkpoint = example().prepare_checkpoint("random-llama", 2, tmp_path / "ckpt")
    executor = [] if policy == "full" else ["--executor", "fused"]
    tp, one = run_both(checkpoint, policy, tmp_path, *executor)
    assert_within_tolerance(tp, one, policy)
    assert_memory_split_by_rank(tp, one, heads_per_rank_vs_one=0.5)  # 8 KV heads: 4 per GPU
