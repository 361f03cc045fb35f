"""HellaSwag, lm-eval 0.4.13 ``hellaswag.yaml`` + ``hellaswag/utils.py`` protocol on local files.

Files: the evaluated JSONL (default ``{data_dir}/hellaswag/validation.jsonl``) and an optional train
JSONL for few-shot examples (default ``{data_dir}/hellaswag/train.jsonl`` when it exists; otherwise
the evaluated file). Records use the standard fields ``ind``, ``activity_label``, ``ctx_a``,
``ctx_b``, ``ctx``, ``endings`` (4 strings) and ``label`` (index, int or digit string). With
``source="hf"``: lm-eval's ``Rowan/hellaswag`` (no config), split ``validation`` evaluated and
``train`` for few-shot examples (same fields).

Protocol: each doc gains ``query = preprocess(activity_label + ": " + ctx_a + " " +
ctx_b.capitalize())``, ``choices = [preprocess(e) for e in endings]``, ``gold = int(label)``.
Few-shot examples are ``query + " " + choices[gold]``; lm-eval has no test split here, so it draws
``n + 1`` with ``random.Random(1234)`` and drops the evaluated doc. The request scores
``" " + choice`` after the prompt; ``acc`` / ``acc_norm`` (log-likelihood / ``len(choice)``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .base import Doc, MultipleChoiceTask
from .files import LOCAL, HubDataset, check_source, first, read_split, resolve_data_dir
from .fewshot import LM_EVAL_FEWSHOT_SEED

HELLASWAG_FIELDS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")
#: The Hugging Face dataset lm-eval's ``hellaswag.yaml`` reads (``source="hf"``).
HELLASWAG_HUB = HubDataset("Rowan/hellaswag")


def preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleanup: strip, ``" [title]"`` → ``". "``, drop ``[...]``, ``"  "`` → ``" "``."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def process_doc(doc: Doc) -> Doc:
    """The raw record plus lm-eval's ``query``, ``choices`` and ``gold``."""
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        **doc,
        "query": preprocess(doc["activity_label"] + ": " + ctx),
        "choices": [preprocess(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }


def _check(record: Doc) -> str | None:
    """Why a HellaSwag record is unusable, or ``None``."""
    endings = record["endings"]
    if not isinstance(endings, list) or not endings or not all(isinstance(e, str) for e in endings):
        return "endings must be a non-empty list of strings"
    label = record["label"]
    if isinstance(label, bool) or not (isinstance(label, int) or (isinstance(label, str) and label.isdigit())):
        return f"label must be an ending index, got {label!r} (the unlabelled test split cannot be scored)"
    if not 0 <= int(label) < len(endings):
        return f"label {label} is out of range for {len(endings)} endings"
    return None


class HellaSwagTask(MultipleChoiceTask):
    """HellaSwag sentence completion by log-likelihood (acc, acc_norm)."""

    name = "hellaswag"
    default_num_fewshot = 4
    fewshot_excludes_eval_doc = True

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        path: str | os.PathLike | None = None,
        train_path: str | os.PathLike | None = None,
        num_fewshot: int | None = None,
        fewshot_seed: int = LM_EVAL_FEWSHOT_SEED,
        source: str = LOCAL,
    ) -> None:
        super().__init__(num_fewshot=num_fewshot, fewshot_seed=fewshot_seed)
        self.source = check_source(source, data_dir=data_dir, path=path, train_path=train_path)
        folder = resolve_data_dir(data_dir) / "hellaswag"
        self.path: Path = Path(path) if path is not None else folder / "validation.jsonl"
        if train_path is not None:
            self.train_path: Path | None = Path(train_path)
        else:
            default_train = folder / "train.jsonl"
            self.train_path = default_train if default_train.is_file() else None

    def _read(self, path: Path, split: str) -> list[Doc]:
        records = read_split(self.source, path, HELLASWAG_HUB, split, HELLASWAG_FIELDS, check=_check)
        return [process_doc(r) for r in records]

    def load_docs(self, limit: int | None = None) -> list[Doc]:
        return first(self._read(self.path, "validation"), limit)

    def load_fewshot_docs(self) -> list[Doc]:
        return self._read(self.train_path if self.train_path is not None else self.path, "train")

    def doc_to_text(self, doc: Doc) -> str:
        return doc["query"]

    def choices(self, doc: Doc) -> list[str]:
        return list(doc["choices"])

    def gold_index(self, doc: Doc) -> int:
        return int(doc["gold"])
