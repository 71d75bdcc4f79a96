"""Cache layers and what they are built from.

* :mod:`kvpolicy.cache.layers`: what each decoder layer of a model caches (``LayerSpec``) and
  the layer factories that build its cache layer;
* :mod:`kvpolicy.cache.policy_cache`: ``KVPolicyCache``, ``KVPolicyLayer`` and the memory report;
* :mod:`kvpolicy.cache.attention`: the ``"kvpolicy"`` attention function transformers calls;
* :mod:`kvpolicy.cache.sliding`: the full-precision window of sliding-window layers.

``KVPolicyCache``, ``KVPolicyLayer``, ``MemoryReport`` and ``attention_layout`` are importable
from here; they load on first use, so reading a model's layers does not import transformers'
cache classes.
"""

from __future__ import annotations

_LAZY = ("KVPolicyCache", "KVPolicyLayer", "MemoryReport", "attention_layout")


def __getattr__(name: str):
    if name in _LAZY:
        from kvpolicy.cache import policy_cache

        value = getattr(policy_cache, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kvpolicy.cache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
