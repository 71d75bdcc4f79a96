"""The benchmarks' own logic, on CPU (their measurements run on a GPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


@pytest.mark.parametrize(("fits", "tries", "expected", "runs"), [(70, 8, 70, 7), (70, 3, 64, 3), (100, 8, 100, 1)])
def test_largest_batch_backs_off_then_bisects(monkeypatch, fits, tries, expected, runs):
    from benchmarks import model_bench

    def run_one(name, model, batch, context, args):
        row = {"contender": name, "batch": batch, "context": context}
        return row if batch <= fits else {**row, "error": "out of memory"}

    monkeypatch.setattr(model_bench, "run_one", run_one)
    monkeypatch.setattr(model_bench, "smallest_over_ranks", lambda value: value)
    args = SimpleNamespace(device="cpu", reserve_gib=0.0, tries=tries, backoff=0.8)
    context = 1024
    per_token = 8 * 2**30 / (context * 100)  # the prediction: batch 100
    row = model_bench.largest_batch("c", None, per_token, context, args)
    assert row["batch"] == expected and len(row["tried"]) == runs
    assert all(batch > fits for batch in row["tried"] if batch > expected)


def test_largest_batch_reports_an_error_that_is_not_memory(monkeypatch):
    from benchmarks import model_bench

    monkeypatch.setattr(model_bench, "run_one", lambda *a: {"contender": "c", "error": "ValueError: bad"})
    monkeypatch.setattr(model_bench, "smallest_over_ranks", lambda value: value)
    args = SimpleNamespace(device="cpu", reserve_gib=0.0, tries=5, backoff=0.8)
    row = model_bench.largest_batch("c", None, 1.0, 2**20, args)
    assert row["batch"] is None and row["error"] == "ValueError: bad" and row["tried"] == [8192]
