"""The bridge to transformers' attention: one registered attention implementation, ``"kvpolicy"``.

transformers lets a model pick its attention function by name (``AttentionInterface``).
``attach(model)`` registers ``"kvpolicy"`` and switches the model to it. Our cache layers
return the step's new keys/values tagged with an :class:`~kvpolicy.executors.AttentionStep`;
the attention function finds the tag and hands the step to the policy's executor. Any
other cache (or none) falls through to transformers' SDPA attention, unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "kvpolicy"
_STEP_ATTRIBUTE = "_kvpolicy_step"


def tag(tensor: torch.Tensor, step, executor, on_attend=None) -> torch.Tensor:
    """Return an alias of ``tensor`` that carries ``(step, executor)`` to the attention function,
    which calls ``on_attend()`` (if given) when it attends the step."""
    alias = tensor.view(tensor.shape)
    setattr(alias, _STEP_ATTRIBUTE, (step, executor, on_attend))
    return alias


@torch.compiler.disable  # host bookkeeping and data-dependent regions: run eagerly under torch.compile
def kvpolicy_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers attention function: dispatch tagged steps to their executor, else SDPA.

    Under ``torch.compile`` the model's own layers compile and this function (like the cache
    layers' ``update``) runs eagerly between the compiled graphs."""
    tagged = getattr(key, _STEP_ATTRIBUTE, None)
    if kwargs.get("output_attentions"):
        from kvpolicy.errors import NotSupportedError

        raise NotSupportedError(
            "output_attentions=True: the 'kvpolicy' attention returns no attention weights (a kvpolicy cache "
            "attends its full-precision and quantized regions separately, and for other caches it runs SDPA, "
            "which computes none). "
            + (
                "Generate without output_attentions."
                if tagged is not None
                else "policy.make_cache(model) switched this model to it: call "
                "model.set_attn_implementation('eager') to get attention weights with another cache."
            )
        )
    _refuse_unserved(module, kwargs)
    if tagged is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    step, executor, on_attend = tagged
    if on_attend is not None:
        on_attend()
    value_tag = getattr(value, _STEP_ATTRIBUTE, None)
    if value_tag is None or value_tag[0] is not step:
        from kvpolicy.errors import NotSupportedError

        raise NotSupportedError(
            f"{type(module).__name__} hands the attention other values than its cache returned (it transforms them "
            "after the cache, as differential attention splits them): a kvpolicy cache attends the values it stores, "
            "so it cannot serve this model; use DynamicCache"
        )
    if attention_mask is not None and attention_mask.is_floating_point() and not step.lossless:
        from kvpolicy.errors import NotSupportedError

        raise NotSupportedError(
            f"{type(module).__name__} hands its attention an additive float mask (a position bias folded into the "
            "mask, as ALiBi models such as Falcon-RW do); a kvpolicy policy that quantizes or evicts tokens reads "
            "the mask as a boolean per cached position, so it would attend without that bias. Use the 'full' "
            "policy or DynamicCache with this model"
        )
    mask = step.row_sinks.remap(attention_mask) if step.row_sinks is not None else attention_mask
    out = executor.attend(module, query, step, mask, **kwargs)
    if step.after_prefill is not None and attention_mask is not None:
        step.after_prefill(attention_mask)
    return out, None


#: attention arguments that change the scores and that neither SDPA nor the executors apply
_UNSERVED = {
    "softcap": "attention-logit soft-capping",
    "s_aux": "learned attention sinks",
    "sinks": "learned attention sinks",
}


def _refuse_unserved(module, kwargs) -> None:
    """Refuse an attention call whose arguments ask for something the 'kvpolicy' attention
    would silently skip (its output would differ from the model's)."""
    for name, feature in _UNSERVED.items():
        if kwargs.get(name) is not None:
            from kvpolicy.errors import NotSupportedError

            raise NotSupportedError(
                f"{type(module).__name__} asks its attention for {feature} ({name}=...), which the 'kvpolicy' "
                "attention does not compute (it runs SDPA and the policy's executors), so the output would differ "
                "from the model's. A kvpolicy cache cannot serve this model; use DynamicCache with its own attention"
            )


def register() -> None:
    """Register the ``"kvpolicy"`` attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, kvpolicy_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def attach(model) -> None:
    """Switch ``model`` to the ``"kvpolicy"`` attention implementation."""
    from kvpolicy.errors import UnsupportedModelError

    register()
    before = model.config._attn_implementation
    if before != ATTENTION_NAME:
        try:
            model.set_attn_implementation(ATTENTION_NAME)
        except (ValueError, NotImplementedError) as err:
            raise UnsupportedModelError(_no_interface(model, before, err)) from None
    if model.config._attn_implementation != ATTENTION_NAME:
        raise UnsupportedModelError(_no_interface(model, model.config._attn_implementation, None))
    if not getattr(model, "_kvpolicy_checked", False):
        model.register_forward_pre_hook(_expect_attention, with_kwargs=True)
        model.register_forward_hook(_check_attended, with_kwargs=True)
        model._kvpolicy_checked = True


def _expect_attention(model, args, kwargs) -> None:
    """Before a forward: the check after it covers this forward's updates only (a cache filled
    by ``Cache.update`` outside a forward, as a shared prefill is handed over, attended nothing)."""
    for key in ("cache", "past_key_values"):
        expect = getattr(kwargs.get(key), "expect_attention", None)
        if expect is not None:
            expect()


def _check_attended(model, args, kwargs, output) -> None:
    """After a forward: every kvpolicy cache layer that was updated handed its step to the
    attention function (else the model attended tensors the cache never held). A kvpolicy
    cache is known by its ``check_attended`` (this module sits below :mod:`kvpolicy.cache`)."""
    for key in ("cache", "past_key_values"):
        check = getattr(kwargs.get(key), "check_attended", None)
        if check is not None:
            check(getattr(model.config, "model_type", type(model).__name__))


def _no_interface(model, kept: str, err: BaseException | None) -> str:
    from kvpolicy.cache.layers import model_name

    reason = f" ({str(err).splitlines()[0]})" if err else ""
    return (
        f"{model_name(model)} does not take a custom attention function: its attention "
        f"implementation stays {kept!r}{reason}. kvpolicy serves models whose attention goes through transformers' "
        "AttentionInterface, which is how a kvpolicy cache reaches the attention"
    )


def is_attached(config) -> bool:
    return getattr(config, "_attn_implementation", None) == ATTENTION_NAME
