"""Plot the Gluon kernel's share of the copy bandwidth across versions, from ``mma_sweep`` JSON.

python benchmarks/plot_mma_sweep.py docs/results/kernel_versions.png \
    v17b=benchmarks/results/mma_sweep_v17b.json v18a=benchmarks/results/mma_sweep_v18a.json \
    v18b=benchmarks/results/mma_sweep_v18b.json

Each run counts against its own device copy and its own Triton kernel (v15) timing; of a
run's variants only the fastest whose relative error against float64 is within 1e-2 counts
(a variant that is fast but wrong is left out). The Triton bars come from the last run.
Bars time one call at a time, its launch included; a run that also replayed its calls from
CUDA graphs (``graph_ms``, from v19 on) adds a bar of that variant's kernels alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MAX_REL_ERR = 1e-2


def best_correct(shape: dict) -> dict | None:
    """The fastest Gluon variant of one shape whose error is within :data:`MAX_REL_ERR`."""
    correct = [v for v in shape["mma"] if v["rel_err"] <= MAX_REL_ERR]
    return min(correct, key=lambda v: v["ms"]) if correct else None


def percent_of_copy(shape: dict, ms: float) -> float:
    """Bytes read per second as a percentage of the run's device copy (read + write)."""
    return 100 * shape["bytes"] / (ms / 1e3) / (shape["copy_GBps"] * 1e9)


def shape_label(shape: dict) -> str:
    return f"b{shape['batch']}, {shape['tokens'] // 1024}K, g{shape['group']}"


def run_bars(run: dict, labels: list[str], timing: str = "ms") -> list[float]:
    """% of copy per shape label of one run's best correct variant, by its ``timing``
    (``ms``: one call; ``graph_ms``: replayed from a CUDA graph); NaN where there is none."""
    by_label = {shape_label(s): s for s in run["shapes"]}
    values = []
    for label in labels:
        shape = by_label.get(label)
        best = best_correct(shape) if shape else None
        values.append(percent_of_copy(shape, best[timing]) if best else float("nan"))
    return values


def series(runs: dict[str, dict]) -> tuple[list[str], dict[str, list[float]]]:
    """``(shape labels, {bar label: % of copy per shape})``; shapes as in the last run."""
    last = list(runs.values())[-1]
    labels = [shape_label(s) for s in last["shapes"]]
    bars = {"Triton v15": [percent_of_copy(s, s["triton_ms"]) for s in last["shapes"]]}
    for name, run in runs.items():
        bars[name] = run_bars(run, labels)
        if all("graph_ms" in v for s in run["shapes"] for v in s["mma"]):
            bars[f"{name}, kernels alone"] = run_bars(run, labels, "graph_ms")
    return labels, bars


def main(out: str, runs: list[str]) -> None:
    loaded = {}
    for run in runs:
        name, _, path = run.partition("=")
        loaded[name] = json.loads(Path(path).read_text())
    labels, bars = series(loaded)
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(bars)
    for i, (name, values) in enumerate(bars.items()):
        xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, values, width, label=name, color=f"C{i}")
    ax.axhline(60, color="k", linestyle="--", linewidth=1, label="target (60%)")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("bytes read, % of device copy")
    ax.set_ylim(0, 80)
    ax.set_title(f"Decode attention over 2-bit KV, one Llama-8B layer ({list(loaded.values())[-1]['device']})")
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", help="PNG path")
    parser.add_argument("runs", nargs="+", help="label=path of an mma_sweep JSON, oldest first")
    args = parser.parse_args()
    main(args.out, args.runs)
