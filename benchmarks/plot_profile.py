"""Plot where decode steps' time goes, before and after a change, from profile_step tables.

python benchmarks/plot_profile.py benchmarks/results/profile_step_h100_v13.txt docs/results/profile_host_device.png

The text file holds sections, each a title line followed by ``profile_step``'s final table
(``contender context batch wall host device``); ``#`` lines are comments.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_sections(text: str) -> dict[str, list[dict]]:
    """``{title: [{"run", "wall", "host", "device"}]}`` from the tables in ``text``."""
    sections: dict[str, list[dict]] = {}
    title = None
    for line in text.splitlines():
        fields = line.split()
        if not fields or line.startswith("#") or fields[0] == "contender":
            continue
        if len(fields) == 6 and title is not None:
            name, context, batch, wall, host, device = fields
            run = f"{name}\n{int(context) // 1024}K, batch {batch}"
            sections[title].append({"run": run, "wall": float(wall), "host": float(host), "device": float(device)})
        else:
            title = line.strip()
            sections[title] = []
    return sections


def main(path: str, out: str) -> None:
    sections = read_sections(Path(path).read_text())
    fig, axes = plt.subplots(1, len(sections), figsize=(5.2 * len(sections), 3.8), sharey=True)
    for ax, (title, rows) in zip(axes, sections.items()):
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["host"] for r in rows], width=0.4, label="host (issuing the step)")
        ax.bar([i + 0.2 for i in x], [r["device"] for r in rows], width=0.4, label="device (kernels)")
        ax.plot(list(x), [r["wall"] for r in rows], "k_", markersize=22, mew=2, label="wall (per step)")
        ax.set_xticks(list(x), [r["run"] for r in rows], fontsize=7)
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("ms per decode step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
