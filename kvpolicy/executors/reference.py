"""``reference``: dequantize everything, restore position order, call SDPA (the yardstick)."""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from kvpolicy.executors.base import Executor, sdpa_attention, select_mask_columns
from kvpolicy.store import TensorView, take_tokens


def _in_position_order(view: TensorView) -> tuple[torch.Tensor | None, torch.Tensor]:
    tensor, positions = view.materialize()
    if tensor is None:
        return None, positions
    order = torch.argsort(positions)
    return take_tokens(tensor, order), positions[order]


@attrs.define
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
        new_pos = torch.arange(step.past_length, step.past_length + q)  # host bookkeeping, like the stores
        if cached_k is None:
            keys, values, positions = step.new_keys, step.new_values, new_pos
        else:
            keys = torch.cat([cached_k, step.new_keys], dim=2)
            values = torch.cat([cached_v, step.new_values], dim=2)
            positions = torch.cat([pos_k.to(torch.int64), new_pos])
        mask = select_mask_columns(attention_mask, positions, step.past_length + q, q, query.device)
        out, _ = sdpa_attention(module, query, keys, values, mask, **kwargs)
        return out
