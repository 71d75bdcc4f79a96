"""mkdocs hooks: pages and pictures generated from the code at build time.

* ``<!-- yaml-reference -->`` in a page is replaced by :func:`kvpolicy.tools.docgen.yaml_reference`.
* ``images/retention-<policy>.png`` is drawn for every registered policy by running its stores.
* ``<!-- reliability:SECTION -->`` is replaced by a table of ``docs/results/reliability.json``
  (written by the tests, see tests/recording.py).
"""

from __future__ import annotations

import html
import json
import re
import tempfile
from pathlib import Path

from mkdocs.structure.files import File

from kvpolicy.tools.docgen import write_retention_pictures, yaml_reference

_TMP = tempfile.TemporaryDirectory(prefix="kvpolicy-docs-")


def on_files(files, config):
    for path in write_retention_pictures(_TMP.name):
        files.append(File.generated(config, f"images/{path.name}", abs_src_path=str(path)))
    return files


RELIABILITY = Path(__file__).parent / "results" / "reliability.json"


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    """Inline code that may hold ``|`` inside a markdown table cell."""
    return "<code>" + html.escape(text).replace("|", "&#124;") + "</code>"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows])


def reliability_table(section: str) -> str:
    data = json.loads(RELIABILITY.read_text()).get(section, [])
    if section == "bad_input":
        return _table(["input", "error", "message"], [[r["input"], r["error"], _code(r["message"])] for r in data])
    if section == "batching":
        return _table(
            [
                "policy",
                "prompt tokens",
                "tokens compared",
                "agree before first difference",
                "max drift (std)",
                "outcome",
            ],
            [[r["policy"], r["prompt_tokens"], r["compared"], r["agreed"], r["drift_std"], r["outcome"]] for r in data],
        )
    if section == "features":
        policies = list(dict.fromkeys(r["policy"] for r in data))
        features = list(dict.fromkeys(r["feature"] for r in data))
        result = {(r["feature"], r["policy"]): r["result"] for r in data}
        refused = {r["result"] for r in data if r["result"].startswith("refused")}
        rows = [
            [f]
            + [
                result.get((f, p), "").split(":")[0]
                if result.get((f, p), "").startswith("refused")
                else result.get((f, p), "")
                for p in policies
            ]
            for f in features
        ]
        notes = "\n".join(f"- {r}" for r in sorted(refused))
        return _table(["feature"] + [f"`{p}`" for p in policies], rows) + "\n\nMessages:\n\n" + notes
    if section == "soak":
        rows = []
        for r in data:
            first, last = r["checkpoints"][0], r["checkpoints"][-1]
            worst = max(c["held_bytes"] / c["bound_bytes"] for c in r["checkpoints"])
            rows.append(
                [
                    r["policy"],
                    r["steps"],
                    len(r["checkpoints"]),
                    f"{first['held_bytes']:,}",
                    f"{last['held_bytes']:,}",
                    f"{last['bound_bytes']:,}",
                    f"{worst:.3f}",
                    r["final_ratio_vs_16bit"],
                ]
            )
        return _table(
            [
                "policy",
                "steps",
                "readings",
                "bytes at first reading",
                "bytes at the end",
                "bound at the end",
                "max held/bound",
                "final bytes vs 16-bit",
            ],
            rows,
        )
    if section == "families":
        counts = {}
        for r in data:
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        rows = [
            [f"`{r['family']}`", r["outcome"], r.get("full", ""), r.get("kivi", ""), _code(r.get("detail", ""))]
            for r in data
        ]
        return f"{len(data)} families: {summary}.\n\n" + _table(["family", "outcome", "`full`", "`kivi`", "why"], rows)
    raise ValueError(f"unknown reliability section {section!r}")


def on_page_markdown(markdown, page, config, files):
    markdown = markdown.replace("<!-- yaml-reference -->", yaml_reference())
    return re.sub(r"<!-- reliability:(\w+) -->", lambda m: reliability_table(m.group(1)), markdown)
