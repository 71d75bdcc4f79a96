"""``fused`` and ``auto``: decode steps read the packed bytes in GPU kernels; the rest is chunked.

A decode step (one query token) on CUDA goes to :func:`~kvpolicy.executors.kernels.decode_attention`:
the packed region by the first kernel of :data:`~kvpolicy.executors.kernels.PACKED_KERNELS`
that serves it, then one kernel for the full-precision tokens and the merge. Every other
step (CPU, prefill, shapes no kernel serves) goes to the chunked executor's path.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from kvpolicy.errors import ConfigError
from kvpolicy.executors import partial as pa
from kvpolicy.executors.base import allowed_columns
from kvpolicy.executors.chunked import ChunkedExecutor
from kvpolicy.executors.kernels import common, decode
from kvpolicy.executors.kernels.common import decode_fusable, gluon_available, triton_available
from kvpolicy.quantizers.rotation import rotate, rotate_back

KERNEL_CHOICES = ("auto", *decode.KERNEL_NAMES)


def _kernel_choice(instance, attribute, value) -> None:
    if value not in KERNEL_CHOICES:
        raise ConfigError("executor.kernel", value, " | ".join(KERNEL_CHOICES))


@attrs.define
class FusedExecutor(ChunkedExecutor):
    """Decode steps read the packed bytes directly in Triton/Gluon kernels (CUDA); the rest is chunked.

    A decode step is two kernels: one over the packed region
    (:func:`~kvpolicy.executors.kernels.packed_splits`) and one that attends the full-precision
    tokens (kept, staged, new) and merges both into the output
    (:func:`~kvpolicy.executors.kernels.decode_attention`). Supports the native backend with
    keys per-channel and values per-token (KIVI's layout), rotated or not (:mod:`kvpolicy.quantizers.rotation`:
    the step runs in the rotated space), 2, 3, 4 or 8 bits, key groups of 16 tokens
    or more, value groups that divide the head dimension, bf16/fp16/fp32
    (see :func:`~kvpolicy.executors.kernels.common.decode_fusable`).
    Keys and values stored in different orders are paired first
    (:mod:`kvpolicy.executors.pairing`): the kernel reads each packed key's value row where it
    is. Multi-token steps, CPU tensors and shapes the kernels do not serve go to the chunked
    executor's path.

    ``kernel``: the packed region's kernel: ``auto`` (Gluon where it serves the shapes, see
    :class:`~kvpolicy.executors.kernels.MmaSplits`, else Triton), ``mma`` (Gluon only) or ``triton``.
    """

    name: ClassVar[str] = "fused"
    kernel: str = attrs.field(
        default="auto",
        validator=_kernel_choice,
        metadata={"doc": "packed-region kernel of decode steps: `auto`, `mma` (Gluon) or `triton`"},
    )

    def kernels_serve(self, query: torch.Tensor) -> bool:
        """Whether this step's tensors may go to the kernels at all (device and Triton)."""
        return (query.is_cuda or common.interpreted()) and triton_available()

    def attend_regions(self, query, regions, step, attention_mask, scaling):
        keys, values = regions.packed_keys, regions.packed_values
        paired_by_rows = regions.value_rows is not None
        value_head_dim = step.new_values.shape[-1]
        if not (self.kernels_serve(query) and decode_fusable(query, value_head_dim, keys, values, paired_by_rows)):
            return super().attend_regions(query, regions, step, attention_mask, scaling)
        b, _, _, d = query.shape
        scaling = scaling if scaling is not None else d**-0.5
        fp_bias = packed_bias = None
        if attention_mask is not None:
            past = step.past_length
            fp_pos = torch.cat([regions.full_precision_pos, torch.tensor([past], dtype=torch.int32)])
            fp_bias = token_bias(pa.group_bias(allowed_columns(attention_mask, fp_pos, past, 1, query.device), 1), b)
            if keys is not None:
                allowed = allowed_columns(attention_mask, regions.packed_pos, past, 1, query.device)
                packed_bias = token_bias(pa.group_bias(allowed, 1), b)
        full = [*regions.full_precision, (step.new_keys, step.new_values)]
        value_rows = regions.value_rows_on(query.device)
        kernel = None if self.kernel == "auto" else self.kernel
        return biased_decode(query, full, keys, values, scaling, fp_bias, packed_bias, value_rows, kernel=kernel)


