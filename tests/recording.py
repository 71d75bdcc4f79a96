"""Tests record what they tried and what happened; the docs' reliability page shows it.

    KVPOLICY_RECORD=docs/results/reliability.json pytest -n 0 tests/test_reliability.py tests/test_soak.py

writes (merges) one list of rows per section at the end of the session. Without the
variable nothing is written; the assertions are the same either way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

_ROWS: dict[str, dict[str, dict]] = {}


def record(section: str, key: str, **row) -> None:
    """Remember ``row`` under ``section`` (``key`` keeps reruns of one case from repeating)."""
    _ROWS.setdefault(section, {})[key] = row


def write_if_asked() -> Path | None:
    path = os.environ.get("KVPOLICY_RECORD")
    if not path or not _ROWS:
        return None
    out = Path(path)
    data = json.loads(out.read_text()) if out.exists() else {}
    for section, rows in _ROWS.items():
        data[section] = [rows[k] for k in sorted(rows)]
    out.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return out
