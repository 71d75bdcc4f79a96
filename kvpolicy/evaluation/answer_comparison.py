"""A policy's answer next to the 16-bit cache's answer to the same prompt: what ``kvpolicy generate`` shows.

:func:`answer` runs ``model.generate()`` greedily with a cache (streaming the text if asked)
and keeps the logits of every step. :func:`compare_answers` puts the two answers side by
side:

* ``agreed``: the tokens identical to the 16-bit answer before the first difference;
* ``rouge_l``: ROUGE-L F1 (0-100) of the policy's text against the 16-bit text;
* along the policy's own answer, what the 16-bit cache would have predicted at each step
  (one teacher-forced forward of the answer on the 16-bit cache of the prompt):
  ``same_top1`` steps where it picks the policy's token, and ``mean_kl``, the mean KL
  divergence (nats) of the policy's next-token distribution from the 16-bit one;
* ``loop``: why the policy's text repeats itself, when it does (:func:`~kvpolicy.evaluation.scoring.looping`).
"""

from __future__ import annotations

import attrs
import torch
from transformers.cache_utils import Cache, DynamicCache

from kvpolicy.evaluation.scoring import looping, rouge_l
from kvpolicy.generation import cache_kwargs, forward_cache_kwargs


@attrs.frozen
class Answer:
    """``tokens`` ``[n]`` generated after the prompt and the float32 ``logits`` ``[n, V]`` that chose them."""

    tokens: list[int]
    logits: torch.Tensor
    text: str


@torch.no_grad()
def answer(
    model, tokenizer, inputs: dict, cache: Cache, max_new_tokens: int, streamer=None, temperature: float = 0.0
) -> Answer:
    """``model.generate()`` of ``inputs`` (one row) on ``cache``, greedy unless ``temperature`` > 0,
    with each step's logits."""
    out = model.generate(
        **inputs,
        **cache_kwargs(cache),
        streamer=streamer,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=None,
        top_k=None,
        return_dict_in_generate=True,
        output_logits=True,
    )
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    logits = torch.stack([step[0].float() for step in out.logits])
    return Answer(tokens, logits, tokenizer.decode(tokens, skip_special_tokens=True))


@attrs.frozen
class AnswerComparison:
    """How a policy's answer compares with the 16-bit cache's (see the module docstring)."""

    agreed: int
    reference_tokens: int
    rouge_l: float
    same_top1: int
    steps: int
    mean_kl: float
    loop: str | None

    def summary(self) -> str:
        line = (
            f"against the DynamicCache answer: the first {self.agreed} of {self.reference_tokens} tokens identical, "
            f"ROUGE-L {self.rouge_l:.1f}/100; along the policy's answer DynamicCache picks the same next token at "
            f"{self.same_top1} of {self.steps} steps (mean KL {self.mean_kl:.3f} nats)"
        )
        if self.loop:
            line += f"; the answer loops: {self.loop}"
        return line


@torch.no_grad()
def compare_answers(
    model, inputs: dict, policy: Answer, reference: Answer, reference_cache: DynamicCache | None = None
) -> AnswerComparison:
    """Compare ``policy``'s answer with the 16-bit ``reference`` answer to the same ``inputs``;
    ``reference_cache``, the ``DynamicCache`` that generated the reference, saves a prefill (it
    is cropped back to the prompt)."""
    agreed = next(
        (i for i, (a, b) in enumerate(zip(policy.tokens, reference.tokens)) if a != b),
        min(len(policy.tokens), len(reference.tokens)),
    )
    steps = len(policy.tokens)
    if steps:
        # the 16-bit cache's next-token logits along the policy's answer: the prompt's last
        # position (the reference's first step), then one forward of the answer but its last token
        sixteen = [reference.logits[:1]]
        if steps > 1:
            prompt = inputs["input_ids"]
            if reference_cache is not None:
                extra = reference_cache.get_seq_length() - prompt.shape[1]
                if extra:
                    reference_cache.crop(-extra)
                tokens = torch.tensor([policy.tokens[:-1]])
            else:
                reference_cache, tokens = DynamicCache(), torch.cat([prompt, torch.tensor([policy.tokens[:-1]])], 1)
            out = model(
                tokens,
                **forward_cache_kwargs(model, reference_cache),
                use_cache=True,
                logits_to_keep=steps - 1,
            )
            sixteen.append(out.logits[0].float())
        sixteen = torch.log_softmax(torch.cat(sixteen), dim=-1)
        mine = torch.log_softmax(policy.logits, dim=-1)
        mean_kl = float((sixteen.exp() * (sixteen - mine)).sum(-1).mean())
        same_top1 = int((sixteen.argmax(-1) == torch.tensor(policy.tokens)).sum())
    else:
        mean_kl, same_top1 = 0.0, 0
    return AnswerComparison(
        agreed=agreed,
        reference_tokens=len(reference.tokens),
        rouge_l=rouge_l(policy.text, reference.text),
        same_top1=same_top1,
        steps=steps,
        mean_kl=mean_kl,
        loop=looping(policy.text),
    )
