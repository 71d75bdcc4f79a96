"""Offline accuracy evaluation: how far a policy's cache moves a model from its 16-bit self.

* :mod:`~kvpolicy.evaluation.contenders`: what is compared (kvpolicy policies, transformers'
  ``QuantizedCache``), at a matched full-precision budget (:mod:`~kvpolicy.evaluation.matching`).
* :mod:`~kvpolicy.evaluation.decoding`: one shared prefill per sample, then step-by-step decoding.
* the generation tasks, free greedy generation scored 0-100 against the 16-bit cache on the
  same samples (:mod:`~kvpolicy.evaluation.generation_task`, one 16-bit prefill per batch
  handed to every contender's own ``generate()``: :mod:`~kvpolicy.evaluation.shared_prefill`):
  :mod:`~kvpolicy.evaluation.code_completion`, :mod:`~kvpolicy.evaluation.document_qa`,
  :mod:`~kvpolicy.evaluation.summarization`, :mod:`~kvpolicy.evaluation.humaneval`,
  :mod:`~kvpolicy.evaluation.program_trace`; scores in :mod:`~kvpolicy.evaluation.scoring`.
* teacher-forced proxies: :mod:`~kvpolicy.evaluation.fidelity` (KL), :mod:`~kvpolicy.evaluation.passkey`.
* :mod:`~kvpolicy.evaluation.runner` runs them and :mod:`~kvpolicy.evaluation.report` writes
  markdown, JSON and plots.
"""

from kvpolicy.evaluation.contenders import Contender, resolve_contenders
from kvpolicy.evaluation.matching import at_budget
from kvpolicy.evaluation.runner import GENERATION_TASKS, TASKS, EvaluationResult, evaluate

__all__ = ["GENERATION_TASKS", "TASKS", "Contender", "EvaluationResult", "at_budget", "evaluate", "resolve_contenders"]
