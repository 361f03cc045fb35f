"""Evaluation: generation, tasks, metrics, task loss, test-time compute, lm-eval adapter.

Public API::

    from moelab.eval import evaluate, generate, loglikelihood
    report = evaluate(model, tokenizer, tasks=["gsm8k"], limit=50)   # the dict moelab eval writes

Modules: ``generate`` (batched KV-cache decoding), ``loglikelihood`` (lm-eval tokenisation),
``runner`` (``evaluate``), ``metrics`` (pass@k, maj@k, extraction, task loss), ``tasks`` (the task
registry), ``lm_eval`` (import it to register the ``moelab`` model with lm-evaluation-harness).
"""

from .generate import generate
from .loglikelihood import loglikelihood
from .runner import evaluate

__all__ = ["evaluate", "generate", "loglikelihood"]
