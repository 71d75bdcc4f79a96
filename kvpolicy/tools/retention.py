"""Retention patterns: which positions are full precision, staged, quantized or evicted over time.

The pattern is recorded by running the policy's real stores (one layer, batch 1, one head)
through a prefill and decode steps, so a picture always shows what the code does,
third-party selectors included.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from kvpolicy.policy import Policy

#: state codes in a retention matrix
UNSEEN, FULL, STAGED, QUANTIZED, EVICTED = 0, 1, 2, 3, 4
STATE_NAMES = {
    UNSEEN: "not yet seen",
    FULL: "full precision",
    STAGED: "staged (full precision, awaiting a packing block)",
    QUANTIZED: "quantized",
    EVICTED: "evicted",
}
STATE_COLORS = {UNSEEN: "#ffffff", FULL: "#1b7837", STAGED: "#a6dba0", QUANTIZED: "#762a83", EVICTED: "#d9d9d9"}


def _head_dim(policy: Policy) -> int:
    sides = (policy.config.keys, policy.config.values)
    sizes = [s.quant.group_size for s in sides if s.quant.axis == "token" and isinstance(s.quant.group_size, int)]
    return math.lcm(8, *sizes)


def retention_matrix(policy: Policy, steps: int = 512, prefill: int = 1) -> dict[str, np.ndarray]:
    """``{"keys": M, "values": M}`` with ``M[step, position]`` a state code; row ``i`` is the cache
    after ``prefill + i`` tokens."""
    d = _head_dim(policy)
    layer = policy.new_layer(head_dim=d)
    total = prefill + steps - 1
    out = {name: np.zeros((steps, total), dtype=np.uint8) for name in ("keys", "values")}
    generator = torch.Generator().manual_seed(0)
    for row in range(steps):
        q = prefill if row == 0 else 1
        layer.update(torch.randn(1, 1, q, d, generator=generator), torch.randn(1, 1, q, d, generator=generator))
        for name, store in (("keys", layer.key_store), ("values", layer.value_store)):
            m = out[name][row]
            m[: store.length] = EVICTED
            m[store.fp_pos.long().numpy()] = FULL
            m[store.staging_pos.long().numpy()] = STAGED
            m[store.packed_pos.long().numpy()] = QUANTIZED
    return out


def plot_retention(policy: Policy, path: str | Path, steps: int = 512, prefill: int = 1) -> Path:
    """Write a PNG heat map (x = position, y = decode step) for keys and values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    mats = retention_matrix(policy, steps, prefill)
    cmap = ListedColormap([STATE_COLORS[i] for i in range(5)])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    for ax, (name, m) in zip(axes, mats.items()):
        ax.imshow(m, cmap=cmap, vmin=0, vmax=4, aspect="auto", interpolation="nearest", origin="upper")
        budget = policy.budget()[name]
        ax.set_title(f"{name} (full-precision budget: {budget if budget is not None else 'all'})")
        ax.set_xlabel("token position")
    axes[0].set_ylabel(f"decode step (after a {prefill}-token prefill)")
    present = sorted({int(v) for m in mats.values() for v in np.unique(m)} - {UNSEEN})
    fig.legend(
        handles=[Patch(color=STATE_COLORS[s], label=STATE_NAMES[s]) for s in present],
        loc="lower center",
        ncol=len(present),
        frameon=False,
    )
    fig.suptitle(f"retention pattern of policy '{policy.name}'")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
