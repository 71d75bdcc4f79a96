"""The built-in plugin: core selectors, the native/quanto/hqq quantizers, the executors, the
layer factories (full attention, sliding windows) and ``full``.

Registered by :class:`~kvpolicy.policy.registry.Registry` through the same hooks as any plugin.
"""

from __future__ import annotations

from pathlib import Path

from kvpolicy.cache.layers import BUILTIN_LAYER_FACTORIES
from kvpolicy.config import policy_files
from kvpolicy.executors import AutoExecutor, ChunkedExecutor, FusedExecutor, FusedTritonExecutor, ReferenceExecutor
from kvpolicy.hookspecs import hookimpl
from kvpolicy.quantizers.hqq import HQQQuantizer
from kvpolicy.quantizers.native import NativeQuantizer
from kvpolicy.quantizers.quanto import QuantoQuantizer
from kvpolicy.selectors import BUILTIN_SELECTORS


@hookimpl
def kvpolicy_selectors():
    return list(BUILTIN_SELECTORS)


@hookimpl
def kvpolicy_quantizers():
    return [NativeQuantizer, QuantoQuantizer, HQQQuantizer]


@hookimpl
def kvpolicy_executors():
    return [AutoExecutor, ReferenceExecutor, ChunkedExecutor, FusedExecutor, FusedTritonExecutor]


@hookimpl
def kvpolicy_layers():
    return list(BUILTIN_LAYER_FACTORIES)


@hookimpl
def kvpolicy_policies():
    """``full``, the 16-bit baseline (``policies/full.yaml`` beside this module)."""
    return policy_files(Path(__file__).parent / "policies")
