"""Per-layer precision under a bit budget: the layers an ``at: {earliest_within_bits: B}`` entry takes.

A ``layers`` entry written with indices names its layers; one written with a budget takes the
earliest layers the policy serves, one after another, while the policy's mean bits per
quantized element over all the layers it serves stays at most ``B``. Which layers that is
depends on the model (how many layers the policy serves, their head sizes), so
:func:`settle_layers` turns the entry into indices when ``make_cache`` meets the model:

    mean bits = sum_l w_l * b_l / sum_l w_l        (w_l = kv_heads * (head_dim + value_head_dim))
    b_l = (keys' bits * head_dim + values' bits * value_head_dim) / (head_dim + value_head_dim)

where a side's bits are its code width plus its share of the 16-bit scale and zero of its
group (:meth:`~kvpolicy.config.QuantSpec.bits_per_element`), 16 for a side that keeps every
token in full precision and 0 for one that evicts. The full-precision tokens a selector keeps
are not counted: they are the same few per layer whatever the precision of the rest.
KIVI at 2 bits in groups of 32 (keys and values) is 3.0 bits per element.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import attrs

from kvpolicy.cache.layers import LayerSpec, PolicyLayers, factory_for
from kvpolicy.config import LayerOverride, PolicyConfig
from kvpolicy.errors import ConfigError


class Policy(Protocol):
    """What the budget reads of a :class:`kvpolicy.policy.Policy` (which settles itself
    through this module, so this module does not import it)."""

    config: PolicyConfig
    registry: object
    section: str
    overrides: list

    def budget(self) -> dict[str, int | None]: ...


#: bits of a token kept in full precision (a 16-bit deployment)
FULL_PRECISION_BITS = 16.0


def side_bits(policy: Policy, side: str, head_dim: int) -> float:
    """Bits per element of ``side``'s tokens outside the full-precision set, on a head of ``head_dim``."""
    spec = getattr(policy.config, side)
    if policy.budget()[side] is None:
        return FULL_PRECISION_BITS
    if spec.demote == "evict":
        return 0.0
    return spec.quant.bits_per_element(head_dim)


def layer_bits(policy: Policy, spec: LayerSpec) -> float:
    """Mean bits per quantized element of one layer under ``policy`` (keys and values)."""
    dk, dv = spec.head_dim, spec.value_head_dim or spec.head_dim
    return (side_bits(policy, "keys", dk) * dk + side_bits(policy, "values", dv) * dv) / (dk + dv)


def mean_bits(policies: dict[int, Policy], specs: Sequence[LayerSpec]) -> float:
    """Mean bits per quantized element over ``specs``, layer ``s.index`` under ``policies[s.index]``."""
    weights = [s.kv_heads * (s.head_dim + (s.value_head_dim or s.head_dim)) for s in specs]
    bits = [layer_bits(policies[s.index], s) for s in specs]
    return sum(w * b for w, b in zip(weights, bits)) / sum(weights)


def served_layers(policy: Policy, specs: Sequence[LayerSpec], model_name: str) -> list[LayerSpec]:
    """The layers ``policy`` caches itself (those its ``policy`` layer factory builds)."""
    factories = policy.registry.layer_factories()
    return [
        s
        for s in specs
        if isinstance(factory_for(s.type, policy.config.layer_types, factories, model_name), PolicyLayers)
    ]


def settle_layers(policy: Policy, specs: Sequence[LayerSpec], model_name: str = "this model") -> Policy:
    """``policy`` with every budgeted ``layers`` entry turned into the layer indices it takes on
    a model of ``specs`` (entries naming indices keep theirs; a budgeted entry never takes a
    layer one of them names, nor one an earlier budgeted entry took). An entry whose budget is
    below the policy's mean bits before it takes any layer is refused, naming both."""
    config = policy.config
    if not config.budgeted:
        return policy
    config.check_layer_indices(len(specs))
    served = served_layers(policy, specs, model_name)
    explicit = {s.index: config.override_of(s.index, s.num_layers) for s in served}
    current = {index: policy if i is None else policy.overrides[i] for index, i in explicit.items()}
    taken: set[int] = set()
    settled: list[LayerOverride] = []
    for i, override in enumerate(config.layers):
        if override.within_bits is None:
            settled.append(override)
            continue
        before = mean_bits(current, served) if served else 0.0
        if before > override.within_bits + 1e-9:
            raise ConfigError(
                f"layers[{i}].at.earliest_within_bits",
                override.within_bits,
                f"at least {before:.3f}: the policy's mean bits per quantized element on {model_name} "
                "before this entry takes any layer",
            )
        layers = []
        for s in served:
            if explicit[s.index] is not None or s.index in taken:
                continue
            trial = {**current, s.index: policy.overrides[i]}
            if mean_bits(trial, served) > override.within_bits + 1e-9:
                break
            current, layers = trial, [*layers, s.index]
        taken.update(layers)
        if layers:
            settled.append(attrs.evolve(override, at=layers, within_bits=None))
    return type(policy)(attrs.evolve(config, layers=settled), policy.registry, policy.section)
