"""The README's main job on the default model (Qwen2.5-Coder-1.5B-Instruct, float32 on a CPU):
every shipped policy answers the default prompt with text that does not loop, and the run shows
the 16-bit cache's answer beside it. Marked ``model`` (it converts and loads the 1.5B model);
its xdist group keeps every test that loads that model on one worker, one copy in memory at a time.

The CLI test runs the main job verbatim. The other shipped policies answer from one shared
16-bit prefill of the prompt (:func:`~kvpolicy.evaluation.shared_prefill.generate_from`, which
gives ``generate()``'s tokens exactly: tests/evaluation/test_generation_tasks.py), since on 2
cores the 1.5B model's prefill is a third of each answer's time."""

from __future__ import annotations

import re
import shlex

import pytest
import torch
from transformers import DynamicCache

from kvpolicy.cli import default_prompt, main
from kvpolicy.evaluation.answer_comparison import answer, compare_answers
from kvpolicy.evaluation.generation_task import eos_ids
from kvpolicy.evaluation.scoring import looping
from kvpolicy.evaluation.shared_prefill import generate_from, prefill_rows, trim
from kvpolicy.models import DEFAULT_MODEL, load_default_model
from kvpolicy.policy import Policy
from kvpolicy.policy.registry import DEFAULT_PLUGINS, get_registry

#: the xdist group of every test that loads the 1.5B model (tests/tools/test_docs.py too)
DEFAULT_MODEL_GROUP = pytest.mark.xdist_group("default-model")
pytestmark = [pytest.mark.model, DEFAULT_MODEL_GROUP]

NEW_TOKENS = 64  # the CLI's default --max-new-tokens
#: the README's main job; the CLI test runs it verbatim (and tests/tools/test_docs.py therefore does not)
MAIN_JOB = "kvpolicy generate --policy logquant"
MAIN_JOB_POLICY = "logquant"
#: the policies kvpolicy ships (an installed third-party plugin's are not the main job's), but
#: the main job's own, whose answer the CLI test reads
QUANTIZING = [
    name
    for name in get_registry().names("policy")
    if name not in ("full", MAIN_JOB_POLICY) and get_registry().provider("policy", name) in DEFAULT_PLUGINS
]


def test_every_shipped_policy_answers_the_main_job_without_looping():
    """The 16-bit answer is text and agrees with itself; every other shipped policy's answer is
    text that does not loop, with tokens quantized. One test, so the 1.5B model loads and answers
    at 16 bits once: under xdist other modules' tests can run between a module's tests, which
    tore a module fixture down and built it again."""
    model, tokenizer = load_default_model(dtype=torch.float32, name=DEFAULT_MODEL)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": default_prompt(True)}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(text, return_tensors="pt")
    ids, eos = inputs["input_ids"], eos_ids(tokenizer, model)
    reference = answer(model, tokenizer, inputs, DynamicCache(), NEW_TOKENS)
    assert looping(reference.text) is None and len(reference.text.split()) > 20
    same = compare_answers(model, inputs, reference, reference)
    assert same.agreed == same.reference_tokens == same.steps == same.same_top1
    assert same.rouge_l == 100.0 and same.mean_kl == pytest.approx(0.0, abs=1e-4)
    source, first = prefill_rows(model, ids)
    shared = generate_from(model, DynamicCache(), source, ids, first, NEW_TOKENS, eos_token_ids=eos)
    assert shared == [trim(reference.tokens, None, eos)]  # the shared prefill answers as generate() does

    wrong = {}
    for name in QUANTIZING:
        cache = Policy.load(name).make_cache(model)
        [tokens] = generate_from(model, cache, source, ids, first, NEW_TOKENS, eos_token_ids=eos)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if name != "streaming" and not cache.memory().demoted:  # streaming evicts: nothing quantized
            wrong[name] = f"quantized nothing of a {ids.shape[1]}-token prompt"
        elif (loop := looping(text)) is not None or len(text.split()) <= 20:
            wrong[name] = f"{loop or 'too short'}: {text!r}"
    assert QUANTIZING and not wrong, wrong


def test_the_cli_streams_the_answer_and_shows_the_16_bit_one_beside_it(capsys):
    """The README's main job, verbatim: the policy's answer is text that does not loop, stored in
    fewer bytes than a DynamicCache, and the 16-bit answer and the comparison follow it."""
    program, *argv = shlex.split(MAIN_JOB)
    assert program == "kvpolicy" and argv[argv.index("--policy") + 1] == MAIN_JOB_POLICY
    assert main(argv) == 0
    out = capsys.readouterr().out
    policy_part, reference_part = out.split("the full-precision cache (DynamicCache, float32) on the same prompt:")
    header = re.search(rf"policy {MAIN_JOB_POLICY}: prompt \d+ tokens, \d+ generated", policy_part)
    assert header, policy_part
    answer_text = policy_part[: header.start()]
    assert looping(answer_text) is None and len(answer_text.split()) > 20, answer_text
    memory = r"KV cache: [\d.]+ MiB for \d+ tokens; a DynamicCache in float32 holds [\d.]+ MiB: ([\d.]+)x smaller"
    smaller = re.search(memory, policy_part)
    assert smaller and float(smaller.group(1)) > 2, "the 2-bit policy quantized (next to) nothing"
    assert re.search(r"against the DynamicCache answer: the first \d+ of \d+ tokens identical, ROUGE-L", reference_part)
    assert "the answer loops" not in reference_part
