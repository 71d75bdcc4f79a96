"""The evaluation harness on a tiny random model (CI-sized): every task runs end to end,
the 16-bit contender reproduces the reference, quantized ones do not, reports are written."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvpolicy
from kvpolicy.cli import main
from kvpolicy.config import PolicyConfig
from kvpolicy.errors import ConfigError
from kvpolicy.evaluation import at_budget, evaluate, resolve_contenders
from kvpolicy.evaluation import report as report_module
from kvpolicy.evaluation.code_completion import cut_at_line
from kvpolicy.evaluation.fidelity import Fidelity
from kvpolicy.evaluation.humaneval import passes, read_problems, truncate
from kvpolicy.evaluation.passkey import Passkey, build_prompt
from kvpolicy.evaluation.scoring import edit_similarity
from kvpolicy.policy import Policy
from kvpolicy.policy.registry import get_registry
from tests.conftest import tiny_llama


class ByteTokenizer:
    """One token per UTF-8 byte: matches the tiny model's 256-token vocabulary."""

    eos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model, tokenizer = tiny_llama(layers=2), ByteTokenizer()
    names = ["full", "kivi", "logquant"]
    contenders = resolve_contenders(names, budget=32, bits=2)
    tasks = [
        Fidelity(length=192, decode_tokens=24),
        Passkey(lengths=(256,), depths=(0.5,), answer_tokens=4),
    ]
    result = evaluate(model, tokenizer, tasks, contenders, {"budget": 32}, progress=False)
    out = tmp_path_factory.mktemp("eval")
    written = report_module.write(result, out, command="kvpolicy evaluate (test)")
    return result, out, written


def test_full_reproduces_the_reference_and_quantized_policies_do_not(run):
    result, _, _ = run
    fidelity = {t.task: t for t in result.tasks}["fidelity"].rows
    assert fidelity["full"]["kl"] < 1e-6 and fidelity["full"]["top1"] == 1.0
    assert max(fidelity["full"]["attn_err_by_layer"]) < 1e-5
    for name in ("kivi", "logquant"):
        assert fidelity[name]["kl"] > 1e-6
        assert all(e > 1e-4 for e in fidelity[name]["attn_err_by_layer"])
        assert fidelity[name]["kv_ratio"] < 0.6 < fidelity["full"]["kv_ratio"]
    assert len(fidelity["kivi"]["attn_err_by_layer"]) == 2


def test_every_task_scores_every_contender(run):
    result, _, _ = run
    for task in result.tasks:
        assert set(task.rows) == {"full", "kivi", "logquant"}
        assert len(task.details) == 3 * (2 if task.task == "fidelity" else 1)


def test_reports_hold_every_contender(run):
    result, out, written = run
    names = {p.name for p in written}
    assert {
        "results.json",
        "results.md",
        "summary.png",
        "attention_error_by_layer.png",
        "passkey_by_length.png",
    } <= names
    data = json.loads((out / "results.json").read_text())
    assert data["command"] == "kvpolicy evaluate (test)"
    table = report_module.summary_table(result)
    for name in ("full", "kivi", "logquant"):
        assert f"| {name} |" in table


def test_sweep_plot_is_drawn(run, tmp_path):
    result, _, _ = run
    result.sweep = [
        {"policy": p, "budget": b, "bits": n, "kv_ratio": r, "kl": 0.1 * r, "top1": 1 - r}
        for p in ("kivi", "logquant")
        for n in (2, 4)
        for b, r in ((32, 0.2), (64, 0.3))
    ]
    written = report_module.plot(result, tmp_path)
    assert tmp_path / "accuracy_vs_compression.png" in written
    assert "| kivi | 2 | 32 |" in report_module.sweep_table(result.sweep)


@pytest.mark.parametrize(
    "name, budget, expected",
    [
        ("kivi", 128, {"keys": [{"type": "window", "size": 128}]}),
        ("kivi", 64, {"keys": [{"type": "window", "size": 64}]}),
        ("logquant", 128, {"keys": [{"type": "log", "window": 42}]}),
        ("logquant", 256, {"keys": [{"type": "log", "window": 85}]}),
        (
            "partial_logquant",
            128,
            {"keys": [{"type": "log", "window": 64}], "values": [{"type": "window", "size": 64}]},
        ),
        ("streaming", 64, {"keys": [{"type": "sink", "size": 4}, {"type": "window", "size": 60}]}),
    ],
)
def test_budget_matching_follows_the_paper(name, budget, expected):
    """LogQuant's paper matches KIVI R=128 with LogQuant W=42 and PartialLogQuant W=64."""
    config = at_budget(Policy.load(name).config, budget, bits=4)
    for section, retain in expected.items():
        assert getattr(config, section).to_dict()["retain"] == retain
    if config.keys.demote == "quantize":
        assert config.keys.quant.bits == 4 and config.values.quant.bits == 4


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(set(get_registry().names("policy")) - {"full"})), budget=st.integers(8, 2048))
def test_matched_budget_never_exceeds_the_knob(name, budget):
    """Every registered policy, a plugin's included (the example plugin's `strided_kivi`),
    matches any budget above its sinks: each selector scales itself."""
    config = Policy.load(name).config
    sinks = sum(s.params.get("size", 4) for s in config.keys.retain if s.type == "sink")
    if budget <= sinks + 2:
        return
    b = Policy(at_budget(config, budget)).budget()
    assert (b["keys"] + b["values"]) / 2 <= budget


