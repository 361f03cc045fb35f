"""Evaluation metrics as pure functions: pass@k, maj@k, task loss, and lm-eval 0.4 answer scoring.

Conventions
-----------
* Every function here is pure: same inputs, same output (the random parts of :func:`maj_at_k` take
  an explicit ``seed``).
* Answer extraction, normalisation and stop-string truncation copy lm-eval 0.4.13 exactly:
  ``lm_eval/filters/extraction.py`` (``RegexFilter``, ``WhitespaceFilter``),
  ``lm_eval/filters/selection.py`` (``TakeFirstFilter``), ``lm_eval/api/metrics.py``
  (``exact_match_hf_evaluate``) and ``lm_eval/models/utils.py`` (``postprocess_generated_text``).
  The tests compare the verdicts against lm-eval's own classes.
* Model output is only ever parsed with regular expressions, never evaluated.
* Losses are natural-log negative log-likelihoods (nats) summed over the answer tokens.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from typing import Iterable, Sequence

from ..errors import ConfigError

# --------------------------------------------------------------------------------------------------
# pass@k and maj@k
# --------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021): ``1 - C(n-c, k) / C(n, k)``.

    ``n`` samples were drawn, ``c`` of them are correct; the result is the probability that a random
    size-``k`` subset holds at least one correct sample. Computed in the numerically stable product
    form ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``; exactly 1.0 when ``n - c < k``.
    Raises :class:`ConfigError` when ``k > n`` or the counts are impossible.
    """
    if n < 1 or k < 1:
        raise ConfigError(f"pass@k needs n >= 1 and k >= 1, got n={n}, k={k}; draw at least one sample")
    if not 0 <= c <= n:
        raise ConfigError(f"pass@k needs 0 <= c <= n, got c={c}, n={n}; count correct samples among the n")
    if k > n:
        raise ConfigError(f"pass@k with k={k} > n={n} samples is undefined; draw at least k samples per problem")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def _majority_score(votes: Iterable[str | None], correct: str) -> float:
    """Expected correctness of a majority vote with uniform random tie-breaking.

    ``None`` (no extractable answer) does not vote; with no valid vote the score is 0. When several
    answers tie for the most votes the winner is drawn uniformly among them, so the expected score is
    ``1 / #tied`` if the correct answer is among the tied ones, else 0.
    """
    counts = Counter(v for v in votes if v is not None)
    if not counts:
        return 0.0
    top = max(counts.values())
    tied = [answer for answer, count in counts.items() if count == top]
    return (1.0 / len(tied)) if correct in tied else 0.0


def maj_at_k(
    answers: Sequence[str | None],
    correct: str,
    k: int,
    n_subsets: int = 1000,
    seed: int = 0,
) -> float:
    """maj@k: accuracy of a majority vote over ``k`` of the ``n = len(answers)`` samples.

    The vote is scored on size-``k`` subsets of the samples and averaged. When ``C(n, k) <= n_subsets``
    every subset is enumerated (exact); otherwise ``n_subsets`` subsets are drawn uniformly with
    ``random.Random(seed)``. Within a subset: ``None`` answers (invalid, nothing extracted) do not vote;
    a subset without any valid answer scores 0; a tie for the most votes is broken uniformly at random,
    counted as its expectation (fraction of tied answers that are ``correct``), so the result is
    deterministic. ``answers`` and ``correct`` must already be normalised (compared with ``==``).
    """
    n = len(answers)
    if k < 1 or k > n:
        raise ConfigError(f"maj@k needs 1 <= k <= n, got k={k}, n={n}; draw at least k samples per problem")
    if n_subsets < 1:
        raise ConfigError(f"maj@k needs n_subsets >= 1, got {n_subsets}")
    if math.comb(n, k) <= n_subsets:
        subsets: Iterable[Sequence[int]] = combinations(range(n), k)
    else:
        rng = random.Random(seed)
        subsets = [rng.sample(range(n), k) for _ in range(n_subsets)]
    total = 0.0
    count = 0
    for subset in subsets:
        total += _majority_score((answers[i] for i in subset), correct)
        count += 1
    return total / count


def default_ks(n: int) -> list[int]:
    """Powers of two up to ``n``, plus ``n`` itself: ``[1, 2, 4, ..., n]``."""
    ks = [1]
    while ks[-1] * 2 <= n:
        ks.append(ks[-1] * 2)
    if ks[-1] != n:
        ks.append(n)
    return ks


