"""Few-shot example sampling, identical to lm-eval 0.4.13's ``ContextSampler.sample``.

lm-eval keeps ONE ``random.Random(fewshot_seed)`` per task (seed 1234 by default) and consumes it
document after document, in evaluation order; so the shots of document i depend on the draws made
for documents 0..i-1. :meth:`moelab.eval.tasks.base.Task.prompts` reproduces that by threading one
``Random`` through all documents.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from ...errors import ConfigError

#: lm-eval's default ``fewshot_random_seed`` (``simple_evaluate``).
LM_EVAL_FEWSHOT_SEED = 1234


def sample_fewshot(
    pool: Sequence[dict[str, Any]],
    n: int,
    rnd: random.Random,
    eval_doc: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Draw ``n`` few-shot docs from ``pool`` with ``rnd``, exactly as lm-eval does.

    Without ``eval_doc``: ``rnd.sample(pool, n)``. With ``eval_doc`` (lm-eval passes it when the
    few-shot split is the evaluation split, and for tasks without a test split): draw ``n + 1``, drop
    every doc equal to ``eval_doc``, keep the first ``n``; if duplicates of ``eval_doc`` left fewer than
    ``n``, redraw ``n`` from the pool without any copy of it. ``n == 0`` consumes no randomness.
    """
    if n < 0:
        raise ConfigError(f"number of few-shot examples must be >= 0, got {n}")
    if n == 0:
        return []
    pool = list(pool)
    need = n + 1 if eval_doc else n
    if len(pool) < need:
        raise ConfigError(
            f"{n} few-shot examples need a pool of at least {need} documents, got {len(pool)}; "
            "lower num_fewshot or provide a larger few-shot file"
        )
    if not eval_doc:
        return rnd.sample(pool, n)
    shots = [x for x in rnd.sample(pool, n + 1) if x != eval_doc][:n]
    if len(shots) < n:
        shots = rnd.sample([x for x in pool if x != eval_doc], n)
    return shots