def test_a_plugin_selector_scales_itself_and_one_that_cannot_is_named():
    import attrs

    from kvpolicy import Registry
    from kvpolicy.selectors import Selector

    config = Policy.load("strided_kivi").config  # the example plugin (installed in CI like any plugin)
    matched = at_budget(config, 64)
    stride = next(s for s in matched.keys.retain if s.type == "stride")
    original = next(s for s in config.keys.retain if s.type == "stride")
    assert stride.params["limit"] < original.params.get("limit", 32)

    @attrs.define
    class Fixed(Selector):
        name = "fixed_grid"
        size: int = 8

        @property
        def budget(self):
            return self.size

        def keep(self, length):
            return torch.arange(min(length, self.size))

    class Plugin:
        @kvpolicy.hookimpl
        def kvpolicy_selectors(self):
            return [Fixed]

    registry = Registry(plugins={"fixed": Plugin()})
    data = {"name": "f", "keys": {"retain": [{"type": "fixed_grid"}]}, "values": {"retain": [{"type": "fixed_grid"}]}}
    with pytest.raises(ConfigError, match="selector 'fixed_grid' does not say how it scales"):
        at_budget(PolicyConfig.from_dict(data), 4, registry=registry)


def test_task_helpers_score_exactly():
    tokenizer = ByteTokenizer()
    prompt = build_prompt(tokenizer, list(b"Text. " * 200), 512, 0.5, "12345")
    assert "The pass key is 12345." in prompt and abs(len(prompt) - 512) < 16
    text = "x = 1\n" * 40 + "# a comment\n\n    result = compute(x)\nrest = 2\n"
    cut = cut_at_line(tokenizer, text, 200)
    assert cut == (text[: text.index("    result")], "    result = compute(x)")
    assert edit_similarity("abc", "abc") == 100.0 and edit_similarity("abc", "xyz") == 0.0
    assert truncate("    return 1\ndef other():\n    pass") == "    return 1"


def test_humaneval_execution_tells_right_from_wrong():
    problem = read_problems()[0]
    assert passes(problem, problem["canonical_solution"])
    assert not passes(problem, "    return not True\n")


