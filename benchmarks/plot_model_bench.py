"""Plots for docs/results/performance.md from model_bench.py's JSON.

python benchmarks/plot_model_bench.py benchmarks/results/model_h100.json docs/results [--only latency|largest]

``performance_latency.png`` (step latency and bytes per token against context length) and
``performance_largest_batch.png`` (largest batch and its tokens/s); ``--only`` writes one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path: str, out_dir: str, only: str | None = None) -> None:
    data = json.loads(Path(path).read_text())
    rows = [r for r in data["rows"] if "error" not in r]
    names = list(dict.fromkeys(r["contender"] for r in rows))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if only in (None, "latency"):
        plot_latency(rows, names, out)
    if only in (None, "largest"):
        plot_largest(data, names, out)


def plot_latency(rows: list[dict], names: list[str], out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, name in enumerate(names):
        mine = sorted((r for r in rows if r["contender"] == name), key=lambda r: r["context"])
        ctx = [r["context"] // 1024 for r in mine]
        axes[0].plot(ctx, [r["step_ms"] for r in mine], marker="o", color=f"C{i}", label=name)
        axes[1].plot(ctx, [r["kv_bytes_per_token"] / 1024 for r in mine], marker="o", color=f"C{i}", label=name)
    axes[0].set_ylabel(f"decode step latency, ms (batch {rows[0]['batch']})")
    axes[1].set_ylabel("KV KiB per token")
    for ax in axes:
        ax.set_xlabel("context (K tokens)")
        ax.set_xscale("log", base=2)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "performance_latency.png", dpi=130)
    print(f"wrote {out / 'performance_latency.png'}")


def plot_largest(data: dict, names: list[str], out: Path) -> None:
    largest = {k: v for k, v in data["largest"].items() if v.get("batch")}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    labels = list(largest)
    axes[0].bar(labels, [largest[n]["batch"] for n in labels], color=[f"C{names.index(n)}" for n in labels])
    axes[0].set_ylabel("largest batch at 32K")
    axes[1].bar(labels, [largest[n]["tokens_per_s"] for n in labels], color=[f"C{names.index(n)}" for n in labels])
    axes[1].set_ylabel("decode tokens/s at that batch")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "performance_largest_batch.png", dpi=130)
    print(f"wrote {out / 'performance_largest_batch.png'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="model_bench.py's JSON")
    parser.add_argument("out_dir")
    parser.add_argument("--only", choices=("latency", "largest"), help="write one of the two plots")
    args = parser.parse_args()
    main(args.path, args.out_dir, args.only)