def test_time_curve(
    samples_per_problem: Sequence[tuple[Sequence[str | None], str]],
    ks: Sequence[int] | None = None,
    n_subsets: int = 1000,
    seed: int = 0,
) -> list[dict[str, float]]:
    """pass@k and maj@k as a function of k, averaged over problems.

    ``samples_per_problem`` holds, per problem, ``(answers, correct)``: the normalised extracted
    answers of its n samples (``None`` = invalid) and the normalised gold answer. A sample is correct
    for pass@k when ``answer == correct``. ``ks`` defaults to ``1, 2, 4, ..., n`` with ``n`` the smallest
    sample count over problems. Returns ``[{"k": k, "pass_at_k": ..., "maj_at_k": ...}, ...]``.
    """
    if not samples_per_problem:
        raise ConfigError("test_time_curve got no problems; pass at least one (answers, correct) pair")
    n_min = min(len(answers) for answers, _ in samples_per_problem)
    ks = list(ks) if ks is not None else default_ks(n_min)
    curve = []
    for k in ks:
        passes = []
        majs = []
        for answers, correct in samples_per_problem:
            n_correct = sum(1 for a in answers if a is not None and a == correct)
            passes.append(pass_at_k(len(answers), n_correct, k))
            majs.append(maj_at_k(answers, correct, k, n_subsets=n_subsets, seed=seed))
        curve.append(
            {"k": k, "pass_at_k": sum(passes) / len(passes), "maj_at_k": sum(majs) / len(majs)}
        )
    return curve


# --------------------------------------------------------------------------------------------------
# Task loss
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskLoss:
    """Answer-only cross-entropy in three units."""

    nats_per_token: float
    bits_per_token: float
    bits_per_byte: float


def task_loss(nll_nats: float, n_tokens: int, n_bytes: int) -> TaskLoss:
    """Convert a summed answer-token NLL (nats) into nats/token, bits/token and bits/byte.

    ``n_tokens`` counts the scored answer tokens, ``n_bytes`` the UTF-8 bytes of the answer text;
    bits/byte is tokenizer-independent (``nll / ln 2 / n_bytes``), as lm-eval's ``bits_per_byte``.
    Sum ``nll_nats``, ``n_tokens`` and ``n_bytes`` over a dataset before calling for a
    token-weighted dataset number.
    """
    if n_tokens < 1 or n_bytes < 1:
        raise ConfigError(
            f"task loss needs at least one answer token and byte, got {n_tokens} tokens, {n_bytes} bytes; "
            "check that the answer text is not empty"
        )
    bits = nll_nats / math.log(2)
    return TaskLoss(
        nats_per_token=nll_nats / n_tokens,
        bits_per_token=bits / n_tokens,
        bits_per_byte=bits / n_bytes,
    )


# --------------------------------------------------------------------------------------------------
# lm-eval 0.4 generation post-processing, extraction and exact match
# --------------------------------------------------------------------------------------------------

#: Fallback emitted by lm-eval's ``RegexFilter`` when nothing matches.
INVALID = "[invalid]"

#: gsm8k.yaml / gsm_plus.yaml ``strict-match`` filter pattern.
STRICT_MATCH_PATTERN = r"#### (\-?[0-9\.\,]+)"
#: gsm8k.yaml / gsm_plus.yaml ``flexible-extract`` filter pattern (used with ``group_select: -1``).
FLEXIBLE_EXTRACT_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
#: gsm8k.yaml / gsm_plus.yaml ``exact_match`` ``regexes_to_ignore``.
GSM8K_REGEXES_TO_IGNORE = (",", r"\$", "(?s).*#### ", r"\.$")
#: gsm8k.yaml / gsm_plus.yaml ``generation_kwargs.until``.
GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")
#: triviaqa default.yaml ``generation_kwargs.until``.
TRIVIAQA_STOP = ("\n", ".", ",")
#: lm-eval's default ``max_gen_toks`` when a task YAML does not set it.
LM_EVAL_MAX_GEN_TOKS = 256


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut ``text`` at the first occurrence of any stop string (the stop string itself is dropped).

    Exactly lm-eval's ``postprocess_generated_text``: ``text = text.split(term)[0]`` for each non-empty
    term in order. This equals cutting at the earliest occurrence of any stop string, except when an
    occurrence of a later term straddles the cut made by an earlier one (``"xaby"`` with
    ``("b", "ab")`` gives ``"xa"``); lm-eval's result is kept.
    """
    for term in stop:
        if term:
            text = text.split(term)[0]
    return text


def regex_extract(
    response: str, pattern: str, group_select: int = 0, fallback: str = INVALID
) -> str:
    """lm-eval ``RegexFilter`` on one response.

    ``re.findall``; pick match ``group_select`` (negative counts from the end); for patterns with
    several groups take the first non-empty group; strip whitespace; ``fallback`` when nothing
    matches (or the selected match has only empty groups). Non-string responses count as ``""``.
    """
    if not isinstance(response, str):
        response = ""
    matches = re.findall(pattern, response)
    if not matches:
        return fallback
    match = matches[group_select]
    if isinstance(match, tuple):
        groups = [m for m in match if m]
        if not groups:
            return fallback
        match = groups[0]
    return match.strip()


def take_first(responses: Sequence[str]) -> str:
    """lm-eval ``take_first`` filter: keep the first of a document's responses."""
    return responses[0]


