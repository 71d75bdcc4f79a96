"""Offline accuracy evaluation: how far a policy's cache moves a model from its 16-bit self.

* :mod:`~kvpolicy.evaluation.contenders`: what is compared (kvpolicy policies, transformers'
  ``QuantizedCache``), at a matched full-precision budget (:mod:`~kvpolicy.evaluation.matching`).
* :mod:`~kvpolicy.evaluation.decoding`: one shared prefill per sample, then step-by-step decoding.
* tasks: :mod:`~kvpolicy.evaluation.fidelity`, :mod:`~kvpolicy.evaluation.passkey`,
  :mod:`~kvpolicy.evaluation.code_completion`, :mod:`~kvpolicy.evaluation.humaneval`.
* :mod:`~kvpolicy.evaluation.runner` runs them and :mod:`~kvpolicy.evaluation.report` writes
  markdown, JSON and plots.
"""

from kvpolicy.evaluation.contenders import Contender, resolve_contenders
from kvpolicy.evaluation.matching import at_budget
from kvpolicy.evaluation.runner import TASKS, EvaluationResult, evaluate

__all__ = ["TASKS", "Contender", "EvaluationResult", "at_budget", "evaluate", "resolve_contenders"]
