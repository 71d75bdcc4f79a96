"""Long runs: memory stays within each policy's analytic bound (no leak, no growing bookkeeping).

CI runs 2,000 decode steps; the documented soak runs 20,000::

    KVPOLICY_SOAK_STEPS=20000 pytest tests/test_soak.py -s
"""

from __future__ import annotations

import os

import pytest
import torch

from kvpolicy import Policy
from kvpolicy.selectors import LogSelector
from tests.conftest import tiny_llama
from tests.recording import record

STEPS = int(os.environ.get("KVPOLICY_SOAK_STEPS", "2000"))
CHECKPOINTS = max(10, STEPS // 1000)  # memory is read every 1,000 steps in the 20,000-step soak


@pytest.mark.parametrize("name", ["kivi", "logquant", "partial_logquant", "streaming"])
def test_memory_stays_within_the_policy_bound(name):
    model = tiny_llama(layers=2)
    policy = Policy.load(name)
    cache = policy.make_cache(model)
    batch, kv_heads, head_dim = 2, model.config.num_key_value_heads, model.config.head_dim
    token = torch.zeros(batch, 1, dtype=torch.long)
    records = []
    with torch.no_grad():
        for step in range(1, STEPS + 1):
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
            if step % (STEPS // CHECKPOINTS) == 0:
                held = cache.memory().total_bytes
                bound = len(cache.layers) * policy.memory_bound(step, batch, kv_heads, head_dim, element_size=4)
                records.append((step, held, bound))
                assert held <= bound, f"{name}: {held} bytes after {step} tokens exceed the bound {bound}"
                for layer in cache.layers:
                    for store, budget in (
                        (layer.key_store, policy.budget()["keys"]),
                        (layer.value_store, policy.budget()["values"]),
                    ):
                        assert len(store.fp_pos) <= budget
                        assert len(store.staging_pos) < policy.demote_block()
                        selectors = getattr(store.selector, "members", (store.selector,))
                        for selector in selectors:
                            if isinstance(selector, LogSelector):
                                assert len(selector.state(step)[0]) <= selector.window  # the sparse set
    print(f"\n{name}: (step, bytes held, bound) = {records}")
    bytes_per_token_16bit = 2 * batch * kv_heads * head_dim * 2 * len(cache.layers)
    record(
        "soak",
        name,
        policy=name,
        steps=STEPS,
        checkpoints=[{"step": s, "held_bytes": h, "bound_bytes": b} for s, h, b in records],
        final_ratio_vs_16bit=round(records[-1][1] / (bytes_per_token_16bit * records[-1][0]), 4),
    )
    # streaming holds a constant amount once the window is full
    if name == "streaming":
        assert records[-1][1] == records[1][1]
