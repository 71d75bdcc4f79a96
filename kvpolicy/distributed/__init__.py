"""Tensor-parallel generation: kvpolicy caches under transformers' ``tp_plan="auto"``.

kvpolicy builds no parallel engine. transformers shards the model (``q/k/v_proj``
column-wise, ``o_proj`` row-wise), so each rank's attention sees only its own KV heads:
``[B, H_kv / world, q, D]``. A kvpolicy cache on that rank stores, selects, quantizes and
attends over those heads alone; nothing crosses ranks but the model's own all-reduces.

This module adds what the model does not: a launcher whose environment keeps NVLink
multicast off, a loader, memory accounting per rank and in total, and a way to make a
model whose head counts do not divide by the number of ranks shardable.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs
import torch

from kvpolicy.cache.policy_cache import KVPolicyCache, MemoryReport
from kvpolicy.errors import UnsupportedModelError

#: NVLink multicast off in NCCL, PyTorch symmetric memory and NVSHMEM. Set in every
#: environment kvpolicy launches; a program that uses multicast can take shared GPUs down.
NVLINK_MULTICAST_OFF: Mapping[str, str] = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def safe_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``base`` (default ``os.environ``) with :data:`NVLINK_MULTICAST_OFF` forced."""
    env = dict(os.environ if base is None else base)
    env.update(NVLINK_MULTICAST_OFF)
    return env


def torchrun_command(script: str | Path, nproc: int, args: Sequence[str] = ()) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N script args...``"""
    if nproc < 1:
        raise ValueError(f"nproc: got {nproc}; allowed: a positive number of processes")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(script),
        *map(str, args),
    ]


def launch(
    script: str | Path, nproc: int, args: Sequence[str] = (), timeout: float | None = None
) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nproc`` ranks through torchrun, NVLink multicast off.

    Raises ``RuntimeError`` with the end of the ranks' output when any rank fails."""
    done = subprocess.run(
        torchrun_command(script, nproc, args), env=safe_environment(), timeout=timeout, capture_output=True, text=True
    )
    if done.returncode:
        tail = (done.stdout + done.stderr)[-4000:]
        raise RuntimeError(f"torchrun of {script} on {nproc} ranks exited with {done.returncode}:\n{tail}")
    return done


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def load_tensor_parallel(path: str | Path, dtype: torch.dtype = torch.bfloat16):
    """Load a causal LM from a local folder, sharded over the torchrun ranks with ``tp_plan="auto"``.

    Call on every rank. NVLink multicast is switched off in this process first.
    """
    from transformers import AutoModelForCausalLM

    os.environ.update(NVLINK_MULTICAST_OFF)
    if "WORLD_SIZE" not in os.environ:
        raise RuntimeError("load_tensor_parallel runs under torchrun (WORLD_SIZE is not set); see kvpolicy.launch")
    return AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=dtype).eval()


@attrs.frozen
class RankedMemory:
    """Each rank's :class:`~kvpolicy.cache.policy_cache.MemoryReport` (rank order) and their sum."""

    per_rank: tuple[MemoryReport, ...]

    @property
    def total_bytes(self) -> int:
        return sum(r.total_bytes for r in self.per_rank)

    @property
    def baseline_16bit_bytes(self) -> int:
        return sum(r.baseline_16bit_bytes for r in self.per_rank)

    @property
    def ratio(self) -> float:
        base = self.baseline_16bit_bytes
        return self.total_bytes / base if base else 0.0

    def summary(self) -> str:
        lines = [f"rank {i}: {r.summary()}" for i, r in enumerate(self.per_rank)]
        lines.append(
            f"total over {len(self.per_rank)} ranks: {self.total_bytes / 2**20:.2f} MiB vs "
            f"{self.baseline_16bit_bytes / 2**20:.2f} MiB in 16-bit (ratio {self.ratio:.3f})"
        )
        return "\n".join(lines)


def memory_by_rank(cache: KVPolicyCache) -> RankedMemory:
    """Gather every rank's cache memory (a collective: call on all ranks)."""
    report = cache.memory()
    _, world = rank_and_world()
    if world == 1:
        return RankedMemory((report,))
    gathered: list[MemoryReport | None] = [None] * world
    torch.distributed.all_gather_object(gathered, report)
    return RankedMemory(tuple(gathered))


def replicate_kv_heads(model, copies: int):
    """Make a Llama-style model's head counts divisible by ``copies`` without changing its function.

    Every attention layer gets ``copies`` stacked copies of its q/k/v projections and an
    ``o_proj`` of ``copies`` copies scaled by ``1 / copies`` (exact in floating point for
    powers of two). Sharded over ``copies`` ranks, rank ``r`` then computes the original
    attention exactly, so a model with 3 KV heads (SmolLM2-135M) can run on 2 GPUs. Each
    rank holds all the original KV heads: this is for testing and demos, not for saving
    memory. Returns ``model``, changed in place.
    """
    if copies < 1:
        raise ValueError(f"copies: got {copies}; allowed: a positive integer")
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for layer in model.model.layers:
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(attn, name):
                raise UnsupportedModelError(f"{type(model).__name__}: attention has no {name}; cannot replicate heads")
        with torch.no_grad():
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(attn, name, _stacked(getattr(attn, name), copies))
            o = attn.o_proj
            wide = torch.nn.Linear(o.in_features * copies, o.out_features, bias=o.bias is not None)
            wide = wide.to(dtype=o.weight.dtype, device=o.weight.device)
            wide.weight.copy_(torch.cat([o.weight / copies] * copies, dim=1))
            if o.bias is not None:
                wide.bias.copy_(o.bias)
            attn.o_proj = wide
    config.head_dim = head_dim
    config.num_attention_heads *= copies
    config.num_key_value_heads = (config.num_key_value_heads or config.num_attention_heads // copies) * copies
    return model


def _stacked(linear: torch.nn.Linear, copies: int) -> torch.nn.Linear:
    out = torch.nn.Linear(linear.in_features, linear.out_features * copies, bias=linear.bias is not None)
    out = out.to(dtype=linear.weight.dtype, device=linear.weight.device)
    out.weight.copy_(torch.cat([linear.weight] * copies, dim=0))
    if linear.bias is not None:
        out.bias.copy_(torch.cat([linear.bias] * copies))
    return out