@attrs.define
class FusedTritonExecutor(FusedExecutor):
    """The fused executor with the Triton kernel by default (``fused`` with ``kernel: triton``).

    Kept as a name of its own for configs written before executors took parameters."""

    name: ClassVar[str] = "fused-triton"
    kernel: str = attrs.field(default="triton", validator=_kernel_choice, metadata={"doc": "as `fused`"})


@attrs.define
class AutoExecutor(FusedExecutor):
    """The default: the fused kernels on CUDA where they serve the step, else the chunked path.

    The chunked path serves CPU tensors, multi-token steps and shapes the kernels do not;
    unlike ``fused`` it never runs Triton's CPU interpreter."""

    name: ClassVar[str] = "auto"

    def kernels_serve(self, query: torch.Tensor) -> bool:
        return query.is_cuda and triton_available()

    @staticmethod
    def resolves_to(device: str | torch.device | None = None) -> str:
        """What ``auto`` runs on ``device`` (default: the first CUDA device if any, else CPU)."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type != "cuda":
            return f"chunked (device {device.type}: no fused kernels)"
        if not triton_available():
            return "chunked (CUDA without Triton: install triton for the fused kernels)"
        name = torch.cuda.get_device_name(device)
        gluon = gluon_available() and torch.cuda.get_device_capability(device) >= (8, 0)
        kernel = "Gluon where it serves the shapes, else Triton" if gluon else "Triton"
        return f"fused on {name} ({kernel}); multi-token steps chunked through SDPA kernels"


def token_bias(column_bias: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """A decode step's additive bias ``[B or 1, 1, R, n]`` (every row alike, see
    :func:`kvpolicy.executors.partial.group_bias`) -> ``[B, n]``, as the kernels read it."""
    return None if column_bias is None else column_bias[:, 0, 0, :].expand(batch, -1)


def biased_decode(query, full, keys, values, scaling, fp_bias=None, packed_bias=None, value_rows=None, fused=True,
                  kernel=None) -> torch.Tensor:  # fmt: skip
    """One decode step ``[B, H_q, 1, D]`` -> ``[B, 1, H_q, D]`` over full-precision pairs ``full``
    and a packed region ``keys``/``values`` (or ``None``) under additive float32 biases ``[B, Σn]``
    and ``[B, N]`` (``value_rows``: see :func:`~kvpolicy.executors.kernels.decode_attention`).
    Rotated codes are read as stored: the step runs in their rotated space (the query and the
    full-precision keys by the keys' rotation, the values by the values', the output rotated
    back). ``fused``: the decode kernels; else the same sums in float32."""
    key_rotation, value_rotation = getattr(keys, "rotation", None), getattr(values, "rotation", None)
    query = rotate(query, key_rotation)
    full = [(rotate(k, key_rotation), rotate(v, value_rotation)) for k, v in full]
    if fused:
        out = decode.decode_attention(query, full, keys, values, scaling, fp_bias, packed_bias, value_rows, kernel)
        return rotate_back(out, value_rotation)
    b, hq, q, _ = query.shape
    grouped = pa.group_queries(query, full[0][0].shape[1])
    parts = [(torch.cat([k for k, _ in full], 2), torch.cat([v for _, v in full], 2), fp_bias)]
    if keys is not None:
        stored_values = values.dequantize_stored()
        if value_rows is not None:  # each key's value row (-1: none, left out by the bias)
            stored_values = stored_values.index_select(2, value_rows.clamp(min=0))
        parts.append((keys.dequantize_stored(), stored_values, packed_bias))
    result = pa.merge([pa.partial(grouped, k, v, scaling, None if bias is None else bias[:, None, None, :])
                       for k, v, bias in parts])  # fmt: skip
    return rotate_back(pa.ungroup_output(result[0], hq, q).to(query.dtype), value_rotation)
