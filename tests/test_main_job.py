"""The README's main job on the default model (Qwen2.5-Coder-1.5B-Instruct, float32 on a CPU):
every shipped policy answers the default prompt with text that does not loop, and the run shows
the 16-bit cache's answer beside it. Marked ``model`` (it converts and loads the 1.5B model)."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import DynamicCache

from kvpolicy.cli import default_prompt, main
from kvpolicy.evaluation.answer_comparison import answer, compare_answers
from kvpolicy.evaluation.scoring import looping
from kvpolicy.models import DEFAULT_MODEL, load_default_model
from kvpolicy.policy import Policy
from kvpolicy.policy.registry import DEFAULT_PLUGINS, get_registry

pytestmark = pytest.mark.model

NEW_TOKENS = 64  # the CLI's default --max-new-tokens
#: the policies kvpolicy ships (an installed third-party plugin's are not the main job's)
QUANTIZING = [
    name
    for name in get_registry().names("policy")
    if name != "full" and get_registry().provider("policy", name) in DEFAULT_PLUGINS
]


@pytest.fixture(scope="module")
def main_job():
    """``(model, inputs, reference)``: the default model, the default prompt in its chat
    template, and the DynamicCache answer."""
    model, tokenizer = load_default_model(dtype=torch.float32, name=DEFAULT_MODEL)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": default_prompt(True)}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(text, return_tensors="pt")
    reference = answer(model, tokenizer, inputs, DynamicCache(), NEW_TOKENS)
    return model, tokenizer, inputs, reference


def test_the_reference_answer_is_text_and_agrees_with_itself(main_job):
    model, _, inputs, reference = main_job
    assert looping(reference.text) is None and len(reference.text.split()) > 20
    same = compare_answers(model, inputs, reference, reference)
    assert same.agreed == same.reference_tokens == same.steps == same.same_top1
    assert same.rouge_l == 100.0 and same.mean_kl == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("name", QUANTIZING)
def test_every_shipped_policy_answers_the_main_job_without_looping(main_job, name):
    model, tokenizer, inputs, reference = main_job
    cache = Policy.load(name).make_cache(model)
    mine = answer(model, tokenizer, inputs, cache, NEW_TOKENS)
    if name != "streaming":  # streaming evicts: nothing quantized, bytes only bounded
        assert cache.memory().demoted, f"{name} quantized nothing of a {inputs['input_ids'].shape[1]}-token prompt"
    assert looping(mine.text) is None, f"{name}: {mine.text!r}"
    assert len(mine.text.split()) > 20, f"{name}: {mine.text!r}"
    comparison = compare_answers(model, inputs, mine, reference)
    assert comparison.loop is None and 0 <= comparison.agreed <= NEW_TOKENS


def test_the_cli_streams_the_answer_and_shows_the_16_bit_one_beside_it(capsys):
    assert main(["generate", "--policy", "logquant"]) == 0
    out = capsys.readouterr().out
    policy_part, reference_part = out.split("the full-precision cache (DynamicCache, float32) on the same prompt:")
    assert re.search(r"policy logquant: prompt \d+ tokens, \d+ generated", policy_part)
    memory = r"KV cache: [\d.]+ MiB for \d+ tokens; a DynamicCache in float32 holds [\d.]+ MiB: [\d.]+x smaller"
    assert re.search(memory, policy_part)
    assert re.search(r"against the DynamicCache answer: the first \d+ of \d+ tokens identical, ROUGE-L", reference_part)
    assert "the answer loops" not in reference_part
