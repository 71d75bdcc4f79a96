"""Attention executors: attention for one step over the stored regions plus the new tokens.

An executor receives the store as it was before this step (:class:`~kvpolicy.store.TensorView`
for keys and values) and the step's new keys/values in full precision. New tokens always
take part with their original values, so a prefill attends in full precision before any
demotion. Cached tokens may be stored in any order; attention over them is
order-independent, and each region's positions select the right columns of the mask.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import attrs
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvpolicy.store import TensorView


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


def _in_position_order(view: TensorView) -> tuple[torch.Tensor | None, torch.Tensor]:
    tensor, positions = view.materialize()
    if tensor is None:
        return None, positions
    order = torch.argsort(positions)
    return tensor.index_select(2, order), positions[order]


class ReferenceExecutor(Executor):
    """Dequantize every region, restore position order and call transformers' SDPA attention.

    Correct on any device; materializes the whole cache in the model dtype, so it is the
    yardstick that fast executors are checked against, not the fast path.
    """

    name: ClassVar[str] = "reference"

    def attend(self, module, query, step, attention_mask, **kwargs):
        cached_k, pos_k = _in_position_order(step.keys)
        cached_v, pos_v = _in_position_order(step.values)
        if not torch.equal(pos_k, pos_v):
            raise RuntimeError("key and value stores hold different positions; eviction must match")
        q = query.shape[2]
        new_pos = torch.arange(step.past_length, step.past_length + q, device=query.device)
        if cached_k is None:
            keys, values, positions = step.new_keys, step.new_values, new_pos
        else:
            keys = torch.cat([cached_k, step.new_keys], dim=2)
            values = torch.cat([cached_v, step.new_values], dim=2)
            positions = torch.cat([pos_k.to(torch.int64), new_pos])
        mask = select_mask_columns(attention_mask, positions, step.past_length + q, q)
        out, _ = sdpa_attention_forward(module, query, keys, values, mask, **kwargs)
        return out


def select_mask_columns(
    attention_mask: torch.Tensor | None, positions: torch.Tensor, full_length: int, q: int
) -> torch.Tensor | None:
    """The mask restricted to the kept ``positions`` (sorted, the last ``q`` being the new tokens).

    With nothing evicted the mask is returned untouched. Without a mask, a decode step
    (``q == 1``) needs none and a multi-token step gets an explicit causal mask, since
    SDPA's ``is_causal`` aligns to the top-left corner.
    """
    n = len(positions)
    if n == full_length:
        return attention_mask
    if attention_mask is not None:
        return attention_mask.index_select(-1, positions.to(attention_mask.device))
    if q == 1:
        return None
    cached = n - q
    mask = torch.ones(q, n, dtype=torch.bool, device=positions.device)
    mask[:, cached:] = torch.ones(q, q, dtype=torch.bool, device=positions.device).tril()
    return mask[None, None]
