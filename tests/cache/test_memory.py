"""``memory()`` counts what a cache keeps alive: compared with the unique storage reachable from
the cache (stores, executors' memos, rotation matrices, the graph path's buffers), for every
shipped policy, decoded eagerly and through the CUDA-graph path's layers (eager steps on a CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kvpolicy
from kvpolicy.errors import NotSupportedError
from kvpolicy.generation import cache_kwargs
from kvpolicy.policy.registry import get_registry
from tests.conftest import tiny_llama

SHIPPED = get_registry().names("policy")


def reachable_bytes(root) -> int:
    """Bytes of every distinct tensor storage and numpy buffer reachable from ``root`` through
    attributes, attrs fields and containers (the model, configs and modules are not entered)."""
    seen_objects: set[int] = set()
    storages: dict[tuple, int] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen_objects or obj is None or isinstance(obj, (str, bytes, int, float, bool, type)):
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if hasattr(obj, "__tensor_flatten__"):
                names, _ = obj.__tensor_flatten__()
                stack.extend(getattr(obj, n) for n in names)
                continue
            storage = obj.untyped_storage()
            storages[(obj.device, storage.data_ptr())] = storage.nbytes()
            continue
        if isinstance(obj, np.ndarray):
            base = obj if obj.base is None else obj.base
            storages[("numpy", id(base))] = base.nbytes if isinstance(base, np.ndarray) else obj.nbytes
            continue
        if isinstance(obj, (torch.nn.Module, torch.device, torch.dtype, torch.Generator)):
            continue
        if type(obj).__module__.startswith("transformers.") and "cache_utils" not in type(obj).__module__:
            continue  # model configs
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") or hasattr(obj, "__slots__"):
            stack.extend(vars(obj).values() if hasattr(obj, "__dict__") else [])
            for klass in type(obj).__mro__:
                for slot in getattr(klass, "__slots__", ()):
                    stack.append(getattr(obj, slot, None))
    return sum(storages.values())


@pytest.fixture(scope="module")
def model():
    return tiny_llama(dtype=torch.bfloat16, layers=2)


def decoded(model, name: str, cuda_graphs: bool):
    policy = kvpolicy.load_policy(name)
    try:
        cache = policy.make_cache(model, cuda_graphs=cuda_graphs)
    except NotSupportedError:
        return None
    ids = torch.randint(1, 256, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(
            ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), max_new_tokens=40, do_sample=False
        )
    return cache


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "graph-layers"])
@pytest.mark.parametrize("name", SHIPPED)
def test_memory_counts_the_storage_the_cache_keeps(model, name, cuda_graphs):
    cache = decoded(model, name, cuda_graphs)
    if cache is None:
        pytest.skip(f"{name} is not served by the graph path")
    held, reported = reachable_bytes(cache), cache.memory().total_bytes
    assert abs(reported - held) <= 0.02 * held, (reported, held, cache.memory().bytes_by_region)


@pytest.mark.parametrize("name", SHIPPED)
def test_both_paths_say_the_same_of_what_was_demoted(model, name):
    eager, graph = decoded(model, name, False), decoded(model, name, True)
    if graph is None:
        pytest.skip(f"{name} is not served by the graph path")
    assert graph.memory().demoted == eager.memory().demoted
    assert graph.memory().tokens == eager.memory().tokens
    assert ("nothing quantized" in graph.memory().summary()) == ("nothing quantized" in eager.memory().summary())


def test_partial_logquant_after_a_short_prompt_reports_its_demotion_on_both_paths(model):
    """The drift the restructure issue found: 100 prompt tokens, three decode steps."""
    reports = []
    for graphs in (False, True):
        cache = kvpolicy.load_policy("partial_logquant").make_cache(model, cuda_graphs=graphs)
        ids = torch.randint(1, 256, (1, 100), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            model.generate(
                ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), max_new_tokens=4, do_sample=False
            )
        reports.append(cache.memory())
    assert reports[0].demoted and reports[1].demoted


@pytest.mark.parametrize("name", ["kivi", "logquant", "partial_logquant", "streaming"])
def test_graph_buffers_are_sized_by_what_the_run_needs(model, name):
    """A short run with a declared ``max_cache_len``: the ring never outgrows it; without one the
    packed buffers start near the prompt's tokens and grow as decoding needs."""
    ids = torch.randint(1, 256, (1, 20), generator=torch.Generator().manual_seed(5))
    for max_cache_len, prompt in ((30, ids), (None, ids.repeat(1, 15))):
        cache = kvpolicy.load_policy(name).make_cache(model, cuda_graphs=True, max_cache_len=max_cache_len)
        with torch.no_grad():
            model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                **cache_kwargs(cache),
                max_new_tokens=10,
                do_sample=False,
            )
        report = cache.memory()
        assert report.total_bytes <= 2.5 * report.dynamic_cache_bytes, (max_cache_len, report.summary())
