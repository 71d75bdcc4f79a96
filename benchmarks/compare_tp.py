"""One GPU vs tensor parallelism: a markdown table from ``model_bench`` JSON files.

    python -m benchmarks.compare_tp benchmarks/results/model_tp1_h200.json benchmarks/results/model_tp2_h200.json

For each contender: KV bytes per token per GPU, the largest batch at the longest context
and the decode tokens/s there, on each setup; ratios against the first file (one GPU)
and against ``dynamic`` on the same number of GPUs. Both files must come from one run.
"""

from __future__ import annotations

import json
import sys


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def table(runs: list[dict]) -> str:
    lines = [
        "| contender | GPUs | KV B/token per GPU | largest batch | vs 1 GPU | vs dynamic "
        "| tokens/s | vs 1 GPU | vs dynamic |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    first = runs[0]["largest"]
    names = list(first)
    for name in names:
        for run in runs:
            largest = run["largest"]
            row, one, dyn = largest.get(name, {}), first.get(name, {}), largest.get("dynamic", {})
            gpus = run["environment"].get("world_size", 1)
            if not row.get("batch"):
                lines.append(f"| {name} | {gpus} | | {row.get('error', 'not run')} | | | | | |")
                continue
            per_token = row["kv_bytes_per_token"]

            def ratio(key, base, row=row):
                return f"{row[key] / base[key]:.2f}x" if base.get("batch") else ""

            lines.append(
                f"| {name} | {gpus} | {per_token:.0f} | {row['batch']} | {ratio('batch', one)} | "
                f"{ratio('batch', dyn)} | {row['tokens_per_s']:.0f} | {ratio('tokens_per_s', one)} | "
                f"{ratio('tokens_per_s', dyn)} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if len(paths) < 2:
        print(__doc__)
        return 2
    print(table([load(p) for p in paths]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
