"""kvpolicy: composable KV-cache retention and quantization policies for transformers.

from kvpolicy import load_policy
policy = load_policy("logquant")
out = model.generate(**inputs, cache=policy.make_cache(model))
"""

from kvpolicy.errors import ConfigError, KVPolicyError, NotSupportedError, UnknownNameError, UnsupportedModelError
from kvpolicy.hookspecs import hookimpl

# The rest loads on first use (PEP 562), so that `kvpolicy --help`, `list` and `show` do not
# import transformers (seconds) before parsing their arguments.
_LAZY = {
    "attach": "kvpolicy.cache.attention",
    "KVPolicyCache": "kvpolicy.cache",
    "KVPolicyLayer": "kvpolicy.cache",
    "MemoryReport": "kvpolicy.cache",
    "PolicyConfig": "kvpolicy.config",
    "QuantSpec": "kvpolicy.config",
    "SelectorSpec": "kvpolicy.config",
    "TensorSpec": "kvpolicy.config",
    "Policy": "kvpolicy.policy",
    "load_policy": "kvpolicy.policy",
    "Registry": "kvpolicy.policy.registry",
    "get_registry": "kvpolicy.policy.registry",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kvpolicy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "KVPolicyCache",
    "KVPolicyError",
    "KVPolicyLayer",
    "MemoryReport",
    "NotSupportedError",
    "Policy",
    "PolicyConfig",
    "QuantSpec",
    "Registry",
    "SelectorSpec",
    "TensorSpec",
    "UnknownNameError",
    "UnsupportedModelError",
    "attach",
    "get_registry",
    "hookimpl",
    "load_policy",
]
