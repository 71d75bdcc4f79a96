"""Plot an end-to-end record (``benchmarks/e2e_bench.py``): each cache against DynamicCache.

One panel per measure (time to first token, decode ms/step, prefill peak memory), one group
of bars per batch, each bar a contender's ratio to DynamicCache at that batch in the same
run (1.0 is DynamicCache; lower is better for all three).

    python benchmarks/plot_e2e.py benchmarks/results/e2e_h200.json docs/results/e2e_h200.png

Several records (e.g. one run per batch) are drawn together, each batch against the
DynamicCache of its own record: ``plot_e2e.py A.json B.json OUT.png``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MEASURES = (
    ("ttft_s", "time to first token"),
    ("decode_ms", "decode ms/step"),
    ("prefill_peak_bytes", "prefill peak memory"),
)


def ratios(rows: list[dict], key: str) -> dict[str, dict[int, float]]:
    """``{contender: {batch: value / DynamicCache's value at that batch}}`` over measured rows."""
    measured = [r for r in rows if "error" not in r and not r.get("largest") and r.get(key)]
    base = {r["batch"]: r[key] for r in measured if r["contender"] == "dynamic"}
    out: dict[str, dict[int, float]] = {}
    for r in measured:
        if r["batch"] in base:
            out.setdefault(r["contender"], {})[r["batch"]] = r[key] / base[r["batch"]]
    return out


def plot(record: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    batches = sorted({r["batch"] for r in rows if not r.get("largest")})
    measures = [(key, label) for key, label in MEASURES if ratios(rows, key)]
    fig, axes = plt.subplots(1, len(measures), figsize=(5 * len(measures), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], measures):
        by_contender = ratios(rows, key)
        names = list(by_contender)
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            xs = [j + i * width for j, b in enumerate(batches) if b in by_contender[name]]
            ys = [by_contender[name][b] for b in batches if b in by_contender[name]]
            ax.bar(xs, ys, width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_title(f"{label} / DynamicCache's")
    axes[0][0].legend(fontsize=8)
    context = rows[0].get("context", "")
    fig.suptitle(f"generate() at {context} tokens on {record.get('device', '')}: lower is better")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: plot_e2e.py RECORD.json [RECORD.json ...] OUT.png", file=sys.stderr)
        return 2
    print(plot(merged([json.loads(Path(a).read_text()) for a in argv[:-1]]), argv[-1]))
    return 0


def merged(records: list[dict]) -> dict:
    """One record of several runs' rows; refuses two runs that measured the same batch (their
    ratios would mix two DynamicCache baselines)."""
    batches = [{r["batch"] for r in rec["rows"] if not r.get("largest")} for rec in records]
    for i, a in enumerate(batches):
        for b in batches[i + 1 :]:
            if a & b:
                raise SystemExit(f"two records measure batch {sorted(a & b)}: plot one run per batch")
    return {"rows": [r for rec in records for r in rec["rows"]], "device": records[0].get("device", "")}


if __name__ == "__main__":
    raise SystemExit(main())
