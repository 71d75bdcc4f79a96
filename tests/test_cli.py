"""The ``kvpolicy`` command line."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from kvpolicy.cli import main


def test_list_names_every_kind_and_its_plugin(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for kind, name, plugin in [
        ("selector", "log", "kvpolicy"),
        ("quantizer", "native", "kvpolicy"),
        ("executor", "reference", "kvpolicy"),
        ("policy", "full", "kvpolicy"),
        ("policy", "kivi", "kvpolicy_kivi"),
        ("policy", "streaming", "kvpolicy_streaming"),
        ("policy", "partial_logquant", "kvpolicy_logquant"),
    ]:
        assert re.search(rf"^{kind}\s+{name}\s+\(plugin: {plugin}\)$", out, re.M), (kind, name)


def test_show_prints_yaml_and_budget(capsys):
    assert main(["show", "partial_logquant"]) == 0
    out = capsys.readouterr().out
    assert "type: log" in out and "window: 64" in out
    assert "budget per layer: keys 192, values 64" in out


def test_unknown_policy_is_a_clear_error(capsys):
    assert main(["show", "kiwi"]) == 2
    err = capsys.readouterr().err
    assert "unknown policy 'kiwi'. Did you mean 'kivi'" in err


def test_generate_refuses_a_bad_policy_before_loading_the_model(capsys):
    assert main(["generate", "--policy", "logqant", "--prompt", "hi"]) == 2
    assert "Did you mean 'logquant'" in capsys.readouterr().err


@pytest.mark.model
def test_generate_on_the_embedded_model_reports_kv_bytes(tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Explain in two sentences why the sky is blue. " * 30)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvpolicy.cli",
            "generate",
            "--policy",
            "kivi",
            "--prompt-file",
            str(prompt),
            "--max-new-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    lines = result.stdout.strip().splitlines()
    assert re.match(r"policy kivi: prompt \d+ tokens, \d+ generated", lines[-2])
    match = re.match(r"KV cache: ([\d.]+) MiB for \d+ tokens vs ([\d.]+) MiB in 16-bit \(ratio ([\d.]+)", lines[-1])
    assert match, lines[-1]
    held, baseline, ratio = map(float, match.groups())
    assert ratio == pytest.approx(held / baseline, abs=0.01) and ratio < 0.6


def test_plot_retention_writes_a_picture(tmp_path, capsys):
    out = tmp_path / "log.png"
    assert main(["plot-retention", "logquant", "-o", str(out), "--steps", "120"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in capsys.readouterr().out