def strict_match(response: str) -> str:
    """gsm8k ``strict-match`` pipeline: the number after ``#### `` or ``[invalid]``."""
    return regex_extract(response, STRICT_MATCH_PATTERN, group_select=0)


def flexible_extract(response: str) -> str:
    """gsm8k ``flexible-extract`` pipeline: the last number-like span in the response or ``[invalid]``."""
    return regex_extract(response, FLEXIBLE_EXTRACT_PATTERN, group_select=-1)


#: gsm8k filter names (as in the YAML ``filter_list``) → single-response extractor.
GSM8K_FILTERS = {"strict-match": strict_match, "flexible-extract": flexible_extract}


def normalize_for_exact_match(
    text: str,
    regexes_to_ignore: Sequence[str] = (),
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
    ignore_numbers: bool = False,
) -> str:
    """The string transformation of lm-eval's ``exact_match_hf_evaluate``, for one string.

    In order: delete every regex of ``regexes_to_ignore`` (``re.sub(r, "", s)``, one after the other);
    lowercase; delete ``string.punctuation`` characters; delete digits.
    """
    for pattern in regexes_to_ignore:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    if ignore_numbers:
        text = text.translate(str.maketrans("", "", string.digits))
    return text


def exact_match(
    prediction: str,
    reference: str,
    regexes_to_ignore: Sequence[str] = (),
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
    ignore_numbers: bool = False,
) -> float:
    """lm-eval ``exact_match`` for one (prediction, reference) pair: 1.0 if equal after normalising both."""
    options = dict(
        regexes_to_ignore=regexes_to_ignore,
        ignore_case=ignore_case,
        ignore_punctuation=ignore_punctuation,
        ignore_numbers=ignore_numbers,
    )
    same = normalize_for_exact_match(prediction, **options) == normalize_for_exact_match(reference, **options)
    return 1.0 if same else 0.0


def normalize_gsm8k(text: str) -> str:
    """gsm8k.yaml exact_match normalisation: drop ``,``, ``$``, everything up to ``#### ``, a final ``.``; lowercase."""
    return normalize_for_exact_match(text, GSM8K_REGEXES_TO_IGNORE, ignore_case=True)


def gsm8k_exact_match(prediction: str, reference: str) -> float:
    """gsm8k.yaml ``exact_match`` (ignore_case, no punctuation removal, its ``regexes_to_ignore``)."""
    return 1.0 if normalize_gsm8k(prediction) == normalize_gsm8k(reference) else 0.0


def gsm8k_score(response: str, reference: str) -> dict[str, float]:
    """Both gsm8k filter pipelines on a (stop-truncated) response, keyed as lm-eval reports them.

    ``reference`` is the doc target (full solution ending in ``#### <answer>``). Returns
    ``{"exact_match,strict-match": 0/1, "exact_match,flexible-extract": 0/1}``.
    """
    return {
        f"exact_match,{name}": gsm8k_exact_match(extract(response), reference)
        for name, extract in GSM8K_FILTERS.items()
    }


def triviaqa_normalize(text: str) -> str:
    """triviaqa default.yaml exact_match normalisation: lowercase, delete ``string.punctuation``."""
    return normalize_for_exact_match(text, ignore_case=True, ignore_punctuation=True)


def triviaqa_exact_match(response: str, aliases: Sequence[str]) -> float:
    """triviaqa default.yaml scoring of a (stop-truncated) response against the gold aliases.

    The ``remove_whitespace`` filter strips the response, then exact match (ignore_case,
    ignore_punctuation) against every alias; 1.0 if any alias matches.
    """
    prediction = triviaqa_normalize(response.strip())
    return 1.0 if any(prediction == triviaqa_normalize(alias) for alias in aliases) else 0.0


# ``test_time_curve`` is a metric, not a pytest test; keep pytest from collecting it when imported.
test_time_curve.__test__ = False  # type: ignore[attr-defined]
