"""TriviaQA (closed book), lm-eval 0.4.13 ``triviaqa/default.yaml`` protocol on local files.

Files: the evaluated JSONL (default ``{data_dir}/triviaqa/validation.jsonl``) and an optional train
JSONL for few-shot examples (default ``{data_dir}/triviaqa/train.jsonl`` when it exists; otherwise
shots come from the evaluated file). Each record has ``question`` and either the HF ``rc.nocontext``
layout ``answer: {"aliases": [...], "normalized_aliases": [...], ...}`` or ``answers: [...]``. With
``source="hf"``: lm-eval's ``mandarjoshi/trivia_qa`` config ``rc.nocontext``, split ``validation``
evaluated and ``train`` for few-shot examples (records in the HF layout above, read as they are).

Protocol: prompt ``"Question: {question}?\\nAnswer:"`` (lm-eval appends ``?`` even when the question
already ends with one); gold = ``answer.aliases``; a few-shot example shows the first alias. lm-eval
has no test split for this task, so it draws ``n + 1`` shots with ``random.Random(1234)`` and drops
the evaluated doc, whichever file the shots come from. Greedy, stop at ``"\\n"``, ``"."``, ``","``,
256 new tokens. Scoring: strip whitespace (``remove_whitespace`` + ``take_first``), then exact match
against any alias after lowercasing and deleting ``string.punctuation``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..metrics import TRIVIAQA_STOP, triviaqa_exact_match, triviaqa_normalize
from .base import Doc, GenerationTask
from .files import LOCAL, HubDataset, check_source, first, read_split, resolve_data_dir
from .fewshot import LM_EVAL_FEWSHOT_SEED

#: The Hugging Face dataset lm-eval's ``triviaqa/default.yaml`` reads (``source="hf"``).
TRIVIAQA_HUB = HubDataset("mandarjoshi/trivia_qa", "rc.nocontext")


def aliases(doc: Doc) -> list[str]:
    """Gold answer strings: ``answer["aliases"]`` (HF layout) or ``answers``."""
    answer = doc.get("answer")
    if isinstance(answer, dict):
        return [str(a) for a in answer["aliases"]]
    return [str(a) for a in doc["answers"]]


def _check(record: Doc) -> str | None:
    """Why a TriviaQA record is unusable, or ``None``."""
    if "question" not in record:
        return "missing field question"
    answer = record.get("answer")
    if isinstance(answer, dict):
        found = answer.get("aliases")
    else:
        found = record.get("answers")
    if not isinstance(found, list) or not found:
        return 'needs a non-empty answer.aliases list or answers list, e.g. {"answers": ["Paris"]}'
    return None


class TriviaQATask(GenerationTask):
    """Closed-book TriviaQA scored by alias exact match."""

    name = "triviaqa"
    default_num_fewshot = 4
    fewshot_excludes_eval_doc = True
    stop = TRIVIAQA_STOP

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        path: str | os.PathLike | None = None,
        train_path: str | os.PathLike | None = None,
        num_fewshot: int | None = None,
        fewshot_seed: int = LM_EVAL_FEWSHOT_SEED,
        max_new_tokens: int = 256,
        source: str = LOCAL,
    ) -> None:
        super().__init__(num_fewshot=num_fewshot, fewshot_seed=fewshot_seed, max_new_tokens=max_new_tokens)
        self.source = check_source(source, data_dir=data_dir, path=path, train_path=train_path)
        folder = resolve_data_dir(data_dir) / "triviaqa"
        self.path: Path = Path(path) if path is not None else folder / "validation.jsonl"
        if train_path is not None:
            self.train_path: Path | None = Path(train_path)
        else:
            default_train = folder / "train.jsonl"
            self.train_path = default_train if default_train.is_file() else None

    def load_docs(self, limit: int | None = None) -> list[Doc]:
        return first(read_split(self.source, self.path, TRIVIAQA_HUB, "validation", check=_check), limit)

    def load_fewshot_docs(self) -> list[Doc]:
        path = self.train_path if self.train_path is not None else self.path
        return read_split(self.source, path, TRIVIAQA_HUB, "train", check=_check)

    def doc_to_text(self, doc: Doc) -> str:
        return f"Question: {doc['question']}?\nAnswer:"

    def doc_to_target(self, doc: Doc) -> str:
        return aliases(doc)[0]

    def score_response(self, doc: Doc, response: str) -> dict[str, Any]:
        return {"exact_match": triviaqa_exact_match(response, aliases(doc))}

    def vote_response(self, doc: Doc, response: str) -> str | None:
        """The gold answer when the response matches any alias, else the normalised response."""
        if triviaqa_exact_match(response, aliases(doc)):
            return self.gold_answer(doc)
        normalized = triviaqa_normalize(response.strip())
        return normalized or None

    def gold_answer(self, doc: Doc) -> str:
        return triviaqa_normalize(aliases(doc)[0])
