"""The evaluation task interface: prompts, model requests, per-sample scores, aggregation.

A task turns documents (plain ``dict`` records) into model requests and model outputs into metrics.
It never touches a model. Life of a document::

    task = get_task("gsm8k", data_dir=...)
    docs = task.load_docs(limit=100)
    reqs = task.requests(docs)                    # prompts with lm-eval's few-shot sampling
    outs = [runner(r) for r in reqs]              # generated text, or one log-likelihood per continuation
    per_sample = [task.score(d, o) for d, o in zip(docs, outs)]
    metrics = task.aggregate(per_sample)

Prompt format (lm-eval 0.4, no chat template, no description)::

    text(shot_1) + target_delimiter + target(shot_1) + fewshot_delimiter + ... + text(doc)

with ``target_delimiter = " "`` and ``fewshot_delimiter = "\\n\\n"``. Few-shot docs are drawn with
:func:`~moelab.eval.tasks.fewshot.sample_fewshot`. lm-eval uses ONE ``random.Random(seed)`` for the
whole evaluation set, consumed in document order: :meth:`Task.prompts` / :meth:`Task.requests` do
exactly that; :meth:`Task.fewshot_context` with only a seed starts a fresh generator, which equals
lm-eval's prompt for the first document it would process.

Per-sample score dicts map metric names to floats; the optional key ``"group"`` (a string, e.g. the
GSM-Plus perturbation type) additionally yields per-group means named ``"<metric>/<group>"``.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from ...errors import ConfigError
from ..metrics import LM_EVAL_MAX_GEN_TOKS, truncate_at_stop
from .fewshot import LM_EVAL_FEWSHOT_SEED, sample_fewshot

Doc = dict[str, Any]

#: Per-sample dict key holding the sample's group label (not a metric).
GROUP_KEY = "group"


@dataclass(frozen=True)
class GenerationRequest:
    """Generate greedily from ``prompt`` until a stop string or ``max_new_tokens`` tokens."""

    prompt: str
    stop: tuple[str, ...]
    max_new_tokens: int


@dataclass(frozen=True)
class LoglikelihoodRequest:
    """Score ``log p(continuation | context)`` (summed over the continuation tokens) for each continuation."""

    context: str
    continuations: tuple[str, ...]


Request = GenerationRequest | LoglikelihoodRequest


class Task(ABC):
    """One evaluation protocol. Subclasses define the documents, their text and target, and scoring.

    ``num_fewshot`` defaults to the class's ``default_num_fewshot``; ``fewshot_seed`` to lm-eval's
    1234. ``fewshot_excludes_eval_doc`` mirrors lm-eval: True when the few-shot pool may contain the
    evaluated document (same split, or a task without a test split), in which case ``n + 1`` docs are
    drawn and the evaluated one removed.
    """

    name: ClassVar[str]
    default_num_fewshot: ClassVar[int] = 0
    target_delimiter: ClassVar[str] = " "
    fewshot_delimiter: ClassVar[str] = "\n\n"
    fewshot_excludes_eval_doc: ClassVar[bool] = True

    def __init__(self, num_fewshot: int | None = None, fewshot_seed: int = LM_EVAL_FEWSHOT_SEED) -> None:
        num_fewshot = self.default_num_fewshot if num_fewshot is None else num_fewshot
        if num_fewshot < 0:
            raise ConfigError(f"{self.name}: num_fewshot must be >= 0, got {num_fewshot}")
        self.num_fewshot = num_fewshot
        self.fewshot_seed = fewshot_seed
        self._fewshot_pool: list[Doc] | None = None

    # ---- documents -------------------------------------------------------------------------------

    @abstractmethod
    def load_docs(self, limit: int | None = None) -> list[Doc]:
        """The first ``limit`` evaluation documents (all when ``None``), in file order."""

    @abstractmethod
    def load_fewshot_docs(self) -> list[Doc]:
        """The pool few-shot examples are drawn from, in file order."""

    def fewshot_docs(self) -> list[Doc]:
        """:meth:`load_fewshot_docs`, read once and cached."""
        if self._fewshot_pool is None:
            self._fewshot_pool = self.load_fewshot_docs()
        return self._fewshot_pool

    @abstractmethod
    def doc_to_text(self, doc: Doc) -> str:
        """The question part of a document, ending where the answer starts (e.g. ``"...\\nAnswer:"``)."""

    @abstractmethod
    def doc_to_target(self, doc: Doc) -> str:
        """The gold answer written after ``target_delimiter`` in few-shot examples."""

    def answer_text(self, doc: Doc) -> str:
        """The gold continuation of the prompt, delimiter included, for answer-only task loss."""
        return self.target_delimiter + self.doc_to_target(doc)

    # ---- prompts and requests --------------------------------------------------------------------

    def fewshot_context(
        self,
        doc: Doc,
        n_shots: int | None = None,
        seed: int | None = None,
        *,
        rnd: random.Random | None = None,
    ) -> str:
        """The prompt for ``doc`` with ``n_shots`` examples (default ``num_fewshot``).

        Draws with ``rnd`` when given (advancing it), else with a fresh ``random.Random(seed)``
        (default ``fewshot_seed``).
        """
        n_shots = self.num_fewshot if n_shots is None else n_shots
        if rnd is None:
            rnd = random.Random(self.fewshot_seed if seed is None else seed)
        eval_doc = doc if self.fewshot_excludes_eval_doc else None
        parts = []
        for shot in sample_fewshot(self.fewshot_docs(), n_shots, rnd, eval_doc=eval_doc):
            target = self.doc_to_target(shot)
            if target == "":  # lm-eval writes neither delimiter when the answer is empty
                parts.append(self.doc_to_text(shot))
            else:
                parts.append(self.doc_to_text(shot) + self.target_delimiter + target + self.fewshot_delimiter)
        return "".join(parts) + self.doc_to_text(doc)

    def prompts(self, docs: Sequence[Doc], n_shots: int | None = None, seed: int | None = None) -> list[str]:
        """Prompts for ``docs`` in order, sharing one ``random.Random(seed)`` as lm-eval does."""
        rnd = random.Random(self.fewshot_seed if seed is None else seed)
        return [self.fewshot_context(doc, n_shots, rnd=rnd) for doc in docs]

    @abstractmethod
    def request_for_prompt(self, doc: Doc, prompt: str) -> Request:
        """The model request for ``doc`` given its (few-shot) prompt."""

    def request(self, doc: Doc, *, rnd: random.Random | None = None) -> Request:
        """The model request for one document (few-shot examples drawn as in :meth:`fewshot_context`)."""
        return self.request_for_prompt(doc, self.fewshot_context(doc, rnd=rnd))

    def requests(self, docs: Sequence[Doc]) -> list[Request]:
        """Requests for ``docs`` in order, with lm-eval's shared few-shot generator (see :meth:`prompts`)."""
        return [self.request_for_prompt(doc, p) for doc, p in zip(docs, self.prompts(docs))]

    # ---- scoring ---------------------------------------------------------------------------------

    @abstractmethod
    def score(self, doc: Doc, output: Any) -> dict[str, Any]:
        """Per-sample metrics (floats, plus an optional ``"group"`` label) for one model output."""

    def aggregate(self, per_sample: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Task metrics: each metric's mean over the samples that report it, plus per-group means.

        Also reports ``"n_samples"`` and, per group, ``"n_samples/<group>"``.
        """
        if not per_sample:
            raise ConfigError(f"{self.name}: nothing to aggregate; score at least one document")
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}

        def add(key: str, value: float) -> None:
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1

        group_sizes: dict[str, int] = {}
        for sample in per_sample:
            group = sample.get(GROUP_KEY)
            if group is not None:
                group_sizes[group] = group_sizes.get(group, 0) + 1
            for key, value in sample.items():
                if key == GROUP_KEY:
                    continue
                add(key, value)
                if group is not None:
                    add(f"{key}/{group}", value)
        result = {key: sums[key] / counts[key] for key in sorted(sums)}
        result["n_samples"] = float(len(per_sample))
        for group in sorted(group_sizes):
            result[f"n_samples/{group}"] = float(group_sizes[group])
        return result


class GenerationTask(Task):
    """A task answered by greedy generation, stopped at ``stop`` (lm-eval ``generate_until``).

    ``score`` first cuts the output at the first stop string (idempotent, so raw or already-truncated
    generations score the same). ``vote_answer`` / ``gold_answer`` give the normalised strings used by
    pass@k and maj@k (``None`` = no valid answer).
    """

    stop: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        num_fewshot: int | None = None,
        fewshot_seed: int = LM_EVAL_FEWSHOT_SEED,
        max_new_tokens: int = LM_EVAL_MAX_GEN_TOKS,
    ) -> None:
        super().__init__(num_fewshot=num_fewshot, fewshot_seed=fewshot_seed)
        if max_new_tokens < 1:
            raise ConfigError(f"{self.name}: max_new_tokens must be >= 1, got {max_new_tokens}")
        self.max_new_tokens = max_new_tokens

    def request_for_prompt(self, doc: Doc, prompt: str) -> GenerationRequest:
        return GenerationRequest(prompt=prompt, stop=tuple(self.stop), max_new_tokens=self.max_new_tokens)

    def score(self, doc: Doc, output: str) -> dict[str, Any]:
        return self.score_response(doc, truncate_at_stop(output, self.stop))

    @abstractmethod
    def score_response(self, doc: Doc, response: str) -> dict[str, Any]:
        """Per-sample metrics for a stop-truncated response."""

    def vote_answer(self, doc: Doc, output: str) -> str | None:
        """The normalised answer a generation for ``doc`` votes for in maj@k, ``None`` if it has none."""
        return self.vote_response(doc, truncate_at_stop(output, self.stop))

    @abstractmethod
    def vote_response(self, doc: Doc, response: str) -> str | None:
        """:meth:`vote_answer` of a stop-truncated response."""

    @abstractmethod
    def gold_answer(self, doc: Doc) -> str:
        """The normalised gold answer, comparable with :meth:`vote_answer` by ``==``."""


class MultipleChoiceTask(Task):
    """A task answered by comparing log-likelihoods of choices (lm-eval ``multiple_choice``).

    Continuations are ``target_delimiter + choice``. ``acc`` takes the argmax of the summed
    log-likelihoods; ``acc_norm`` of log-likelihood divided by ``len(choice)`` in characters (the choice
    text without the delimiter, as lm-eval); ties go to the first choice (``numpy.argmax``).
    """

    @abstractmethod
    def choices(self, doc: Doc) -> list[str]:
        """The answer options."""

    @abstractmethod
    def gold_index(self, doc: Doc) -> int:
        """Index of the correct option."""

    def doc_to_target(self, doc: Doc) -> str:
        return self.choices(doc)[self.gold_index(doc)]

    def request_for_prompt(self, doc: Doc, prompt: str) -> LoglikelihoodRequest:
        return LoglikelihoodRequest(
            context=prompt, continuations=tuple(self.target_delimiter + c for c in self.choices(doc))
        )

    def score(self, doc: Doc, output: Sequence[float]) -> dict[str, Any]:
        choices = self.choices(doc)
        if len(output) != len(choices):
            raise ConfigError(
                f"{self.name}: got {len(output)} log-likelihoods for {len(choices)} choices; "
                "return one per continuation of the request"
            )
        if any(len(c) == 0 for c in choices):
            raise ConfigError(f"{self.name}: a choice is empty, acc_norm is undefined; fix the document")
        gold = self.gold_index(doc)
        pred = argmax(output)
        pred_norm = argmax([ll / len(c) for ll, c in zip(output, choices)])
        return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold)}


def argmax(values: Sequence[float]) -> int:
    """Index of the first maximum (``numpy.argmax`` semantics)."""
    best = 0
    for i, value in enumerate(values):
        if value > values[best]:
            best = i
    return best
