"""How ``generate()`` takes a cache in the installed transformers.

transformers renamed ``generate(past_key_values=...)`` to ``generate(cache=...)`` (the old
name warns and goes in transformers 6); older 5.x releases know only ``past_key_values``.
:func:`cache_kwargs` gives the keyword this installation expects, so our own documented
path never warns::

    out = model.generate(**inputs, **cache_kwargs(policy.make_cache(model)), max_new_tokens=32)
"""

from __future__ import annotations

import functools
import inspect


@functools.cache
def cache_keyword() -> str:
    """``"cache"`` where the installed ``generate()`` takes it, else ``"past_key_values"``."""
    from transformers import GenerationMixin

    try:
        source = inspect.getsource(GenerationMixin.generate)
    except (OSError, TypeError):  # no source shipped: the keyword every 5.x release accepts
        return "past_key_values"
    return "cache" if 'new_name="cache"' in source else "past_key_values"


def cache_kwargs(cache) -> dict:
    """``{keyword: cache}`` for ``model.generate(...)`` (see :func:`cache_keyword`)."""
    return {cache_keyword(): cache}


def forward_cache_kwargs(model, cache) -> dict:
    """``{keyword: cache}`` for a model's own forward (``model(input_ids, **forward_cache_kwargs(model, cache))``):
    ``cache`` where its forward names that parameter, else ``past_key_values``."""
    try:
        parameters = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        parameters = {}
    return {"cache" if "cache" in parameters else "past_key_values": cache}
