"""The benchmarks' own logic, on CPU (their measurements run on a GPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


@pytest.mark.parametrize(("fits", "tries", "expected", "runs"), [(70, 8, 70, 7), (70, 3, 64, 3), (100, 8, 100, 1)])
def test_largest_batch_backs_off_then_bisects(monkeypatch, fits, tries, expected, runs):
    from benchmarks import model_bench

    def run_one(name, model, batch, context, args):
        row = {"contender": name, "batch": batch, "context": context}
        return row if batch <= fits else {**row, "error": "out of memory", "oom_during": "fill"}

    monkeypatch.setattr(model_bench, "run_one", run_one)
    monkeypatch.setattr(model_bench, "smallest_over_ranks", lambda value: value)
    args = SimpleNamespace(device="cpu", reserve_gib=0.0, tries=tries, backoff=0.8)
    context = 1024
    per_token = 8 * 2**30 / (context * 100)  # the prediction: batch 100
    row = model_bench.largest_batch("c", None, per_token, context, args)
    assert row["batch"] == expected and len(row["tried"]) == runs
    assert all(batch > fits for batch in row["tried"] if batch > expected)
    too_large = [batch for batch in row["tried"] if batch > fits]
    assert row["out_of_memory"] == [{"batch": batch, "oom_during": "fill"} for batch in too_large]


def test_largest_batch_reports_an_error_that_is_not_memory(monkeypatch):
    from benchmarks import model_bench

    monkeypatch.setattr(model_bench, "run_one", lambda *a: {"contender": "c", "error": "ValueError: bad"})
    monkeypatch.setattr(model_bench, "smallest_over_ranks", lambda value: value)
    args = SimpleNamespace(device="cpu", reserve_gib=0.0, tries=5, backoff=0.8)
    row = model_bench.largest_batch("c", None, 1.0, 2**20, args)
    assert row["batch"] is None and row["error"] == "ValueError: bad" and row["tried"] == [8192]


@pytest.mark.parametrize("phase", ["fill", "decode"])
def test_run_one_says_in_which_phase_memory_ran_out(monkeypatch, phase):
    import torch

    from benchmarks import model_bench

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(model_bench, "make_cache", lambda name, model, executor: object())
    monkeypatch.setattr(model_bench, "cache_bytes", lambda cache: 0)
    monkeypatch.setattr(model_bench, "fill", out_of_memory if phase == "fill" else lambda *a: None)
    monkeypatch.setattr(model_bench, "decode", out_of_memory)
    args = SimpleNamespace(device="cpu", chunk=4, sdpa="auto", steps=1, warmup=0, kernel=None)
    row = model_bench.run_one("c", SimpleNamespace(device="cpu"), 2, 8, args)
    assert row["error"] == "out of memory" and row["oom_during"] == phase


def test_kernel_version_plot_counts_only_variants_within_the_error_bound(tmp_path):
    """A fast but wrong variant (v18a's discarded value offsets) must not stand for its run."""
    import json

    from benchmarks import plot_mma_sweep

    def shape(variants, triton_ms=2.0):
        return {"batch": 74, "tokens": 32768, "group": 64, "bytes": 10**9, "copy_GBps": 4000.0,
                "triton_ms": triton_ms, "mma": variants}  # fmt: skip

    fast_wrong, slow_right = {"ms": 0.5, "rel_err": 0.2}, {"ms": 1.0, "rel_err": 3e-3}
    assert plot_mma_sweep.best_correct(shape([fast_wrong, slow_right])) is slow_right
    assert plot_mma_sweep.best_correct(shape([fast_wrong])) is None
    runs = {"old": {"shapes": [shape([fast_wrong])]}, "new": {"device": "X", "shapes": [shape([slow_right])]}}
    labels, bars = plot_mma_sweep.series(runs)
    assert labels == ["b74, 32K, g64"]
    assert bars["new"] == [25.0] and bars["Triton v15"] == [12.5]  # 1 GB in 1 ms of a 4 TB/s copy
    assert bars["old"][0] != bars["old"][0]  # NaN: no correct variant
    assert "new, kernels alone" not in bars  # a run without CUDA-graph timings
    graphed = {"device": "X", "shapes": [shape([{**slow_right, "graph_ms": 0.8}, {**fast_wrong, "graph_ms": 0.4}])]}
    _, bars = plot_mma_sweep.series({**runs, "graphed": graphed})
    assert bars["graphed"] == [25.0] and bars["graphed, kernels alone"] == [31.25]  # the correct variant's graph
    for name, run in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(run))
    out = tmp_path / "plot.png"
    plot_mma_sweep.main(str(out), [f"old={tmp_path / 'old.json'}", f"new={tmp_path / 'new.json'}"])
    assert out.stat().st_size > 1000