def test_cli_names_unknown_tasks(capsys):
    assert main(["evaluate", "--tasks", "fidelty", "--policies", "kivi"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'fidelty'" in err and "Did you mean 'fidelity'" in err


def test_greedy_agreement_measures_drift_until_the_first_different_token():
    import torch

    from kvpolicy.evaluation.agreement import greedy_agreement

    g = torch.Generator().manual_seed(0)
    reference = torch.randn(6, 50, generator=g)
    reference_tokens = reference.argmax(-1)
    same = greedy_agreement(reference_tokens, reference, reference_tokens, reference)
    assert same.identical and same.agreed == 6 and same.drift == 0 and same.divergence_margin is None
    shifted = reference + 0.1
    moved = greedy_agreement(reference_tokens, shifted, reference_tokens, reference)
    assert moved.identical and moved.max_logit_diff == pytest.approx(0.1, abs=1e-6)
    assert moved.drift == pytest.approx(max(0.1 / float(r.std()) for r in reference), rel=1e-5)
    tokens = reference_tokens.clone()
    tokens[3] = (tokens[3] + 1) % 50
    split = greedy_agreement(tokens, shifted, reference_tokens, reference)
    top = reference[3].topk(2).values
    assert split.agreed == 3 and not split.identical
    assert split.divergence_margin == pytest.approx(float(top[0] - top[1]) / float(reference[3].std()), rel=1e-5)
    assert split.drift == pytest.approx(max(0.1 / float(r.std()) for r in reference[:3]), rel=1e-5)


def test_pareto_front_keeps_only_points_nothing_beats_on_bytes_and_error():
    from kvpolicy.evaluation.scoring import pareto_front

    points = [("a", 0.2, 0.5), ("b", 0.3, 0.2), ("c", 0.25, 0.6), ("d", 0.5, 0.2), ("e", 0.1, 0.9), ("f", 0.6, 0.1)]
    assert pareto_front(points) == ["e", "a", "b", "f"]
    assert pareto_front([("x", 0.3, 0.1)]) == ["x"]


def test_wilson_interval_brackets_the_proportion_and_narrows_with_samples():
    from kvpolicy.evaluation.report import wilson_interval

    lo, hi = wilson_interval(5, 12)
    assert lo < 5 / 12 < hi and 0.15 < lo < 0.2 and 0.65 < hi < 0.7
    assert wilson_interval(50, 120)[1] - wilson_interval(50, 120)[0] < hi - lo
    assert wilson_interval(0, 12)[0] == 0.0 and wilson_interval(12, 12)[1] == 1.0


def test_spread_table_reads_every_sample_of_a_results_file():
    from kvpolicy.evaluation.report import spread_table

    data = {
        "contenders": [{"name": "a"}, {"name": "b"}],
        "tasks": [
            {"task": "fidelity", "details": [{"contender": "a", "kl": 0.1}, {"contender": "a", "kl": 0.3},
                                             {"contender": "b", "kl": 0.2}, {"contender": "b", "kl": 0.4}]},
            {"task": "passkey", "details": [{"contender": c, "correct": ok} for c, ok in
                                            (("a", True), ("a", False), ("b", False), ("b", False))]},
        ],
    }  # fmt: skip
    table = spread_table(data)
    assert "| a | 0.100, 0.300 | 1/2 (" in table and "| b | 0.200, 0.400 | 0/2 (0.00–" in table
    assert "recalled" not in table  # a run before the recall metric
    for detail, recalled in zip(data["tasks"][1]["details"], (5, 3, 0, 1)):
        detail.update(recalled=recalled, key_tokens=5)
    table = spread_table(data)
    assert "| a | 0.100, 0.300 | 1/2 (0.09–0.91) | 8/10 (" in table and "| 0/2 (0.00–0.66) | 1/10 (" in table


def test_forced_recall_counts_the_key_tokens_a_full_forward_predicts():
    """Feeding the key token by token on a cache scores what one forward over the whole
    sequence predicts at the key's positions (the full-precision cache changes nothing)."""
    from transformers import DynamicCache

    from kvpolicy.evaluation.decoding import prefill
    from kvpolicy.evaluation.passkey import answer_tokens, forced_recall

    model, tokenizer = tiny_llama(layers=2), ByteTokenizer()
    prompt = build_prompt(tokenizer, list(range(97, 123)) * 20, 256, 0.5, "60494")
    ids = tokenizer(prompt)["input_ids"]
    key_ids = answer_tokens(tokenizer, prompt, ids, "60494")
    assert bytes(key_ids) == b" 60494"
    prefix = len(ids) - 16
    source, _ = prefill(model, ids[:prefix])
    got = forced_recall(model, DynamicCache(config=model.config), source, prefix, ids[prefix:], key_ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids + key_ids])).logits[0]
    predicted = logits[len(ids) : len(ids) + len(key_ids) - 1].argmax(-1).tolist()
    assert got == sum(p == t for p, t in zip(predicted, key_ids[1:]))


def test_passkey_rows_count_recalled_key_tokens(run):
    result, _, _ = run
    passkey = {t.task: t for t in result.tasks}["passkey"]
    for detail in passkey.details:
        assert detail["key_tokens"] == 5 and 0 <= detail["recalled"] <= 5
    for name, row in passkey.rows.items():
        mine = [d for d in passkey.details if d["contender"] == name]
        assert row["recall"] == sum(d["recalled"] for d in mine) / (5 * len(mine))


def test_a_policy_its_bits_push_over_its_own_bit_budget_is_skipped_with_the_reason():
    """`--bits 4` on logquant_mixed (a 3.0-bit budget for its 4-bit layers): the run goes on
    without it and records why."""
    model, tokenizer = tiny_llama(layers=2), ByteTokenizer()
    contenders = resolve_contenders(["kivi", "logquant_mixed"], budget=32, bits=4)
    result = evaluate(model, tokenizer, [Fidelity(length=96, decode_tokens=8)], contenders, progress=False)
    assert [c["name"] for c in result.contenders] == ["kivi"]
    assert "earliest_within_bits: got 3.0" in result.settings["skipped"]["logquant_mixed"]


def test_three_bits_reach_kvpolicy_quantizers_but_not_quanto():
    """``--bits 3``: native codes serve it; transformers' QuantizedCache (quanto) is refused by name."""
    (contender,) = resolve_contenders(["kivi"], bits=3)
    assert {side.quant.bits for side in (contender.policy.config.keys, contender.policy.config.values)} == {3}
    with pytest.raises(ConfigError, match=r"--bits: got 3.*2 or 4 for hf_quantized"):
        resolve_contenders(["hf_quantized"], bits=3)
