"""Shared fixtures: a tiny random Llama (fast, CI) and the embedded SmolLM2 model (marked ``model``)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

#: the shape of the tiny random test models: head_dim 64 and GQA (2 query heads per KV head)
TINY = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
    max_position_embeddings=4096,
    attn_implementation="sdpa",
    pad_token_id=0,
    eos_token_id=None,
    bos_token_id=None,
)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2) -> LlamaForCausalLM:
    """A randomly initialised Llama with head_dim 64 and GQA (2 query heads per KV head)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **TINY)).to(dtype).eval()


@pytest.fixture(scope="session")
def smollm():
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in float32, loaded once per test session."""
    from kvpolicy.models import load_default_model

    return load_default_model("smollm2", dtype=torch.float32)


def pytest_configure(config):
    """Under pytest-xdist each worker gets its share of the cores, for torch here and for the
    processes a test starts (``kvpolicy generate``, torchrun): no worker oversubscribes them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers <= 1:
        return
    if os.environ.get("KVPOLICY_RECORD"):
        raise pytest.UsageError("KVPOLICY_RECORD merges one process's rows into one file: run with -n 0")
    threads = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def pytest_sessionfinish(session, exitstatus):
    from tests.recording import write_if_asked

    write_if_asked()