def test_the_sweep_launches_a_baseline_kernel_only_inside_its_block(tmp_path):
    """``mma_sweep --baseline``: an earlier copy of the kernel's module is loaded from its file and
    the Gluon executor launches it inside ``launching`` only, also when the block raises."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.ampere")
    import pathlib

    from benchmarks.mma_sweep import launching, load_kernel
    from kvpolicy.executors.kernels import MmaSplits, mma_device

    copy = tmp_path / "mma_device_before.py"
    copy.write_text(pathlib.Path(mma_device.__file__).read_text())
    baseline = load_kernel(str(copy))
    assert baseline is not mma_device.packed_decode_mma and baseline.fn.__module__ == "fused_mma_baseline"
    with launching(baseline):
        assert MmaSplits.device_kernel() is baseline
    assert MmaSplits.device_kernel() is mma_device.packed_decode_mma
    with pytest.raises(RuntimeError), launching(baseline):
        raise RuntimeError("a shape failed")
    assert MmaSplits.device_kernel() is mma_device.packed_decode_mma
    with launching(None):
        assert MmaSplits.device_kernel() is mma_device.packed_decode_mma


@pytest.mark.parametrize("with_baseline", [False, True])
def test_sweep_report_gives_each_timing_its_share_of_the_copy(with_baseline):
    """``mma_sweep``'s tables, from its JSON record: one call at a time and replayed from CUDA
    graphs, each against the run's copy, and the baseline's ratio only when the run had one."""
    from benchmarks.mma_sweep import report

    variant = {"block_tokens": 64, "exact_keys": False, "split_factor": 32, "max_registers": None, "stages": 2,
               "ms": 1.0, "graph_ms": 0.8, "rel_err": 3e-3}  # fmt: skip
    shape = {"batch": 74, "tokens": 32768, "group": 64, "bytes": 10**9, "copy_GBps": 4000.0, "read_only_ms": 0.5,
             "triton_ms": 2.0, "triton_again_ms": 2.2, "triton_graph_ms": 1.6, "triton_again_graph_ms": 1.7,
             "mma": [variant]}  # fmt: skip
    if with_baseline:
        shape.update(baseline_ms=1.2, baseline_again_ms=1.1, baseline_graph_ms=0.9, baseline_again_graph_ms=1.0)
    record = {"device": "X", "baseline": "before.py" if with_baseline else None, "shapes": [shape]}
    text = report(record, 4e12)
    one_call, graphed = text.split("\nthe same calls replayed from CUDA graphs")
    row = one_call.strip().splitlines()[-1].split()
    assert row[:4] == ["74", "32768", "64", "1000"] and "2.00x" in row and "25.0%" in row  # 1 GB/ms of 4 TB/s
    graph_row = graphed.strip().splitlines()[-1].split()
    assert graph_row[5:8] == ["0.800", "2.00x", "31.2%"]  # the faster Triton replay (1.6) over 0.8
    assert ("vs base" in text) == with_baseline
    if with_baseline:
        assert row[-1] == "1.100x" and graph_row[-1] == "1.125x"  # the faster of the baseline's two timings


def test_e2e_ratios_are_against_dynamic_cache_at_the_same_batch(tmp_path):
    """The end-to-end plot draws each contender over DynamicCache at the same batch; rows that
    failed (out of memory) or that measure a largest batch are left out, not drawn as zero."""
    from benchmarks.plot_e2e import plot, ratios

    rows = [
        {"contender": "dynamic", "batch": 1, "ttft_s": 2.0, "decode_ms": 20.0},
        {"contender": "dynamic", "batch": 8, "ttft_s": 10.0, "decode_ms": 40.0},
        {"contender": "logquant", "batch": 1, "ttft_s": 1.0, "decode_ms": 30.0},
        {"contender": "logquant", "batch": 8, "error": "out of memory"},
        {"contender": "logquant", "batch": 64, "ttft_s": 50.0, "decode_ms": 60.0, "largest": True},
    ]
    assert ratios(rows, "decode_ms") == {"dynamic": {1: 1.0, 8: 1.0}, "logquant": {1: 1.5}}
    assert ratios(rows, "ttft_s")["logquant"] == {1: 0.5}
    assert ratios(rows, "prefill_peak_bytes") == {}
    out = plot({"rows": rows, "device": "test"}, tmp_path / "e2e.png")
    assert out.stat().st_size > 1000


def test_e2e_records_of_separate_batches_plot_together_and_floors_are_bytes_over_bandwidth(tmp_path):
    import pytest

    from benchmarks.e2e_bench import floor_ms, table
    from benchmarks.plot_e2e import merged

    one = {"rows": [{"contender": "dynamic", "batch": 1, "decode_ms": 20.0}], "device": "d"}
    eight = {"rows": [{"contender": "dynamic", "batch": 8, "decode_ms": 30.0}]}
    assert [r["batch"] for r in merged([one, eight])["rows"]] == [1, 8]
    with pytest.raises(SystemExit, match=r"batch \[1\]"):
        merged([one, one])
    row = {"contender": "kivi", "batch": 1, "ttft_s": 1.0, "decode_ms": 10.0, "kv_bytes": 10**9,
           "workload_tokens_per_s": 5.0}  # fmt: skip
    assert floor_ms(row, 3 * 10**9, 2 * 10**12) == pytest.approx(2.0)
    assert floor_ms(row, None, 2 * 10**12) is None
    assert "| 2.0 | 5.0x |" in table([row], 3 * 10**9, 2 * 10**12)


def test_e2e_bench_runs_a_graph_contender_through_generate(tmp_path):
    """``NAME+graphs`` and ``NAME+eager`` go through the same ``generate()`` call as every
    contender (on a CPU the graph path's steps run eagerly) and decode every token asked for."""
    import json

    from benchmarks.e2e_bench import main

    out = tmp_path / "e2e.json"
    argv = ["--shape", "tiny", "--device", "cpu", "--context", "256", "--batches", "1", "--new-tokens", "6",
            "--warmup", "1", "--contenders", "dynamic,kivi+graphs,kivi+eager", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = {r["contender"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"dynamic", "kivi+graphs", "kivi+eager"}
    for row in rows.values():
        assert "error" not in row and row["generated"] == 6 and row["decode_ms"] > 0


def test_the_dynamic_hand_loop_decodes_what_generate_decodes():
    """``dynamic-loop`` (chunked prefill, then one-token forwards) is a faithful baseline: the
    same greedy tokens as ``generate()`` with a DynamicCache, one stamp per token."""
    import torch

    from benchmarks.e2e_bench import SHAPES, StepClock, build_model
    from benchmarks.hand_loop import run_loop

    torch.manual_seed(0)
    model = build_model(dict(SHAPES["tiny"], num_hidden_layers=1), "cpu").float()
    ids = torch.randint(1, 1024, (3, 70), generator=torch.Generator().manual_seed(1))
    clock = StepClock("cpu")
    tokens, cache = run_loop(model, "dynamic-loop", ids, 9, 32, clock)
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=9, min_new_tokens=9,
                          do_sample=False)[:, 70:]  # fmt: skip
    assert torch.equal(tokens, want)
    assert len(clock.times) == 1 + 9 and cache.get_seq_length() == 70 + 8
    with pytest.raises(ValueError, match="unknown hand loop 'loop'; allowed: dynamic-loop, static-loop"):
        run_loop(model, "loop", ids, 2, None, clock)
    # the prompt prefilled two rows per forward by kvpolicy.generation.prefill: the same tokens
    from transformers import DynamicCache

    from kvpolicy.generation import prefill

    clock = StepClock("cpu")
    filled = lambda: prefill(model, lambda: DynamicCache(config=model.config), ids, tokens_per_forward=140)  # noqa: E731
    tokens, cache = run_loop(model, "dynamic-loop", ids, 9, None, clock, filled)
    assert torch.equal(tokens, want)
    assert len(clock.times) == 1 + 9 and cache.get_seq_length() == 70 + 8


def test_a_static_cache_prefilled_by_rows_decodes_what_generate_decodes():
    """``static-loop``'s bounded prefill (:func:`benchmarks.hand_loop.static_prefill`): groups
    of whole rows prefilled into DynamicCaches and copied into one StaticCache hold what one
    forward of every row holds, and greedy steps from it (uncompiled here: CPU) give
    ``generate()``'s tokens."""
    import torch
    from transformers import StaticCache

    from benchmarks.e2e_bench import SHAPES, build_model
    from benchmarks.hand_loop import static_prefill
    from kvpolicy.generation import forward_cache_kwargs

    torch.manual_seed(0)
    model = build_model(dict(SHAPES["tiny"], num_hidden_layers=2), "cpu").float()
    ids = torch.randint(1, 1024, (5, 70), generator=torch.Generator().manual_seed(2))
    cache = static_prefill(model, ids, tokens_per_forward=140, max_cache_len=79)  # 2, 2 and 1 rows per forward
    assert type(cache) is StaticCache and cache.get_seq_length() == 69
    whole = StaticCache(config=model.config, max_cache_len=79)
    with torch.no_grad():
        model(ids[:, :69], **forward_cache_kwargs(model, whole), use_cache=True)
    for got, want in zip(cache.layers, whole.layers, strict=True):
        torch.testing.assert_close(got.keys, want.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.values, want.values, rtol=1e-5, atol=1e-5)
    token, tokens = ids[:, 69:], []
    with torch.no_grad():
        for position in range(69, 78):
            out = model(token, position_ids=torch.full((5, 1), position), use_cache=True,
                        **forward_cache_kwargs(model, cache))  # fmt: skip
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=9, min_new_tokens=9,
                          do_sample=False)[:, 70:]  # fmt: skip
    assert torch.equal(torch.cat(tokens, 1), want)


def test_ratios_are_against_the_faster_driver_of_each_16_bit_cache():
    """Each ratio names the better of ``generate()`` and the hand loop for DynamicCache (per
    figure), the decode step also against the fastest StaticCache + compile driver; at the
    largest batches, measured tokens/s against the best of each group at its own batch."""
    from benchmarks.e2e_bench import largest_table, table

    common = {"batch": 1, "kv_bytes": 2**20, "workload_tokens_per_s": 10.0}
    rows = [
        {"contender": "dynamic", "ttft_s": 2.0, "decode_ms": 40.0, **common},
        {"contender": "dynamic-loop", "ttft_s": 4.0, "decode_ms": 20.0, **common},
        {"contender": "static-loop", "ttft_s": 4.0, "decode_ms": 10.0, **common},
        {"contender": "kivi", "ttft_s": 3.0, "decode_ms": 5.0, **common},
    ]
    kivi = table(rows).splitlines()[-1].split(" | ")
    assert kivi[3] == "1.50x" and kivi[5] == "0.25x" and kivi[6] == "0.50x"
    largest = [
        {"contender": "dynamic", "batch": 10, "ttft_s": 1.0, "decode_ms": 9.0, "tokens_per_s": 100.0},
        {"contender": "dynamic-loop", "batch": 12, "ttft_s": 1.0, "decode_ms": 9.0, "tokens_per_s": 150.0},
        {"contender": "static-loop", "batch": 8, "ttft_s": 1.0, "decode_ms": 9.0, "tokens_per_s": 200.0},
        {"contender": "logquant", "batch": 60, "ttft_s": 1.0, "decode_ms": 9.0, "tokens_per_s": 600.0},
    ]
    lines = largest_table(largest)
    assert "vs dynamic-loop" in lines[0] and "vs static-loop" in lines[0]
    assert lines[-1].endswith("| 60 | 5.00x | 1.0 s | 9.0 | 600 | 4.00x | 3.00x |")


def test_key_rotation_variants_set_every_key_rotation_and_nothing_else():
    from benchmarks.key_rotation_kl import with_key_rotation
    from kvpolicy import load_policy
    from tests.conftest import tiny_llama

    model = tiny_llama(layers=4)  # the first layer takes logquant_mixed's 4-bit keys
    shipped = load_policy("logquant_mixed")
    for rotate in ("hadamard", "none"):
        variant = with_key_rotation(shipped, rotate)
        layers = variant.make_cache(model).layers
        assert [layer.key_store.spec.rotate for layer in layers] == [rotate] * 4
        assert all(layer.value_store.spec.rotate == "hadamard" for layer in layers)
        assert [layer.key_store.spec.bits for layer in layers] == [4, 2, 2, 2]
    assert with_key_rotation(shipped, "none").name == "logquant_mixed_keys_unrotated"
    assert with_key_rotation(shipped, "hadamard").name == "logquant_mixed_keys_rotated"


def test_memory_probe_finds_each_phase_peak_and_what_is_alive_there():
    from benchmarks.memory_probe import MARK_BYTES, peaks

    def alloc(addr, size, where):
        frames = [{"filename": "/x/torch/nn.py", "line": 1, "name": "f"},
                  {"filename": f"/site/kvpolicy/{where}.py", "line": 7, "name": where}]  # fmt: skip
        return {"action": "alloc", "addr": addr, "size": size, "frames": frames}

    def free(addr):
        return {"action": "free_completed", "addr": addr}

    trace = [
        alloc(1, 100, "store"),
        alloc(2, 500, "attend"),
        free(2),  # prefill peak 600: store + attend
        alloc(3, 50, "store"),
        alloc(9, MARK_BYTES, "mark"),
        free(9),  # the first new token
        alloc(4, 300, "ring"),
        free(1),
        alloc(5, 20, "step"),
        free(5),  # decode peak 450, before the free
        {"action": "segment_alloc", "addr": 0, "size": 10**9},  # not an allocation of a tensor
        free(1234),  # allocated before the history began
    ]
    found = peaks(trace, before=1000)
    assert found["prefill"]["peak_bytes"] == 1600
    assert dict(found["prefill"]["by_origin"]) == {"kvpolicy/store.py:7 store": 100, "kvpolicy/attend.py:7 attend": 500}
    # 150 kept from the prefill and the ring's 300; the step's 20 came after a free
    assert found["decode"]["peak_bytes"] == 1450
    assert dict(found["decode"]["by_origin"]) == {"kvpolicy/store.py:7 store": 150, "kvpolicy/ring.py:7 ring": 300}


def test_the_largest_batch_is_predicted_from_decode_peaks_and_the_prompt_kv_of_a_bounded_prefill():
    """The H100 run of 2026-12-07 (benchmarks/results/throughput_8k_policies_h100.json): at batch
    1 a prefill forward held 8,192 tokens and at batch 8 16,384, so the prefill peaks grew by
    more than the KV; predicting from them gave logquant 100 sequences, which then peaked at 35
    of 80 GB. Decode peaks and the prompt's KV per row give over twice that."""
    import json
    from pathlib import Path

    from benchmarks.e2e_bench import predicted_batch

    record = json.loads(Path("benchmarks/results/throughput_8k_policies_h100.json").read_text())
    args = SimpleNamespace(**record["args"])
    total = 79.18 * 2**30
    for name, low, high in [("logquant", 200, 320), ("kivi", 100, 280), ("dynamic-loop", 36, 52)]:
        rows = sorted((r for r in record["rows"] if r["contender"] == name and not r.get("largest")),
                      key=lambda r: r["batch"])  # fmt: skip
        batch, how = predicted_batch(rows, args, total)
        assert low <= batch <= high, (name, batch, how)
        assert batch == min(how["by_decode"], how["by_prefill"])
    unbounded = SimpleNamespace(**(record["args"] | {"tokens_per_forward": None}))
    rows = sorted((r for r in record["rows"] if r["contender"] == "logquant" and not r.get("largest")),
                  key=lambda r: r["batch"])  # fmt: skip
    assert predicted_batch(rows, unbounded, total)[1]["by_prefill"] < 150  # the peaks' slope, as before


def test_ship_model_carries_parts_one_at_a_time_and_joins_them_once_all_arrived(tmp_path, monkeypatch):
    """``stage`` here copies one part into the carried folder; ``receive`` there keeps it and
    joins the model when the last part arrives (the same join and checks as an installed model)."""
    from benchmarks import ship_model
    from tests.models.test_models import _split_gguf

    split, parts, data = _split_gguf(tmp_path)
    monkeypatch.setattr(type(split), "part_paths", lambda self: parts)
    monkeypatch.setattr(ship_model, "SPLIT_GGUF", {"fake": split})
    monkeypatch.setenv("KVPOLICY_CACHE_DIR", str(tmp_path / "device-cache"))
    ship = tmp_path / "ship"
    states = []
    for number in (3, 1, 2):  # one call each, in any order
        staged = ship_model.stage("fake", number, ship)
        assert [p.name for p in ship.iterdir()] == [staged.name] == [f"fake.part{number:02d}.bin"]
        states.append(ship_model.receive(ship)["fake"])
    assert states[0] == "1 of 3 parts kept; still to carry: [1, 2]"
    assert states[1] == "2 of 3 parts kept; still to carry: [2]"
    assert states[2].startswith("joined and checked")
    assert (tmp_path / "device-cache" / "gguf" / "fake.gguf").read_bytes() == data
    assert not (tmp_path / "device-cache" / "parts" / "fake").exists()
    assert ship_model.receive(ship)["fake"].startswith("joined before")
    with pytest.raises(SystemExit, match="parts 1 to 3"):
        ship_model.stage("fake", 4, ship)
