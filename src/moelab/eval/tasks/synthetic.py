"""Tasks over the synthetic memorization and reasoning test sets (docs passed in, no files).

The docs come from ``moelab.data.synthetic`` (``memorization_test_set(cfg)`` /
``reasoning_test_set(cfg)``) and are handed to the constructor as ``docs=``, so this module does not
import the data package. Each doc is a dict with ``prompt`` (ending in ``"Answer:"``) and ``answer``;
reasoning docs may add ``difficulty`` and a ``solution`` whose last line is ``#### <answer>`` (an
``answer`` containing ``#### `` is read the same way).

Conventions: the gold continuation is ``" " + target.lstrip()`` (target = ``solution`` if present,
else ``answer``), as lm-eval's ``target_delimiter``. Few-shot examples (default 0) come from the same
docs, excluding the evaluated one (``n + 1`` drawn, as lm-eval does for a same-split pool).

* ``synthetic-memorization``: stop at ``"\\n"``; ``exact_match`` = first line of the output, stripped,
  equals ``answer`` stripped (case- and punctuation-sensitive: memorised facts are exact strings).
* ``synthetic-reasoning``: stop at ``"Question:"`` and ``"\\n\\n"``; ``exact_match`` = the GSM8K
  ``strict-match`` extraction (``#### <number>``) equals the gold number after GSM8K normalisation;
  also reported per ``difficulty`` as ``exact_match/difficulty=<d>``.
"""

from __future__ import annotations

from typing import Any, Sequence

from ...errors import DataError
from ..metrics import INVALID, gsm8k_exact_match, normalize_gsm8k, strict_match
from .base import GROUP_KEY, Doc, GenerationTask
from .files import first
from .fewshot import LM_EVAL_FEWSHOT_SEED


class _SyntheticTask(GenerationTask):
    """Shared plumbing: validated in-memory docs, prompt = ``doc["prompt"]``."""

    default_num_fewshot = 0
    fewshot_excludes_eval_doc = True
    default_max_new_tokens = 64

    def __init__(
        self,
        docs: Sequence[Doc],
        num_fewshot: int | None = None,
        fewshot_seed: int = LM_EVAL_FEWSHOT_SEED,
        max_new_tokens: int | None = None,
    ) -> None:
        super().__init__(
            num_fewshot=num_fewshot,
            fewshot_seed=fewshot_seed,
            max_new_tokens=self.default_max_new_tokens if max_new_tokens is None else max_new_tokens,
        )
        docs = list(docs)
        if not docs:
            raise DataError(f"{self.name}: the test set is empty; generate it with a non-zero size")
        for i, doc in enumerate(docs):
            if not isinstance(doc, dict) or not isinstance(doc.get("prompt"), str) or "answer" not in doc:
                raise DataError(
                    f"{self.name}: doc {i} needs a string 'prompt' and an 'answer'; "
                    "pass the dicts produced by moelab.data.synthetic"
                )
        self.docs = docs

    def load_docs(self, limit: int | None = None) -> list[Doc]:
        return first(self.docs, limit)

    def load_fewshot_docs(self) -> list[Doc]:
        return self.docs

    def doc_to_text(self, doc: Doc) -> str:
        return doc["prompt"]

    def doc_to_target(self, doc: Doc) -> str:
        return str(doc.get("solution", doc["answer"])).lstrip()


class SyntheticMemorizationTask(_SyntheticTask):
    """Recall of memorised facts: first output line must equal the answer."""

    name = "synthetic-memorization"
    stop = ("\n",)

    def score_response(self, doc: Doc, response: str) -> dict[str, Any]:
        return {"exact_match": 1.0 if self.vote_response(doc, response) == self.gold_answer(doc) else 0.0}

    def vote_response(self, doc: Doc, response: str) -> str | None:
        answer = response.split("\n")[0].strip()
        return answer or None

    def gold_answer(self, doc: Doc) -> str:
        return str(doc["answer"]).strip()


def _gold_number(doc: Doc) -> str:
    """The gold final answer: after ``#### `` in ``answer`` (or ``solution``), else ``answer`` itself."""
    answer = str(doc["answer"])
    if "#### " in answer:
        return strict_match(answer)
    if "solution" in doc and "#### " in str(doc["solution"]) and not answer.strip():
        return strict_match(str(doc["solution"]))
    return answer.strip()


class SyntheticReasoningTask(_SyntheticTask):
    """Multi-step arithmetic: strict ``#### <n>`` answer must equal the gold number."""

    name = "synthetic-reasoning"
    stop = ("Question:", "\n\n")
    default_max_new_tokens = 256

    def score_response(self, doc: Doc, response: str) -> dict[str, Any]:
        scores: dict[str, Any] = {"exact_match": gsm8k_exact_match(strict_match(response), _gold_number(doc))}
        if "difficulty" in doc:
            scores[GROUP_KEY] = f"difficulty={doc['difficulty']}"
        return scores

    def vote_response(self, doc: Doc, response: str) -> str | None:
        extracted = strict_match(response)
        return None if extracted == INVALID else normalize_gsm8k(extracted)

    def gold_answer(self, doc: Doc) -> str:
        return normalize_gsm8k(_gold_number(doc))
