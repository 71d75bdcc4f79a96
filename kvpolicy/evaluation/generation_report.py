"""Tables and plots of the generation tasks: each contender's task scores against the 16-bit cache.

* :func:`suite_table`: one row per contender, its bits per element, KV bytes, each task's score
  with its difference from ``full``, and the mean over tasks;
* :func:`task_table`: one task, the difference with its 95% interval and ``n``;
* :func:`plot_suite`: mean task score against bits per element (Pareto front joined) and each
  task's difference from 16-bit with its interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kvpolicy.evaluation.generation_task import REFERENCE
from kvpolicy.evaluation.scoring import pareto_front
from kvpolicy.evaluation.task import TaskResult


def generation_results(tasks: Sequence[TaskResult]) -> list[TaskResult]:
    """The results of generation tasks (those scored 0-100 on free generation)."""
    return [t for t in tasks if t.scored_by is not None]


def suite_rows(tasks: Sequence[TaskResult], names: Sequence[str]) -> dict[str, dict]:
    """``{contender: {"bits", "kv_ratio", "mean", "mean_diff", "worst_diff", "worst_task"}}`` over ``tasks``."""
    rows = {}
    for name in names:
        mine = [t for t in tasks if name in t.rows]
        if not mine:
            continue
        diffs = {t.task: t.rows[name]["diff"] for t in mine}
        worst = min(diffs, key=diffs.get)
        rows[name] = {
            "bits": mine[0].rows[name]["bits"],
            "kv_ratio": sum(t.rows[name]["kv_ratio"] for t in mine) / len(mine),
            "mean": sum(t.rows[name]["score"] for t in mine) / len(mine),
            "mean_diff": sum(diffs.values()) / len(diffs),
            "worst_diff": diffs[worst],
            "worst_task": worst,
        }
    return rows


def suite_table(tasks: Sequence[TaskResult], names: Sequence[str]) -> str:
    """Markdown: per contender, bits per element, KV bytes vs 16-bit, each task's score (and its
    difference from the 16-bit cache, in points), the mean and the worst task."""
    summary = suite_rows(tasks, names)
    header = [
        "policy",
        "bits/element",
        "KV vs 16-bit",
        *[t.task for t in tasks],
        "mean",
        "mean vs 16-bit",
        "worst task",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in summary.items():
        cells = [f"`{name}`", f"{row['bits']:.2f}", f"{row['kv_ratio']:.3f}"]
        for task in tasks:
            r = task.rows.get(name)
            cells.append("n/a" if r is None else _score(r, name))
        cells += [
            f"{row['mean']:.1f}",
            "—" if name == REFERENCE else f"{row['mean_diff']:+.1f}",
            "—" if name == REFERENCE else f"{row['worst_task']} {row['worst_diff']:+.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _score(row: dict, name: str) -> str:
    return f"{row['score']:.1f}" if name == REFERENCE else f"{row['score']:.1f} ({row['diff']:+.1f})"


def task_table(task: TaskResult) -> str:
    """Markdown: one generation task, each contender's score, difference from 16-bit with its
    95% interval over the samples, answers equal to the 16-bit answer, bits and bytes."""
    header = ["policy", task.metrics[0].label, "vs 16-bit (95% interval)", "same answer", "bits/element", "KV", "n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in task.rows.items():
        interval = "—" if name == REFERENCE else f"{r['diff']:+.1f} ({r['low']:+.1f} to {r['high']:+.1f})"
        lines.append(
            f"| `{name}` | {r['score']:.1f} | {interval} | {r['same']:.2f} | {r['bits']:.2f} | "
            f"{r['kv_ratio']:.3f} | {r['n']} |"
        )
    return "\n".join(lines)


def plot_suite(plt, tasks: Sequence[TaskResult], names: Sequence[str], out_dir: Path) -> list[Path]:
    """``score_vs_bits.png`` and ``score_diff_by_task.png``; nothing without generation tasks."""
    summary = suite_rows(tasks, names)
    if not summary:
        return []
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    points = [(n, r["bits"], -r["mean"]) for n, r in summary.items()]
    for i, (name, bits, loss) in enumerate(points):
        ax.scatter([bits], [-loss], color=f"C{i % 10}", zorder=3)
        ax.annotate(name, (bits, -loss), fontsize=6.5, xytext=(3, 3), textcoords="offset points")
    front = {n: (b, -e) for n, b, e in points}
    line = [front[n] for n in pareto_front(points)]
    ax.plot([b for b, _ in line], [s for _, s in line], color="0.5", linestyle="--", zorder=2, label="Pareto front")
    ax.set_xlabel("bits per quantized element (scales included; 16 = the 16-bit cache)")
    ax.set_ylabel("mean task score (0-100) ↑")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written = [save_figure(fig, out_dir / "score_vs_bits.png")]
    others = [n for n in summary if n != REFERENCE]
    fig, ax = plt.subplots(figsize=(max(6.5, 0.9 * len(others) * len(tasks) / 3), 3.8))
    width = 0.8 / max(1, len(tasks))
    for j, task in enumerate(tasks):
        xs = [i + (j - (len(tasks) - 1) / 2) * width for i in range(len(others))]
        rows = [task.rows.get(n) for n in others]
        diffs = [r["diff"] if r else 0.0 for r in rows]
        errors = [
            [r["diff"] - r["low"] if r else 0.0 for r in rows],
            [r["high"] - r["diff"] if r else 0.0 for r in rows],
        ]
        ax.bar(xs, diffs, width, yerr=errors, capsize=2, label=task.task, color=f"C{j}", error_kw={"lw": 0.7})
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xticks(range(len(others)), others, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("score − 16-bit score (points, 95% interval)")
    ax.legend(fontsize=7, ncol=len(tasks))
    fig.tight_layout()
    written.append(save_figure(fig, out_dir / "score_diff_by_task.png"))
    return written


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` and close it."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
