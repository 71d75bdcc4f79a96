"""Attention executors: attention for one layer and one step over the stored regions plus the new tokens.

* :mod:`~kvpolicy.executors.base`: the contract (:class:`AttentionStep`, :class:`Executor`)
  and the mask columns every executor reads alike.
* ``reference`` (:mod:`~kvpolicy.executors.reference`): dequantize everything, SDPA; the yardstick.
* ``chunked`` (:mod:`~kvpolicy.executors.chunked`): region by region, merged by log-sum-exp;
  the CPU default.
* ``fused`` and ``auto`` (:mod:`~kvpolicy.executors.fused`): decode steps in GPU kernels
  (:mod:`~kvpolicy.executors.kernels`), the rest chunked; ``auto`` is every shipped policy's.
* :mod:`~kvpolicy.executors.pairing` pairs keys with values stored in different orders;
  :mod:`~kvpolicy.executors.partial` holds the log-sum-exp pieces and their merge.

Executors are registered through the ``kvpolicy_executors`` hook and configured as data
(``executor: {type: chunked, chunk_tokens: 2048}``): their attrs fields are their settings.
"""

from kvpolicy.executors.base import (
    AttentionStep,
    Executor,
    allowed_columns,
    exact_attention,
    group_rows,
    in_position_order,
    is_plain_causal,
    repeat_heads,
    sdpa_attention,
    select_mask_columns,
)
from kvpolicy.executors.chunked import ChunkedExecutor
from kvpolicy.executors.fused import AutoExecutor, FusedExecutor, FusedTritonExecutor
from kvpolicy.executors.reference import ReferenceExecutor

__all__ = [
    "AttentionStep",
    "AutoExecutor",
    "ChunkedExecutor",
    "Executor",
    "FusedExecutor",
    "FusedTritonExecutor",
    "ReferenceExecutor",
    "allowed_columns",
    "exact_attention",
    "group_rows",
    "in_position_order",
    "is_plain_causal",
    "repeat_heads",
    "sdpa_attention",
    "select_mask_columns",
]
