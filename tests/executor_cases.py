"""Decode steps of cached layers attended by the fused executor, against float64 attention.

:func:`run_case` builds a layer from a policy (window 16, keys per-channel, values per-token),
fills it, takes one decode step and compares the executor's output with float64 softmax
attention over the same stored (dequantized) tokens. ``python -m tests.executor_cases`` runs
:data:`CASES` and prints one JSON line each, with the path the step took (``fused`` when
:func:`kvpolicy.executors.kernels.decode_attention` ran); with ``TRITON_INTERPRET=1`` the kernels run in
Triton's CPU interpreter, so CI checks the executor's decode path without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator

import torch

from kvpolicy import Policy
from kvpolicy.executors import ReferenceExecutor
from kvpolicy.executors.kernels import decode

# dtype, batch, kv heads, query heads per kv head, head dim, cached tokens, key bits, value
# bits, key group, value group, left padding, key retention ("log": keys keep a log-distributed
# set, values a window, so the two sides are stored in different orders, as in PartialLogQuant)
CASES = [
    ("float16", 2, 2, 4, 64, 300, 2, 2, 64, 64, True, "window"),
    ("float16", 1, 3, 3, 64, 140, 4, 2, 32, 32, False, "window"),
    ("float32", 3, 1, 2, 128, 77, 2, 4, 32, 64, True, "window"),
    ("float16", 1, 2, 1, 64, 20, 2, 2, 32, 32, False, "window"),  # nothing packed yet (4 tokens staged)
    ("float16", 2, 2, 4, 64, 300, 2, 2, 32, 64, True, "log"),
    ("float16", 1, 1, 2, 64, 40, 2, 2, 16, 64, False, "log"),  # a packed key whose value is staged
    ("float16", 2, 2, 4, 128, 300, 3, 3, 32, 32, True, "window"),  # 3-bit codes on both sides
]


class Module(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def policy(window, kbits, vbits, kgroup, vgroup, executor="fused", key_retention="window", rotate="none"):
    """Keys per-channel, values per-token; both keep a window of ``window``, or the keys a
    log-distributed set (``key_retention="log"``, log window ``window // 2``); ``rotate``: both
    sides' ``quant.rotate``."""

    def side(bits, group, axis, retain):
        return {"retain": [retain], "quant": {"bits": bits, "group_size": group, "axis": axis, "rotate": rotate}}

    window_retain = {"type": "window", "size": window}
    key_retain = window_retain if key_retention == "window" else {"type": "log", "window": window // 2}
    return Policy.from_dict(
        {
            "name": "t",
            "keys": side(kbits, kgroup, "channel", key_retain),
            "values": side(vbits, vgroup, "token", window_retain),
            "executor": executor,
        }
    )


def float64_attention(query, step, mask, scaling):
    """softmax(q k^T) v in float64 from the stored (dequantized) tokens plus the new one."""
    ref_step_k, pos = step.keys.materialize()
    ref_step_v, pos_v = step.values.materialize()
    order_k, order_v = torch.argsort(pos), torch.argsort(pos_v)
    assert torch.equal(pos[order_k], pos_v[order_v])
    ref_step_k, ref_step_v, pos = ref_step_k[:, :, order_k], ref_step_v[:, :, order_v], pos[order_k]
    keys = torch.cat([ref_step_k, step.new_keys], 2).double()
    values = torch.cat([ref_step_v, step.new_values], 2).double()
    positions = torch.cat([pos.long().to(query.device), torch.tensor([step.past_length], device=query.device)])
    groups = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    scores = torch.einsum("bhqd,bhnd->bhqn", query.double(), keys) * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask[..., positions], float("-inf"))
    return torch.einsum("bhqn,bhnd->bhqd", torch.softmax(scores, -1), values).transpose(1, 2)


def run_case(
    device,
    dtype,
    batch,
    kv_heads,
    groups,
    head_dim,
    length,
    kbits,
    vbits,
    kgroup,
    vgroup,
    padded,
    retention,
    seed,
    executor="fused",
    rotate="none",
):
    """``(relative error vs float64, the reference executor's output)`` of one decode step."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    layer = policy(16, kbits, vbits, kgroup, vgroup, executor, key_retention=retention, rotate=rotate)
    layer = layer.new_layer(head_dim)
    pad = torch.ones(batch, length + 1, dtype=torch.bool)
    if padded:
        for row in range(1, batch):
            pad[row, : int(torch.randint(0, length, (1,), generator=g))] = False
    k, v = (torch.randn(2, batch, kv_heads, length, head_dim, generator=g) * 2).to(device, dtype)
    layer.update(k, v)
    k1, v1 = torch.randn(2, batch, kv_heads, 1, head_dim, generator=g).to(device, dtype)
    step = layer.update(k1, v1)[0]._kvpolicy_step[0]
    query = torch.randn(batch, kv_heads * groups, 1, head_dim, generator=g).to(device, dtype)
    mask = pad[:, None, None, :].to(device) if padded else None
    scaling = head_dim**-0.5
    got = layer.executor.attend(Module(groups), query, step, mask, scaling=scaling)
    expected = float64_attention(query, step, mask, scaling)
    assert got.shape == expected.shape and got.dtype == dtype and not torch.isnan(got).any()
    rel = (got.double() - expected).norm() / expected.norm()
    return float(rel), ReferenceExecutor().attend(Module(groups), query, step, mask, scaling=scaling)


@contextlib.contextmanager
def kernel_calls() -> Iterator[list]:
    """A list that grows by one entry per call of :func:`decode.decode_attention` (the fused
    decode step) while the context is open."""
    calls: list = []
    kernel = decode.decode_attention

    def counted(*a, **k):
        calls.append(1)
        return kernel(*a, **k)

    decode.decode_attention = counted
    try:
        yield calls
    finally:
        decode.decode_attention = kernel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with kernel_calls() as calls:
        for seed, (dtype, *shape) in enumerate(CASES):
            before = len(calls)
            rel, _ = run_case(args.device, getattr(torch, dtype), *shape, seed=seed)
            path = "fused" if len(calls) > before else "fallback"
            print(json.dumps({"case": [dtype, *shape], "path": path, "rel_err": rel}))


if __name__ == "__main__":
    main()
