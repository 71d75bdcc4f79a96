"""The generation-task harness: one 16-bit prefill handed to each contender gives exactly the tokens
of ``model.generate()`` with that contender from scratch; scores, intervals and tasks on a tiny model."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from kvpolicy.evaluation.code_completion import CodeCompletion, cut_at_line
from kvpolicy.evaluation.contenders import bits_per_element, resolve_contenders
from kvpolicy.evaluation.document_qa import DocumentQA, facts, normalize
from kvpolicy.evaluation.humaneval import HumanEval, read_problems
from kvpolicy.evaluation.program_trace import ProgramTrace, program
from kvpolicy.evaluation.scoring import edit_similarity, looping, paired_interval, rouge_l
from kvpolicy.evaluation.shared_prefill import generate_from, prefill_rows, trim
from kvpolicy.evaluation.summarization import Summarization
from kvpolicy.generation import cache_kwargs
from kvpolicy.policy.registry import get_registry
from tests.conftest import tiny_llama

SHIPPED = get_registry().names("policy")
CONTENDERS = [*SHIPPED, "hf_quantized_int2", "hf_quantized_int4"]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2)


def _shared_and_from_scratch(model, contender, cache) -> tuple[list[list[int]], list[list[int]]]:
    """40 new tokens of two 300-token prompts (past every policy's full-precision budget):
    ``cache`` given one shared 16-bit prefill, and a fresh cache of ``contender`` through
    ``generate()`` from the start."""
    torch.manual_seed(1)
    ids = torch.randint(1, 256, (2, 300))
    source, first = prefill_rows(model, ids)
    shared = generate_from(model, cache, source, ids, first, 40)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            **cache_kwargs(contender.make_cache(model)),
            max_new_tokens=40,
            do_sample=False,
        )
    return shared, out[:, 300:].tolist()


@pytest.mark.parametrize("name", CONTENDERS)
def test_shared_prefill_generates_what_generate_does_from_scratch(model, name):
    (contender,) = resolve_contenders([name])
    shared, from_scratch = _shared_and_from_scratch(model, contender, contender.make_cache(model))
    assert shared == from_scratch


@pytest.mark.parametrize("name", ["kivi", "partial_logquant"])
def test_shared_prefill_hands_over_to_the_cuda_graph_path(model, name):
    """A CUDA-graph cache (its steps run eagerly on a CPU) takes the shared prefill by
    ``Cache.update`` outside any forward: its first decode step adopts those tokens (the check
    that every update reached the attention covers that step alone) and gives the tokens of
    ``generate()`` with such a cache from scratch. Keys and values retained alike and paired."""
    from kvpolicy.graphs.static_cache import StaticPolicyCache

    (contender,) = resolve_contenders([name], cuda_graphs=True)  # what `evaluate --cuda-graphs on` builds
    cache = contender.make_cache(model)
    assert isinstance(cache, StaticPolicyCache)
    shared, from_scratch = _shared_and_from_scratch(model, contender, cache)
    assert shared == from_scratch


def test_rows_stop_where_their_own_rule_holds(model):
    (contender,) = resolve_contenders(["kivi"])
    ids = torch.randint(1, 256, (2, 64), generator=torch.Generator().manual_seed(2))
    source, first = prefill_rows(model, ids)
    full = generate_from(model, contender.make_cache(model), source, ids, first, 12)
    stop_at = {tuple(full[0][:3]), tuple(full[1][:5])}
    rows = generate_from(model, contender.make_cache(model), source, ids, first, 12, stop=lambda t: tuple(t) in stop_at)
    assert rows == [full[0][:3], full[1][:5]]
    assert trim([5, 6, 7, 8], None, eos=[7]) == [5, 6]


def test_scores_read_as_points():
    assert edit_similarity("return x", "return x") == 100.0
    assert 0 < edit_similarity("return x + 1", "return x") < 100
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 100.0
    assert rouge_l("a b c d", "a x c y") == pytest.approx(50.0)
    assert rouge_l("", "words") == 0.0
    mean, low, high = paired_interval([10, 20, 30], [10, 10, 10])
    assert mean == pytest.approx(10.0) and low < 10 < high
    assert paired_interval([5.0], [2.0]) == (3.0, 3.0, 3.0)
    with pytest.raises(ValueError):
        paired_interval([1.0], [1.0, 2.0])


@pytest.mark.parametrize(
    "text, loops",
    [
        ("Python\n\nPython\n\nPython\n\nExceptions", True),
        ("the the the the end", True),
        ("Python's Exception Handling\n***\nPython's Exception Handling\n***\nPython's Exception Handling", True),
        ("go to the shop and then go to the park", False),
        ("Exceptions in Python are used to handle errors. They are raised when an error occurs.", False),
        ("1. first\n2. second\n3. third ... done", False),
    ],
)
def test_looping_names_a_loop_and_passes_sentences(text, loops):
    assert (looping(text) is not None) == loops


def test_document_qa_asks_for_a_value_its_file_assigns_once():
    source = "import os\n\nLIMIT = 512\nNAME = 'utf-8'\nLIMIT2 = 1\nLIMIT2 = 2\n__version__ = '1'\nflag = True\n"
    assert [(n, v) for n, v, _ in facts(source)] == [("LIMIT", "512"), ("NAME", "'utf-8'")]
    assert normalize("`512`.") == "512" and normalize("'utf-8'\nmore") == "utf-8"


def test_document_qa_takes_further_facts_of_each_file_once_every_file_gave_one(monkeypatch):
    from kvpolicy.evaluation import document_qa
    from kvpolicy.evaluation.texts import code_files

    assert document_qa._outward(1) == [0] and document_qa._outward(4) == [2, 3, 1, 0]
    assert sorted(document_qa._outward(7)) == list(range(7))
    smallest = sorted(code_files(), key=lambda p: p.stat().st_size)
    files = list(itertools.islice((p for p in smallest if len(facts(p.read_text())) >= 2), 3))
    monkeypatch.setattr(document_qa, "code_files", lambda: files)
    tokenizer = _ByteTokenizer()
    few = DocumentQA(samples=2, context=600).build(tokenizer, False)
    many = DocumentQA(samples=5, context=600).build(tokenizer, False)
    assert len(files) == 3 and many[:2] == few  # more samples keep the first ones
    assert [s.name.split(":")[0] for s in many] == ([p.name for p in files] * 2)[:5]  # one a file, then a second
    assert len({s.name for s in many}) == 5  # further facts, no repeat


def test_program_trace_prints_what_python_prints():
    import contextlib
    import io

    source, printed = program(random.Random(3), 20)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(source, {})
    assert buffer.getvalue().splitlines() == printed
    task = ProgramTrace(samples=1, entries=20, seed=3)
    sample = task.build(_ByteTokenizer(), instruct=False)[0]
    assert sample.reference == printed
    answer = "```\n" + "\n".join(printed) + "\n```"
    assert task.score(sample, answer, "") == 100.0
    assert task.score(sample, "\n".join(printed[1:]), "") == pytest.approx(95.0)  # one line dropped costs one
    assert task.score(sample, "nothing", "") == 0.0
    programs = ProgramTrace(samples=4, entries=20, seed=3).build(_ByteTokenizer(), instruct=False)
    assert len(programs) == 4 and len({len(p.ids) for p in programs}) == 1  # one batch, no padding
    assert len({p.reference[0] for p in programs}) > 1  # different programs


class _ByteTokenizer:
    """One token per UTF-8 byte (the tiny model's 256-token vocabulary), no chat template."""

    eos_token_id = None
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def suite(model):
    from kvpolicy.evaluation import evaluate

    tokenizer = _ByteTokenizer()
    contenders = resolve_contenders(["full", "kivi", "streaming", "hf_quantized_int2"], budget=32)
    tasks = [
        CodeCompletion(samples=2, context=256, batch=2, max_new_tokens=8),
        DocumentQA(samples=2, context=512, batch=2, max_new_tokens=6),
        Summarization(samples=2, context=256, batch=2, max_new_tokens=12),
        HumanEval(samples=2, context=256, batch=1, max_new_tokens=12),
        ProgramTrace(samples=2, entries=6, batch=2, max_new_tokens=24),
    ]
    return evaluate(model, tokenizer, tasks, contenders, progress=False)


def test_every_generation_task_scores_every_contender_against_full(suite):
    for task in suite.tasks:
        assert set(task.rows) == {"full", "kivi", "streaming", "hf_quantized_int2"}, task.task
        full = task.rows["full"]
        assert full["diff"] == 0.0 and full["same"] == 1.0 and full["bits"] == 16.0
        assert all(0 <= d["score"] <= 100 for d in task.details)
        for row in task.rows.values():
            assert row["low"] <= row["diff"] <= row["high"]
            assert row["n"] == 2
        assert task.rows["kivi"]["kv_ratio"] < 0.9 < full["kv_ratio"]
        assert task.scored_by
    summary = {t.task: t for t in suite.tasks}["summary"]
    assert summary.rows["full"]["score"] == 100.0  # ROUGE-L against itself


def test_prompts_hold_the_task_context(model):
    tokenizer = _ByteTokenizer()
    assert {len(s.ids) for s in CodeCompletion(samples=2, context=300).build(tokenizer, False)} == {300}
    assert {len(s.ids) for s in DocumentQA(samples=2, context=600).build(tokenizer, False)} == {600}
    assert {len(s.ids) for s in Summarization(samples=2, context=300).build(tokenizer, False)} == {300}
    assert {len(s.ids) for s in HumanEval(samples=2, context=400).build(tokenizer, False)} == {400}
    before, line = cut_at_line(tokenizer, "a = 1\n" * 100 + "value = compute(a)\n", 50)
    assert line == "value = compute(a)" and before == "a = 1\n" * 100  # short lines are skipped


def test_bits_per_element_counts_scales(model):
    bits = {c.name: bits_per_element(c, model) for c in resolve_contenders(["full", "kivi", "streaming"])}
    assert bits == {"full": 16.0, "kivi": 3.0, "streaming": 0.0}
    (hf2, hf4) = resolve_contenders(["hf_quantized_int2", "hf_quantized_int4"])
    assert bits_per_element(hf2, model) == pytest.approx(2.5) and bits_per_element(hf4, model) == pytest.approx(4.5)


@pytest.mark.model
def test_a_canonical_solution_written_as_tokens_passes_humaneval(smollm):
    """The prompt ends where the body starts: the solution's own tokens, decoded as the task
    decodes an answer, pass the problem's tests (a prompt ending in indentation would not)."""
    _, tokenizer = smollm
    task = HumanEval(samples=3, context=300)
    problems = {p["task_id"]: p for p in read_problems()}
    for sample in task.build(tokenizer, instruct=False):
        assert tokenizer.decode(list(sample.ids)).endswith(problems[sample.name]["prompt"])
        solution = problems[sample.name]["canonical_solution"]
        answer = task.answer(tokenizer, tokenizer(solution, add_special_tokens=False)["input_ids"])
        assert task.score(sample, answer, answer) == 100.0
        assert task.score(sample, " " + answer, answer) == 0.0  # one stray space breaks the body


def test_a_resumed_run_reuses_finished_tasks_and_runs_only_the_rest(model, suite, monkeypatch):
    """A saved task made with the same settings and contenders is reused, read back from JSON;
    one whose settings changed runs again."""
    import json

    from kvpolicy.evaluation import evaluate
    from kvpolicy.evaluation.task import TaskResult

    finished = [TaskResult.from_dict(json.loads(json.dumps(t.to_dict()))) for t in suite.tasks]
    contenders = resolve_contenders(["full", "kivi", "streaming", "hf_quantized_int2"], budget=32)
    same = CodeCompletion(samples=2, context=256, batch=2, max_new_tokens=8)
    changed = DocumentQA(samples=2, context=512, batch=2, max_new_tokens=7)
    ran = []
    monkeypatch.setattr(CodeCompletion, "run", lambda *a, **k: pytest.fail("re-ran a finished task"))
    real_run = DocumentQA.run
    monkeypatch.setattr(DocumentQA, "run", lambda self, *a, **k: ran.append(self.name) or real_run(self, *a, **k))
    result = evaluate(model, _ByteTokenizer(), [same, changed], contenders, progress=False, finished=finished)
    assert ran == ["qa"]
    assert result.tasks[0].details == suite.tasks[0].details
    assert result.tasks[1].settings["max_new_tokens"] == 7


def test_resume_refuses_a_run_of_other_policies(tmp_path, capsys, monkeypatch):
    import json

    import kvpolicy.models
    from kvpolicy.cli import main

    monkeypatch.setattr(kvpolicy.models, "load_default_model", lambda **k: pytest.fail("loaded the model"))
    (tmp_path / "results.json").write_text(
        json.dumps(
            {
                "settings": {"policies": ["full", "kivi"], "budget": None, "bits": None},
                "environment": {"model": "/cache/models/smollm2", "dtype": "bfloat16"},
                "tasks": [],
            }
        )
    )
    argv = ["evaluate", "--model", "smollm2", "--tasks", "qa", "--out", str(tmp_path), "--resume"]
    assert main([*argv, "--policies", "logquant"]) == 2
    said = capsys.readouterr().err
    assert "a run with the same policies (['full', 'logquant']; that run had ['full', 'kivi'])" in said
    assert main([*argv, "--policies", "kivi", "--cuda-graphs", "off"]) == 2  # that run (no setting) had auto
    assert "a run with the same cuda_graphs ('off'; that run had 'auto')" in capsys.readouterr().err
    assert main(["evaluate", "--tasks", "qa", "--out", str(tmp_path / "new"), "--resume"]) == 2
    assert "none is there" in capsys.readouterr().err
