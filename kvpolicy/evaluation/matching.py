"""Budget matching: one knob, "full-precision tokens", mapped onto any policy.

Policies are compared at equal memory by giving each the same mean full-precision budget
per layer over keys and values (as LogQuant's paper does: KIVI residual 128, LogQuant
W=42, PartialLogQuant W=64, StreamingLLM 4 sinks + 124). Each selector scales itself
(:meth:`~kvpolicy.selectors.Selector.scaled`): its fixed part (sinks) stays, the rest is
scaled by the same factor and rounded down, so the matched budget never exceeds the knob.
A plugin's selector that does not say how it scales is refused by name, never left as it is.
"""

from __future__ import annotations

import attrs

from kvpolicy.config import PolicyConfig, SelectorSpec, TensorSpec
from kvpolicy.errors import ConfigError
from kvpolicy.policy import Policy
from kvpolicy.policy.registry import Registry, get_registry, parameter_names


def _selectors(spec: TensorSpec, registry: Registry) -> list:
    return [registry.selector_class(s.type)(**s.params) for s in spec.retain]


def _fixed(spec: TensorSpec, registry: Registry) -> int:
    return sum(selector.fixed_budget for selector in _selectors(spec, registry))


def _scale(spec: TensorSpec, factor: float, bits: int | None, registry: Registry) -> TensorSpec:
    retain = []
    for selector_spec, selector in zip(spec.retain, _selectors(spec, registry)):
        try:
            scaled = selector.scaled(factor)
        except NotImplementedError as err:
            raise ConfigError("budget", selector_spec.to_dict(), f"selectors that can scale ({err})") from None
        params = {name: getattr(scaled, name) for name in parameter_names(type(scaled))}
        retain.append(SelectorSpec(type=selector_spec.type, params=params))
    quant = attrs.evolve(spec.quant, bits=bits) if bits is not None else spec.quant
    return attrs.evolve(spec, retain=tuple(retain), quant=quant)


def at_budget(
    config: PolicyConfig, budget: int, bits: int | None = None, registry: Registry | None = None
) -> PolicyConfig:
    """``config`` rescaled to a mean of at most ``budget`` full-precision tokens per layer
    (keys and values averaged), with ``bits`` for every quantized tensor if given. Its
    ``layers`` overrides are kept as written (their own retention and bits).

    Policies without a bound (``full``) are returned with only the bits changed.
    """
    if budget <= 0:
        raise ConfigError("budget", budget, "a positive number of full-precision tokens")
    registry = registry or get_registry()
    current = Policy(config, registry).budget()
    if current["keys"] is None or current["values"] is None:
        factor = 1.0
    else:
        sinks = (_fixed(config.keys, registry) + _fixed(config.values, registry)) / 2
        scalable = (current["keys"] + current["values"]) / 2 - sinks
        if budget <= sinks:
            raise ConfigError("budget", budget, f"more than the {sinks:g} sink tokens of policy {config.name!r}")
        factor = (budget - sinks) / scalable if scalable else 1.0
    keys = _scale(config.keys, factor, bits if config.keys.demote == "quantize" else None, registry)
    values = _scale(config.values, factor, bits if config.values.demote == "quantize" else None, registry)
    matched = attrs.evolve(config, keys=keys, values=values)
    got = Policy(matched, registry).budget()  # also validates the result
    if got["keys"] is not None and got["values"] is not None and (got["keys"] + got["values"]) / 2 > budget:
        raise ConfigError(
            "budget",
            budget,
            f"a budget policy {config.name!r} can be matched to: with its selectors scaled it still keeps "
            f"{(got['keys'] + got['values']) / 2:g} tokens (sinks and at least one token per selector stay)",
        )
    return matched
