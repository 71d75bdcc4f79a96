"""The ``kvpolicy`` command line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvpolicy import Policy, load_policy
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
    assert "# decode steps on this machine: eager" in out  # no CUDA here, and keys and values differ


@pytest.mark.parametrize(
    ("model", "served", "four_bit", "rotate"),
    [("smollm2", "30 of 30", 12, "hadamard"), ("gemma3-270m", "3 of 18", 2, "none")],
)
def test_show_with_a_model_names_each_layers_settings(capsys, model, served, four_bit, rotate):
    """`kvpolicy show logquant_mixed --model M`: the layers its bit budget takes on M, the
    rotation `auto` resolves to and the whole-head value groups, and the mean within 3.0."""
    assert main(["show", "logquant_mixed", "--model", model]) == 0
    out = capsys.readouterr().out
    assert f"# on {model}: {served} layers cached by the policy" in out
    layers = re.findall(r"^#   layer \d+: keys (\d)-bit/channel groups of (\d+)/rotate (\w+)", out, re.M)
    assert [bits for bits, _, _ in layers] == ["4"] * four_bit + ["2"] * (len(layers) - four_bit)
    assert {r for _, _, r in layers} == {rotate}
    mean = float(re.search(r"mean bits per quantized element: ([\d.]+)", out).group(1))
    assert 2.0 < mean <= 3.0


def test_decode_summary_says_where_cuda_graphs_serve():
    """What ``make_cache(model)`` would do on a CUDA device, per policy (no device needed)."""
    from kvpolicy.executors.kernels import triton_available

    if not triton_available():
        pytest.skip("the graph path needs Triton")
    assert load_policy("logquant").decode_summary("cuda").startswith("replayed from a CUDA graph")
    assert load_policy("partial_logquant").decode_summary("cuda").startswith("replayed from a CUDA graph")
    data = load_policy("partial_logquant").to_dict()
    channel = {**data["values"], "quant": {**data["values"]["quant"], "axis": "channel", "group_size": 64}}
    assert "not quantized per token" in Policy.from_dict({**data, "values": channel}).decode_summary("cuda")
    assert "'reference' was chosen" in Policy.from_dict({**load_policy("kivi").config.to_dict(),
                                                         "executor": "reference"}).decode_summary("cuda")  # fmt: skip
    assert load_policy("kivi").decode_summary("cpu").startswith("eager (CUDA graphs need a CUDA device)")


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
            "--model",
            "smollm2",
            "--no-compare",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    lines = result.stdout.strip().splitlines()
    assert re.match(r"policy kivi: prompt \d+ tokens, \d+ generated", lines[-2])
    pattern = r"KV cache: ([\d.]+) MiB for \d+ tokens; a DynamicCache in float32 holds ([\d.]+) MiB: ([\d.]+)x smaller$"
    match = re.match(pattern, lines[-1])
    assert match, lines[-1]
    held, baseline, factor = map(float, match.groups())
    assert factor == pytest.approx(baseline / held, rel=0.02) and factor > 1.5  # float32: 32-bit window and scales
    assert "prefilling" in result.stderr and "(float32, cpu)" in result.stderr  # the fastest dtype on a CPU


@pytest.mark.model
def test_generate_with_cuda_graphs_writes_what_eager_decoding_writes(tmp_path):
    """``--cuda-graphs on`` (on a CPU: the static layers' steps, run eagerly) gives the same text."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("List three facts about the moon. " * 40)
    command = [sys.executable, "-m", "kvpolicy.cli", "generate", "--policy", "logquant", "--prompt-file", str(prompt),
               "--max-new-tokens", "24", "--model", "smollm2", "--no-compare"]  # fmt: skip
    runs = [subprocess.run(command + extra, capture_output=True, text=True, check=True, timeout=600).stdout
            for extra in ([], ["--cuda-graphs", "on"])]  # fmt: skip
    eager, graphed = (run.strip().splitlines() for run in runs)
    assert graphed[:-1] == eager[:-1] and re.match(r"policy logquant: prompt \d+ tokens, 24 generated", eager[-2])
    assert graphed[-1].startswith("KV cache: ")  # the preallocated buffers, counted as held


def test_plot_retention_writes_a_picture(tmp_path, capsys):
    out = tmp_path / "log.png"
    assert main(["plot-retention", "logquant", "-o", str(out), "--steps", "120"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["generate", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "--max-new-tokens", "-3"], "--max-new-tokens"),
        (["generate", "--temperature", "-1"], "--temperature"),
        (["generate", "--temperature", "nan"], "--temperature"),
        (["generate", "--prompt", "a", "--prompt-file", "b"], "--prompt-file"),
        (["plot-retention", "logquant", "--steps", "-5"], "--steps"),
        (["generate", "--dtype", "float64"], "--dtype"),
        (["generate", "--device", "gpu"], "--device"),
        (["evaluate", "--device", "cuda:x"], "--device"),
        (["evaluate", "--samples", "0"], "--samples"),
        (["evaluate", "--context", "10"], "--context"),
        (["evaluate", "--batch", "-1"], "--batch"),
        (["evaluate", "--trace-entries", "999"], "--trace-entries"),
        (["evaluate", "--bits", "5"], "--bits"),
        (["evaluate", "--budget", "-4"], "--budget"),
        (["evaluate", "--sweep-budgets", "0"], "--sweep-budgets"),
        (["evaluate", "--passkey-lengths", "0,1024"], "--passkey-lengths"),
        (["evaluate", "--passkey-depths", "1.5"], "--passkey-depths"),
        (["evaluate", "--fidelity-length", "0"], "--fidelity-length"),
        (["plot-retention", "logquant", "--steps", "100000000"], "--steps"),
        (["plot-retention", "logquant", "--prefill", "0"], "--prefill"),
    ],
)
def test_bad_arguments_are_refused_by_name_before_anything_loads(argv, names, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert names in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["empty", "blank file", "directory", "missing", "not utf-8"])
def test_bad_prompts_are_refused_with_the_file_named_before_the_model_loads(kind, tmp_path, capsys, monkeypatch):
    import kvpolicy.models

    monkeypatch.setattr(kvpolicy.models, "load_default_model", lambda **k: pytest.fail("loaded the model"))
    path = tmp_path / "prompt.txt"
    if kind == "empty":
        argv = ["generate", "--prompt", "  "]
    else:
        if kind == "blank file":
            path.write_text("\n\n")
        elif kind == "directory":
            path = tmp_path
        elif kind == "not utf-8":
            path.write_bytes(b"caf\xe9 \xff")
        argv = ["generate", "--prompt-file", str(path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "kvpolicy generate: error:" in err
    assert ("--prompt" in err) and (kind == "empty" or str(path) in err)


def test_the_default_prompt_is_long_enough_to_be_compressed():
    """`kvpolicy generate` with no prompt shows what the library is for: its prompt passes
    every shipped policy's full-precision budget (about 4 characters per token)."""
    from kvpolicy import get_registry, load_policy
    from kvpolicy.cli import default_prompt

    budgets = [max(b or 0 for b in load_policy(n).budget().values()) for n in get_registry().names("policy")]
    assert len(default_prompt()) / 4 > 2 * max(budgets)


def test_help_list_and_show_do_not_import_transformers():
    code = (
        "import sys\n"
        "from kvpolicy.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'help imported torch'\n"
        "assert main(['list']) == 0 and main(['show', 'logquant']) == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'hqq', 'optimum'))\n"
        "assert not heavy, heavy[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_our_documented_generate_path_raises_no_deprecation_warning():
    """README's path: policy.make_cache(model), then generate with the keyword the installed
    transformers takes (``cache=`` where it has it)."""
    import warnings

    import torch

    from kvpolicy import load_policy
    from kvpolicy.generation import cache_kwargs, forward_cache_kwargs
    from tests.conftest import tiny_llama

    model = tiny_llama()
    ids = torch.randint(1, 256, (1, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model.generate(ids, max_new_tokens=2, **cache_kwargs(load_policy("kivi").make_cache(model)))
        model(ids, **forward_cache_kwargs(model, load_policy("kivi").make_cache(model)), use_cache=True)


def test_generate_refuses_an_unknown_model_before_loading_anything(capsys, monkeypatch):
    import kvpolicy.models

    monkeypatch.setattr(kvpolicy.models, "load_default_model", lambda **k: pytest.fail("loaded the model"))
    assert main(["generate", "--model", "gemma3", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'gemma3'. Did you mean 'gemma3-270m'?" in err and "smollm2" in err


def test_a_base_model_gets_a_prompt_to_continue_not_an_instruction():
    from kvpolicy.cli import default_prompt

    assert default_prompt(instruct=True).startswith("Summarize this passage")
    assert default_prompt(instruct=False).endswith("The passage in three sentences:")


@pytest.mark.model
def test_generate_on_gemma3_reports_its_sliding_window_layers():
    result = subprocess.run(
        [sys.executable, "-m", "kvpolicy.cli", "generate", "--model", "gemma3-270m", "--policy", "kivi",
         "--max-new-tokens", "4", "--no-compare"],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    last = result.stdout.strip().splitlines()[-1]
    assert re.match(r"KV cache: [\d.]+ MiB for \d+ tokens; a DynamicCache in float32 holds [\d.]+ MiB: [\d.]+x", last)
    assert "its sliding-window layers hold" in last
    assert "loading Gemma 3 270M (float32, cpu)" in result.stderr


@pytest.mark.parametrize(
    "argv, says",
    [
        (["evaluate", "--out", "README.md", "--tasks", "qa"], "--out: got 'README.md'"),
        (["evaluate", "--tasks", "fidelity", "--decode-tokens", "5000"], "--decode-tokens: got 5000"),
        (["evaluate", "--tasks", "qa,nope"], "unknown task 'nope'"),
        (["evaluate", "--policies", "kivi,nope"], "unknown policy 'nope'"),
    ],
)
def test_evaluate_refuses_what_would_fail_after_hours_before_the_model_loads(argv, says, capsys, monkeypatch):
    import kvpolicy.models

    monkeypatch.setattr(kvpolicy.models, "load_default_model", lambda **k: pytest.fail("loaded the model"))
    monkeypatch.chdir(Path(__file__).parents[2])
    assert main(argv) == 2
    assert says in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_a_cuda_device_this_machine_lacks_is_refused_before_the_model_loads(command, monkeypatch, capsys, tmp_path):
    import kvpolicy.models

    monkeypatch.setattr(kvpolicy.models, "load_default_model", lambda **k: pytest.fail("loaded the model"))
    argv = [command, "--device", "cuda", *(["--out", str(tmp_path / "eval")] if command == "evaluate" else [])]
    assert main(argv) == 2
    assert re.search(r"--device: got 'cuda'; allowed: cpu or auto", capsys.readouterr().err)


@pytest.mark.parametrize(
    ("given", "expected"), [("auto", "cuda" if torch.cuda.is_available() else "cpu"), ("cpu", "cpu")]
)
def test_the_model_is_loaded_on_the_device_asked_for(given, expected, monkeypatch, tmp_path):
    import kvpolicy.models

    asked = {}

    def load(**kwargs):
        asked.update(kwargs)
        raise RuntimeError("stop after the load")

    monkeypatch.setattr(kvpolicy.models, "load_default_model", load)
    for argv in (["generate", "--device", given], ["evaluate", "--device", given, "--out", str(tmp_path / "e")]):
        asked.clear()
        with pytest.raises(RuntimeError, match="stop after the load"):
            main(argv)
        assert asked["device"] == expected
