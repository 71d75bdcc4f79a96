"""How closely one greedy generation follows another, token by token.

Used wherever two runs of the same prompt should agree (a padded batch against each prompt
alone, tensor-parallel ranks against one process): the tokens are compared up to the first
difference, and while they agree the logits' drift is measured in standard deviations of
the reference logits. At the first different token, the reference's top-two margin says
whether that was a near tie (a rounding difference can flip it) or a real change.
"""

from __future__ import annotations

import attrs
import torch


@attrs.frozen
class GreedyAgreement:
    """One row's comparison against its reference."""

    #: steps with the same token before the first difference
    agreed: int
    #: steps compared (the reference's length)
    compared: int
    #: the largest ``max |logits - reference| / std(reference)`` over the agreeing steps
    drift: float
    #: the largest ``max |logits - reference|`` over the agreeing steps
    max_logit_diff: float
    #: ``(top1 - top2) / std`` of the reference logits at the first different token, or None
    divergence_margin: float | None

    @property
    def identical(self) -> bool:
        return self.agreed == self.compared


def greedy_agreement(
    tokens: torch.Tensor, logits: torch.Tensor, reference_tokens: torch.Tensor, reference_logits: torch.Tensor
) -> GreedyAgreement:
    """Compare one row: ``tokens``/``reference_tokens`` ``[n]`` new tokens, ``*logits`` ``[n, vocab]``."""
    agreed, drift, worst = 0, 0.0, 0.0
    margin = None
    for step in range(len(reference_tokens)):
        reference = reference_logits[step].float()
        spread = float(reference.std())
        if int(tokens[step]) != int(reference_tokens[step]):
            top = reference.topk(2).values
            margin = float(top[0] - top[1]) / spread
            break
        diff = float((logits[step].float() - reference).abs().max())
        worst = max(worst, diff)
        drift = max(drift, diff / spread)
        agreed += 1
    return GreedyAgreement(agreed, len(reference_tokens), drift, worst, margin)
