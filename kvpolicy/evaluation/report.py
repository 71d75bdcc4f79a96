"""Write an evaluation as JSON, a markdown table and PNG plots (matplotlib)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from kvpolicy.errors import ConfigError
from kvpolicy.evaluation import generation_report
from kvpolicy.evaluation.generation_report import save_figure
from kvpolicy.evaluation.runner import EvaluationResult
from kvpolicy.evaluation.scoring import pareto_front

#: (task, metric key) columns of the summary table, in order
SUMMARY_COLUMNS = [
    ("fidelity", "kl"),
    ("fidelity", "top1"),
    ("fidelity", "ppl"),
    ("fidelity", "attn_err"),
    ("passkey", "accuracy"),
    ("passkey", "recall"),
    ("fidelity", "kv_ratio"),
]


def _fmt(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def summary_table(result: EvaluationResult) -> str:
    """The generation tasks' table (:func:`~kvpolicy.evaluation.generation_report.suite_table`), else
    the proxies': one row per contender, one column per (task, metric) that was run."""
    names = [c["name"] for c in result.contenders]
    generation = generation_report.generation_results(result.tasks)
    if generation:
        return generation_report.suite_table(generation, names)
    return proxy_table(result)


def proxy_table(result: EvaluationResult) -> str:
    """One row per contender, one column per teacher-forced (task, metric) that was run."""
    tasks = {t.task: t for t in result.tasks}
    columns = [(tasks[t], m) for t, key in SUMMARY_COLUMNS if t in tasks for m in tasks[t].metrics if m.key == key]
    arrows = {True: "↑", False: "↓"}
    header = ["policy", *[f"{m.label} {arrows[m.higher_is_better]}" for _, m in columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for contender in result.contenders:
        name = contender["name"]
        cells = [name, *[_fmt(task.rows[name].get(m.key), m.fmt) for task, m in columns]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def task_table(task) -> str:
    header = ["policy", *[m.label for m in task.metrics]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in task.rows.items():
        lines.append("| " + " | ".join([name, *[_fmt(row.get(m.key), m.fmt) for m in task.metrics]]) + " |")
    return "\n".join(lines)


def sweep_table(rows: list[dict]) -> str:
    lines = [
        "| policy | bits | budget | KV bytes vs 16-bit | KL vs 16-bit | top-1 agreement |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["policy"], r["bits"], r["budget"])):
        lines.append(
            f"| {r['policy']} | {r['bits']} | {r['budget']} | {r['kv_ratio']:.3f} | {r['kl']:.4f} | {r['top1']:.3f} |"
        )
    return "\n".join(lines)


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``hits / n``."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def spread_table(data: dict) -> str:
    """How far the samples separate the contenders, from a ``results.json`` dict: KL of each
    fidelity document, passkey hits with their 95% Wilson interval (and the key digits
    recalled under teacher forcing, where the run scored them), code edit similarity's mean
    and standard deviation over samples."""
    tasks = {t["task"]: t for t in data["tasks"]}
    names = [c["name"] for c in data["contenders"]]
    header = ["policy"]
    recall = "passkey" in tasks and all("recalled" in d for d in tasks["passkey"]["details"])
    if "fidelity" in tasks:
        header.append("KL by document")
    if "passkey" in tasks:
        header.append("passkey hits (95% interval)")
    if recall:
        header.append("key digits recalled (95% interval)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        cells = [name]
        if "fidelity" in tasks:
            kls = [d["kl"] for d in tasks["fidelity"]["details"] if d["contender"] == name]
            cells.append(", ".join(f"{kl:.3f}" for kl in kls))
        if "passkey" in tasks:
            found = [d["correct"] for d in tasks["passkey"]["details"] if d["contender"] == name]
            lo, hi = wilson_interval(sum(found), len(found))
            cells.append(f"{sum(found)}/{len(found)} ({lo:.2f}–{hi:.2f})")
        if recall:
            mine = [d for d in tasks["passkey"]["details"] if d["contender"] == name]
            hits, total = sum(d["recalled"] for d in mine), sum(d["key_tokens"] for d in mine)
            lo, hi = wilson_interval(hits, total)
            cells.append(f"{hits}/{total} ({lo:.2f}–{hi:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result: EvaluationResult, command: str | None = None) -> str:
    parts = ["# kvpolicy evaluation", ""]
    if command:
        parts += ["Command:", "", "```", command, "```", ""]
    env = result.environment
    parts += [
        f"Model `{env['model']}` ({env['dtype']}), torch {env['torch']}, transformers {env['transformers']}, "
        f"{env['machine']}. Settings: `{json.dumps(result.settings)}`.",
        "",
    ]
    names = [c["name"] for c in result.contenders]
    generation = generation_report.generation_results(result.tasks)
    proxies = [t for t in result.tasks if t not in generation]
    if generation:
        parts += [
            "## Task scores against the 16-bit cache",
            "",
            "Scores 0-100 of free greedy generation; in brackets the difference from `full`, the 16-bit "
            "cache, on the same samples (points).",
            "",
            generation_report.suite_table(generation, names),
            "",
        ]
        for task in generation:
            parts += [
                f"### {task.task}",
                "",
                f"Scored by {task.scored_by}. Settings: `{json.dumps(_plain(task.settings))}`",
                "",
                generation_report.task_table(task),
                "",
            ]
    if proxies:
        parts += ["## Teacher-forced proxies", "", proxy_table(result), ""]
        if any(t.task in ("fidelity", "passkey") for t in proxies):
            parts += ["### Spread over samples", "", spread_table(result.to_dict()), ""]
        for task in proxies:
            parts += [f"### {task.task}", "", f"Settings: `{json.dumps(task.settings)}`", "", task_table(task), ""]
    if result.sweep:
        parts += ["## Sweep (fidelity at each budget and bit width)", "", sweep_table(result.sweep), ""]
    parts += ["Seconds per task: " + ", ".join(f"{k} {v:.0f}" for k, v in result.seconds.items()), ""]
    return "\n".join(parts)


def _plain(settings: dict) -> dict:
    """A task's settings without the per-sample references (those are in results.json)."""
    return {k: v for k, v in settings.items() if k != "references"}


def plot(result: EvaluationResult, out_dir: Path) -> list[Path]:
    """Summary bars, attention error by layer, passkey by length and the sweep trade-off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    tasks = {t.task: t for t in result.tasks}
    names = [c["name"] for c in result.contenders]
    written += generation_report.plot_suite(plt, generation_report.generation_results(result.tasks), names, out_dir)
    columns = [(tasks[t], m) for t, key in SUMMARY_COLUMNS if t in tasks for m in tasks[t].metrics if m.key == key]
    columns = [(t, m) for t, m in columns if any(t.rows[n].get(m.key) is not None for n in names)]
    if columns:
        fig, axes = plt.subplots(1, len(columns), figsize=(2.6 * len(columns), 3.6), squeeze=False)
        for ax, (task, metric) in zip(axes[0], columns):
            values = [task.rows[n].get(metric.key) or 0.0 for n in names]
            ax.bar(range(len(names)), values, color=[f"C{i}" for i in range(len(names))])
            ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
            ax.set_title(f"{metric.label} {'↑' if metric.higher_is_better else '↓'}", fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        written.append(save_figure(fig, out_dir / "summary.png"))
    fidelity = tasks.get("fidelity")
    if fidelity is not None and any(r.get("attn_err_by_layer") for r in fidelity.rows.values()):
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        for i, name in enumerate(names):
            layers = fidelity.rows[name].get("attn_err_by_layer")
            if layers:
                ax.plot(range(len(layers)), layers, marker=".", label=name, color=f"C{i}")
        ax.set_xlabel("layer (of those the policy serves: full attention)")
        ax.set_ylabel("relative L1 error of attention output")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(save_figure(fig, out_dir / "attention_error_by_layer.png"))
    if fidelity is not None and sum(r.get("kv_ratio") is not None for r in fidelity.rows.values()) >= 2:
        written.append(_pareto_plot(plt, fidelity, names, out_dir / "accuracy_vs_bytes.png"))
    passkey = tasks.get("passkey")
    if passkey is not None:
        lengths = passkey.settings["lengths"]
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        for i, name in enumerate(names):
            ax.plot(lengths, [passkey.rows[name][f"acc@{n}"] for n in lengths], marker="o", label=name, color=f"C{i}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n // 1024}K" for n in lengths])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("passkey accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(save_figure(fig, out_dir / "passkey_by_length.png"))
    if result.sweep:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        policies = sorted({r["policy"] for r in result.sweep})
        for i, policy in enumerate(policies):
            for nbits, marker, style in ((2, "o", "-"), (4, "s", "--")):
                rows = sorted(
                    (r for r in result.sweep if r["policy"] == policy and r["bits"] == nbits),
                    key=lambda r: r["kv_ratio"],
                )
                if not rows:
                    continue
                ratios = [r["kv_ratio"] for r in rows]
                label = f"{policy} {nbits}-bit"
                axes[0].plot(
                    ratios, [r["top1"] for r in rows], marker=marker, linestyle=style, color=f"C{i}", label=label
                )
                axes[1].plot(
                    ratios, [r["kl"] for r in rows], marker=marker, linestyle=style, color=f"C{i}", label=label
                )
        axes[0].set_ylabel("top-1 agreement with 16-bit ↑")
        axes[1].set_ylabel("KL vs 16-bit ↓")
        axes[1].set_yscale("log")
        for ax in axes:
            ax.set_xlabel("KV bytes vs 16-bit (lower = more compression)")
        axes[0].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        written.append(save_figure(fig, out_dir / "accuracy_vs_compression.png"))
    return written


def _pareto_plot(plt, fidelity, names: list[str], path: Path) -> Path:
    """KL to the 16-bit model against KV bytes, one point per contender, the Pareto front joined."""
    points = [(n, fidelity.rows[n]["kv_ratio"], fidelity.rows[n]["kl"]) for n in names if n in fidelity.rows]
    points = [(n, b, max(kl, 1e-6)) for n, b, kl in points if b is not None and kl is not None]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (name, size, error) in enumerate(points):
        ax.scatter([size], [error], color=f"C{i % 10}", marker="os^Dv<>ph*"[i // 10 % 10], zorder=3)
        ax.annotate(name, (size, error), fontsize=6.5, xytext=(3, 3), textcoords="offset points")
    front = {n: (b, e) for n, b, e in points}
    line = [front[n] for n in pareto_front(points)]
    ax.plot([b for b, _ in line], [e for _, e in line], color="0.5", linestyle="--", zorder=2, label="Pareto front")
    ax.set_xlabel("KV bytes vs 16-bit (lower = more compression)")
    ax.set_ylabel("KL vs 16-bit ↓")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def check_output(out_dir: str | Path) -> None:
    """Refuse an output folder that cannot be written, before any work starts."""
    out_dir = Path(out_dir)
    for folder in (out_dir, *out_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError("--out", str(out_dir), f"a folder to write results in ({folder} is a file)")
            break


def write(result: EvaluationResult, out_dir: str | Path, command: str | None = None) -> list[Path]:
    """``results.json``, ``results.md`` and the plots in ``out_dir``; returns the written paths."""
    check_output(out_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = result.to_dict()
    if command:
        data["command"] = command
    (out_dir / "results.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (out_dir / "results.md").write_text(markdown(result, command))
    return [out_dir / "results.json", out_dir / "results.md", *plot(result, out_dir)]


if __name__ == "__main__":  # python -m kvpolicy.evaluation.report RESULTS.json: the spread table
    print(spread_table(json.loads(Path(sys.argv[1]).read_text())))
