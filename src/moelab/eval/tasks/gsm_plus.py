"""GSM-Plus (testmini), lm-eval 0.4.13 ``gsm_plus_mini.yaml`` protocol on a local file.

File: ``{data_dir}/gsm_plus/testmini.jsonl`` with fields ``question``, ``solution`` (ending in
``#### <answer>``), ``answer``, ``perturbation_type`` (plus seed_* fields, unused). With
``source="hf"``: lm-eval's ``qintongli/GSM-Plus``, split ``testmini`` (same fields).

Protocol as lm-eval: prompt ``"Question: {question}\\nAnswer:"``, target ``{solution}``; the few-shot
pool is testmini itself (``fewshot_split == test_split``), so lm-eval draws ``n + 1`` docs with
``random.Random(1234)`` and drops the evaluated one; generation and the two filters as GSM8K.

Critical-thinking items (``perturbation_type == "critical thinking"``, gold answer ``"None"``: the
question lacks information) cannot be matched by lm-eval's numeric filters, so they would count as
wrong whatever the model says. moelab therefore:

* excludes them from ``exact_match,strict-match`` / ``exact_match,flexible-extract`` (the main
  accuracy, over the seven numeric perturbation types, with per-type ``.../<perturbation_type>``);
* reports them as ``critical_thinking_none``: 1 when the response states ``#### None`` (the format of
  the gold solutions; case-insensitive), else 0;
* keeps lm-eval's own number over all items as ``lm_eval_exact_match,<filter>`` for comparison.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..metrics import GSM8K_STOP, INVALID, gsm8k_score, normalize_gsm8k, strict_match
from .base import GROUP_KEY, Doc, GenerationTask
from .files import LOCAL, HubDataset, check_source, first, read_split, resolve_data_dir
from .fewshot import LM_EVAL_FEWSHOT_SEED

GSM_PLUS_FIELDS = ("question", "solution", "answer", "perturbation_type")
#: The Hugging Face dataset lm-eval's ``gsm_plus_mini.yaml`` reads (``source="hf"``).
GSM_PLUS_HUB = HubDataset("qintongli/GSM-Plus")
CRITICAL_THINKING = "critical thinking"
_SAYS_NONE = re.compile(r"####\s*none\b", re.IGNORECASE)


def is_critical_thinking(doc: Doc) -> bool:
    """True for the unanswerable items whose gold answer is ``"None"``."""
    return doc["perturbation_type"] == CRITICAL_THINKING or str(doc["answer"]).strip() == "None"


class GsmPlusTask(GenerationTask):
    """GSM-Plus testmini with per-perturbation accuracy and a separate critical-thinking score."""

    name = "gsm_plus"
    default_num_fewshot = 5
    fewshot_excludes_eval_doc = True
    stop = GSM8K_STOP

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        num_fewshot: int | None = None,
        fewshot_seed: int = LM_EVAL_FEWSHOT_SEED,
        max_new_tokens: int = 256,
        source: str = LOCAL,
    ) -> None:
        super().__init__(num_fewshot=num_fewshot, fewshot_seed=fewshot_seed, max_new_tokens=max_new_tokens)
        self.source = check_source(source, data_dir=data_dir)
        self.path: Path = resolve_data_dir(data_dir) / "gsm_plus" / "testmini.jsonl"

    def load_docs(self, limit: int | None = None) -> list[Doc]:
        return first(self.fewshot_docs(), limit)

    def load_fewshot_docs(self) -> list[Doc]:
        return read_split(self.source, self.path, GSM_PLUS_HUB, "testmini", GSM_PLUS_FIELDS)

    def doc_to_text(self, doc: Doc) -> str:
        return f"Question: {doc['question']}\nAnswer:"

    def doc_to_target(self, doc: Doc) -> str:
        return str(doc["solution"])

    def score_response(self, doc: Doc, response: str) -> dict[str, Any]:
        lm_eval_scores = gsm8k_score(response, self.doc_to_target(doc))
        scores: dict[str, Any] = {GROUP_KEY: doc["perturbation_type"]}
        scores.update({f"lm_eval_{key}": value for key, value in lm_eval_scores.items()})
        if is_critical_thinking(doc):
            scores["critical_thinking_none"] = 1.0 if _SAYS_NONE.search(response) else 0.0
        else:
            scores.update(lm_eval_scores)
        return scores

    def vote_response(self, doc: Doc, response: str) -> str | None:
        """Strict-match answer normalised as exact_match does; ``"none"`` for ``#### None``; else ``None``."""
        extracted = strict_match(response)
        if extracted != INVALID:
            return normalize_gsm8k(extracted)
        return "none" if _SAYS_NONE.search(response) else None

    def gold_answer(self, doc: Doc) -> str:
        return normalize_gsm8k(self.doc_to_target(doc))
