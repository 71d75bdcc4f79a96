"""Per-layer attention-output error against exact attention over the original keys/values.

:func:`attach_probes` wraps each layer's executor of a :class:`~kvpolicy.cache.policy_cache.KVPolicyCache`.
The wrapper keeps a full-precision shadow of every key/value the layer has seen and, at
each decode step, also computes exact attention for the same query over the shadow. The
relative L1 error ``sum|o - o*| / sum|o*|`` of the layer's output is recorded: the error
the policy's storage adds in that layer, given identical inputs to the layer.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from transformers.cache_utils import DynamicCache

from kvpolicy.cache.policy_cache import KVPolicyCache
from kvpolicy.executors import AttentionStep, Executor, ReferenceExecutor
from kvpolicy.store import TensorView

_EMPTY = torch.empty(0, dtype=torch.int32)


class AttentionErrorProbe(Executor):
    """Runs ``inner`` and records its relative L1 error to exact attention on decode steps."""

    name: ClassVar[str] = "probe"

    def __init__(self, inner: Executor, keys: torch.Tensor, values: torch.Tensor):
        self.inner = inner
        self.keys, self.values = keys, values  # [B, H, n, D] shadow of everything seen
        self.errors: list[float] = []

    def attend(self, module, query, step: AttentionStep, attention_mask, **kwargs):
        out = self.inner.attend(module, query, step, attention_mask, **kwargs)
        n = self.keys.shape[2]
        if query.shape[2] == 1:
            exact_step = AttentionStep(
                keys=TensorView(self.keys, torch.arange(n, dtype=torch.int32), None, _EMPTY, None, _EMPTY),
                values=TensorView(self.values, torch.arange(n, dtype=torch.int32), None, _EMPTY, None, _EMPTY),
                new_keys=step.new_keys,
                new_values=step.new_values,
                past_length=step.past_length,
            )
            exact = ReferenceExecutor().attend(module, query, exact_step, attention_mask, **kwargs).float()
            self.errors.append(float((out.float() - exact).abs().sum() / exact.abs().sum().clamp_min(1e-30)))
        self.keys = torch.cat([self.keys, step.new_keys], dim=2)
        self.values = torch.cat([self.values, step.new_values], dim=2)
        return out


def attach_probes(cache: KVPolicyCache, source: DynamicCache, prefix: int) -> list[AttentionErrorProbe]:
    """Wrap the executor of every layer the policy serves (a hybrid model's sliding-window layers
    hold their window exactly and have none); the shadow starts with ``source``'s first ``prefix`` tokens."""
    probes = []
    for layer, src in zip(cache.layers, source.layers, strict=True):
        if not hasattr(layer, "executor"):
            continue
        probe = AttentionErrorProbe(layer.executor, src.keys[:, :, :prefix], src.values[:, :, :prefix])
        layer.executor = probe
        probes.append(probe)
    return probes
