"""GSM8K, lm-eval 0.4.13 ``gsm8k.yaml`` protocol on local files.

Files: ``{data_dir}/gsm8k/test.jsonl`` (evaluated) and ``{data_dir}/gsm8k/train.jsonl`` (few-shot
pool), fields ``question`` and ``answer`` (solution ending in ``#### <number>``). With
``source="hf"``: lm-eval's ``openai/gsm8k`` config ``main``, splits ``test`` and ``train`` (same fields).

Protocol: ``doc_to_text = "Question: {question}\\nAnswer:"``, target ``{answer}`` after the default
``target_delimiter`` ``" "``, examples joined by ``"\\n\\n"``; few-shot drawn from train with
``random.Random(1234)`` (no eval-doc removal: the few-shot split is not the test split); greedy,
stop at ``["Question:", "</s>", "<|im_end|>"]``, 256 new tokens; ``strict-match`` and
``flexible-extract`` filters, each followed by ``take_first``, scored with the YAML's ``exact_match``.
lm-eval's YAML default is 5 shots; moelab's default is 4 (the published study).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..metrics import GSM8K_STOP, INVALID, gsm8k_score, normalize_gsm8k, strict_match
from .base import Doc, GenerationTask
from .files import LOCAL, HubDataset, check_source, first, read_split, resolve_data_dir
from .fewshot import LM_EVAL_FEWSHOT_SEED

GSM8K_FIELDS = ("question", "answer")
#: The Hugging Face dataset lm-eval's ``gsm8k.yaml`` reads (``source="hf"``).
GSM8K_HUB = HubDataset("openai/gsm8k", "main")


class Gsm8kTask(GenerationTask):
    """GSM8K test set, scored by strict-match and flexible-extract exact match."""

    name = "gsm8k"
    default_num_fewshot = 4
    fewshot_excludes_eval_doc = False
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
        folder = resolve_data_dir(data_dir) / "gsm8k"
        self.test_path: Path = folder / "test.jsonl"
        self.train_path: Path = folder / "train.jsonl"

    def load_docs(self, limit: int | None = None) -> list[Doc]:
        return first(read_split(self.source, self.test_path, GSM8K_HUB, "test", GSM8K_FIELDS), limit)

    def load_fewshot_docs(self) -> list[Doc]:
        return read_split(self.source, self.train_path, GSM8K_HUB, "train", GSM8K_FIELDS)

    def doc_to_text(self, doc: Doc) -> str:
        return f"Question: {doc['question']}\nAnswer:"

    def doc_to_target(self, doc: Doc) -> str:
        return str(doc["answer"])

    def score_response(self, doc: Doc, response: str) -> dict[str, Any]:
        return gsm8k_score(response, self.doc_to_target(doc))

    def vote_response(self, doc: Doc, response: str) -> str | None:
        """Strict-match answer, normalised as exact_match does; ``None`` when ``[invalid]``."""
        extracted = strict_match(response)
        return None if extracted == INVALID else normalize_gsm8k(extracted)

    def gold_answer(self, doc: Doc) -> str:
        return normalize_gsm8k(self.doc_to_target(doc))
