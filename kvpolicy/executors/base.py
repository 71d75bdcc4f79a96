"""The executor contract: what one attention call of one layer sees, and who computes it.

An executor receives the store as it was before this step (:class:`~kvpolicy.store.TensorView`
for keys and values) and the step's new keys/values in full precision. New tokens always
take part with their original values, so a prefill attends in full precision before any
demotion. Cached tokens may be stored in any order; attention over them is
order-independent, and each region's positions select the right columns of the mask
(:func:`allowed_columns`), which every executor reads the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import attrs
import torch

from kvpolicy.store import TensorView
from kvpolicy.transfer import to_device

if TYPE_CHECKING:
    from kvpolicy.store.row_sinks import RowSinks


@attrs.frozen
class AttentionStep:
    """What one attention call of one layer sees.

    ``new_keys``/``new_values``: ``[B, H_kv, q, D]`` at positions ``past_length .. past_length+q-1``.
    """

    keys: TensorView
    values: TensorView
    new_keys: torch.Tensor
    new_values: torch.Tensor
    past_length: int
    #: per-row sink placement to apply to the mask (a left-padded batch, after its prefill)
    row_sinks: RowSinks | None = None
    #: called with the prefill's mask once attention is done (places per-row sinks)
    after_prefill: Callable[[torch.Tensor], None] | None = None
    #: keys and values are known to hold the same positions in the same order (their stores
    #: retain and demote alike), so executors need not compare the views' positions
    aligned: bool = False
    #: the layer keeps every token in full precision, in position order (a policy without a
    #: budget, like ``full``): attention is always plain SDPA over the concatenation
    lossless: bool = False


class Executor(ABC):
    """Computes attention for one layer and one step."""

    name: ClassVar[str]

    @abstractmethod
    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        step: AttentionStep,
        attention_mask: torch.Tensor | None,
        **kwargs,
    ) -> torch.Tensor:
        """Return the attention output ``[B, q, H_q, D]`` for ``query`` ``[B, H_q, q, D]``.

        ``attention_mask`` is transformers' boolean mask over positions ``0 .. past_length+q-1``
        (``[B or 1, 1, q, past_length+q]``, True = attend) or ``None`` (plain causal).
        """

    def nbytes(self) -> int:
        """Bytes this executor keeps for its layer between steps (memos of dequantized tokens)."""
        return 0

    def reset(self) -> None:
        """Drop what :meth:`nbytes` counts (the cache was emptied); nothing by default."""
        return None


def select_mask_columns(
    attention_mask: torch.Tensor | None,
    positions: torch.Tensor,
    full_length: int,
    q: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """The mask restricted to the kept ``positions`` (sorted, the last ``q`` being the new tokens).

    With nothing evicted the mask is returned untouched (so ``full`` matches DynamicCache
    bit for bit). Otherwise see :func:`allowed_columns`; SDPA's ``is_causal`` cannot be used
    when cached tokens precede a multi-token step, since it aligns to the top-left corner.
    """
    n = len(positions)
    if n == full_length and (attention_mask is not None or q == 1 or n == q):
        return attention_mask
    return allowed_columns(attention_mask, positions, full_length - q, q, device)


def allowed_columns(
    attention_mask: torch.Tensor | None,
    positions: torch.Tensor,
    past_length: int,
    q: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """Bool ``[B or 1, 1, q, n]`` saying which query rows may see the tokens at ``positions``,
    or ``None`` when all may (a decode step without padding)."""
    positions = positions.to(torch.int64)
    if attention_mask is not None:
        return attention_mask.index_select(-1, to_device(positions, attention_mask.device))
    if q == 1:
        return None
    query_pos = torch.arange(past_length, past_length + q, device=positions.device)
    return (positions[None, :] <= query_pos[:, None])[None, None].to(device)


def is_plain_causal(attention_mask: torch.Tensor | None, past: int, q: int) -> bool:
    """Whether ``attention_mask`` (``[B or 1, 1, q, past+q]``, True = attend) is the plain causal
    mask of a step after ``past`` cached tokens, with no padding: then the kernels run without a
    mask (what transformers hands a chunked prefill or a second turn without padding)."""
    if attention_mask is None:
        return True
    if attention_mask.shape[-1] != past + q or attention_mask.shape[-2] != q:
        return False
    causal = torch.ones(q, q, dtype=torch.bool, device=attention_mask.device).tril_()
    return bool(attention_mask[..., :past].all()) and bool((attention_mask[..., past:] == causal).all())


def repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, H_kv, n, D]`` -> ``[B, H_kv*groups, n, D]``, query head ``h`` reading KV head
    ``h // groups`` (transformers' ``repeat_kv``)."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def group_rows(allowed: torch.Tensor, groups: int) -> torch.Tensor:
    """Bool ``[B or 1, 1, q, n]`` -> ``[B or 1, 1, groups*q, n]``, the rows of grouped queries
    (see :func:`kvpolicy.executors.partial.group_queries`)."""
    if groups == 1:
        return allowed
    b, _, q, n = allowed.shape
    return allowed.unsqueeze(2).expand(b, 1, groups, q, n).reshape(b, 1, groups * q, n)


def in_position_order(step: AttentionStep) -> bool:
    """Whether every cached token is still in full precision, in position order (nothing was
    demoted or evicted yet): then attention is plain SDPA over the concatenation, exactly what
    a ``DynamicCache`` computes."""
    keys, values = step.keys, step.values
    return (
        keys.packed is None
        and values.packed is None
        and keys.staging is None
        and values.staging is None
        and len(keys.fp_pos) == len(values.fp_pos) == step.past_length
    )


def exact_attention(module, query, step: AttentionStep, attention_mask, **kwargs) -> torch.Tensor:
    """transformers' SDPA attention over the cached full-precision tokens plus the new ones
    (only where :func:`in_position_order` holds): a first prefill reads no cache at all."""
    if step.keys.fp is None:
        keys, values = step.new_keys, step.new_values
    else:
        keys = torch.cat([step.keys.fp, step.new_keys], dim=2)
        values = torch.cat([step.values.fp, step.new_values], dim=2)
    q, n = query.shape[2], keys.shape[2]
    if attention_mask is None and q > 1 and n > q:  # SDPA's is_causal would align to the top left
        attention_mask = allowed_columns(None, torch.arange(n), n - q, q, query.device)
    out, _ = sdpa_attention(module, query, keys, values, attention_mask, **kwargs)
    return out


def sdpa_attention(module, query, keys, values, attention_mask, **kwargs):
    """transformers' SDPA attention function (imported on first use: transformers is slow to
    import, and ``kvpolicy list``/``show`` never attend)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, keys, values, attention_mask, **kwargs)
