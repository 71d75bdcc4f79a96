"""pluggy hook specifications: the one place that says what a kvpolicy plugin can contribute.

A plugin is any module or object with functions named like these hooks, decorated with
:data:`hookimpl`, and listed in the ``kvpolicy`` entry-point group::

    [project.entry-points.kvpolicy]
    my_plugin = "my_package.plugin"

Built-ins are registered through these very hooks (:mod:`kvpolicy.policy.builtins`).
"""

from __future__ import annotations

import pluggy

PROJECT = "kvpolicy"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kvpolicy_selectors() -> list[type]:
    """Return :class:`~kvpolicy.selectors.Selector` subclasses; each is named by its ``name``."""


@hookspec
def kvpolicy_quantizers() -> list[type]:
    """Return :class:`~kvpolicy.quantizers.QuantizerBackend` subclasses (named by ``name``)."""


@hookspec
def kvpolicy_executors() -> list[type]:
    """Return :class:`~kvpolicy.executors.Executor` subclasses (named by ``name``)."""


@hookspec
def kvpolicy_layers() -> list[type]:
    """Return :class:`~kvpolicy.cache.layers.LayerFactory` subclasses (named by ``name``): each builds
    the cache layer of the transformers layer types it ``serves``."""


@hookspec
def kvpolicy_policies() -> list[dict]:
    """Return policy configs as dicts (the YAML schema, see :mod:`kvpolicy.config`)."""
