"""kvpolicy: composable KV-cache retention and quantization policies for transformers.

from kvpolicy import load_policy
policy = load_policy("logquant")
out = model.generate(**inputs, cache=policy.make_cache(model))
"""

from kvpolicy.attention import attach
from kvpolicy.cache import KVPolicyCache, KVPolicyLayer, MemoryReport
from kvpolicy.config import PolicyConfig, QuantSpec, SelectorSpec, TensorSpec
from kvpolicy.errors import ConfigError, KVPolicyError, NotSupportedError, UnknownNameError, UnsupportedModelError
from kvpolicy.hookspecs import hookimpl
from kvpolicy.policy import Policy, load_policy
from kvpolicy.registry import Registry, get_registry

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
