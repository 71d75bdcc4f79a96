"""Budget matching: one knob, "full-precision tokens", mapped onto any policy.

Policies are compared at equal memory by giving each the same mean full-precision budget
per layer over keys and values (as LogQuant's paper does: KIVI residual 128, LogQuant
W=42, PartialLogQuant W=64, StreamingLLM 4 sinks + 124). Sink selectors keep their size;
every other selector's size parameter (``size`` or ``window``) is scaled by the same
factor and rounded down, so the matched budget never exceeds the knob.
"""

from __future__ import annotations

import math

import attrs

from kvpolicy.config import PolicyConfig, SelectorSpec, TensorSpec
from kvpolicy.errors import ConfigError
from kvpolicy.policy import Policy
from kvpolicy.registry import Registry, get_registry

#: selector parameters that set how many tokens a selector keeps (scaled by matching)
SIZE_PARAMETERS = ("size", "window")
#: selectors whose size is structural and never scaled
FIXED_SELECTORS = ("sink",)


def _sinks(spec: TensorSpec) -> int:
    return sum(int(s.params.get("size", 4)) for s in spec.retain if s.type in FIXED_SELECTORS)


def _scale(spec: TensorSpec, factor: float, bits: int | None) -> TensorSpec:
    retain = []
    for selector in spec.retain:
        params = dict(selector.params)
        if selector.type not in FIXED_SELECTORS:
            for key in SIZE_PARAMETERS:
                if key in params:
                    params[key] = max(1, math.floor(params[key] * factor + 1e-9))
        retain.append(SelectorSpec(type=selector.type, params=params))
    quant = attrs.evolve(spec.quant, bits=bits) if bits is not None else spec.quant
    return attrs.evolve(spec, retain=tuple(retain), quant=quant)


def at_budget(
    config: PolicyConfig, budget: int, bits: int | None = None, registry: Registry | None = None
) -> PolicyConfig:
    """``config`` rescaled to a mean of at most ``budget`` full-precision tokens per layer
    (keys and values averaged), with ``bits`` for every quantized tensor if given.

    Policies without a bound (``full``) are returned with only the bits changed.
    """
    if budget <= 0:
        raise ConfigError("budget", budget, "a positive number of full-precision tokens")
    registry = registry or get_registry()
    current = Policy(config, registry).budget()
    if current["keys"] is None or current["values"] is None:
        factor = 1.0
    else:
        sinks = (_sinks(config.keys) + _sinks(config.values)) / 2
        scalable = (current["keys"] + current["values"]) / 2 - sinks
        if budget <= sinks:
            raise ConfigError("budget", budget, f"more than the {sinks:g} sink tokens of policy {config.name!r}")
        factor = (budget - sinks) / scalable if scalable else 1.0
    keys = _scale(config.keys, factor, bits if config.keys.demote == "quantize" else None)
    values = _scale(config.values, factor, bits if config.values.demote == "quantize" else None)
    matched = attrs.evolve(config, keys=keys, values=values)
    got = Policy(matched, registry).budget()  # also validates the result
    if got["keys"] is not None and got["values"] is not None and (got["keys"] + got["values"]) / 2 > budget:
        raise ConfigError(
            "budget",
            budget,
            f"a budget policy {config.name!r} can be matched to: scaled by its "
            f"{' / '.join(SIZE_PARAMETERS)} parameters it still keeps {(got['keys'] + got['values']) / 2:g} tokens "
            "(sink selectors and other parameters are not scaled)",
        )
    return matched
