"""pass@k, maj@k, test-time curves, task loss, and lm-eval parity of extraction / exact match."""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path

import pytest

from moelab.errors import ConfigError
from moelab.eval import metrics

# ---- pass@k -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 1, 0.4),
        (10, 3, 2, 1 - 21 / 45),  # 1 - C(7,2)/C(10,2)
        (5, 0, 3, 0.0),  # c = 0
        (5, 5, 1, 1.0),  # c = n
        (4, 2, 3, 1.0),  # n - c < k
        (100, 1, 100, 1.0),
        (200, 7, 16, 1 - math.comb(193, 16) / math.comb(200, 16)),
    ],
)
def test_pass_at_k_closed_form(n, c, k, expected):
    assert metrics.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_brute_force_over_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert metrics.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


@pytest.mark.parametrize("n, c, k", [(3, 1, 4), (0, 0, 1), (3, 4, 1), (3, -1, 1), (3, 1, 0)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ConfigError):
        metrics.pass_at_k(n, c, k)


# ---- maj@k --------------------------------------------------------------------------------------


def test_maj_at_k_hand_made():
    answers = ["1", "1", "2"]
    assert metrics.maj_at_k(answers, "1", 3) == 1.0
    assert metrics.maj_at_k(answers, "1", 1) == pytest.approx(2 / 3)
    # subsets {1,1} -> 1, {1,2} -> tie 1/2, {1,2} -> tie 1/2
    assert metrics.maj_at_k(answers, "1", 2) == pytest.approx(2 / 3)
    assert metrics.maj_at_k(answers, "2", 2) == pytest.approx(1 / 3)
    assert metrics.maj_at_k(answers, "9", 3) == 0.0


def test_maj_at_k_three_way_tie_counts_expected_score():
    assert metrics.maj_at_k(["a", "b", "c"], "b", 3) == pytest.approx(1 / 3)


def test_maj_at_k_invalid_answers_do_not_vote():
    # two invalid answers cannot outvote one valid one
    assert metrics.maj_at_k([None, None, "3"], "3", 3) == 1.0
    # subsets (None, None) -> 0 (no valid vote), (None, 3) -> 1, (None, 3) -> 1
    assert metrics.maj_at_k([None, None, "3"], "3", 2) == pytest.approx(2 / 3)
    assert metrics.maj_at_k([None, None], "3", 2) == 0.0
    # an invalid answer never counts as a wrong majority: ("4", None) -> "4" wins
    assert metrics.maj_at_k(["4", None, "3"], "3", 2) == pytest.approx((0 + 1 + 0.5) / 3)


def test_maj_at_k_sampling_is_seeded_and_close_to_exact():
    answers = ["7"] * 12 + ["8"] * 8 + [None] * 4  # C(24, 9) = 1,307,504 subsets: sampled
    a = metrics.maj_at_k(answers, "7", 9, n_subsets=2000, seed=3)
    assert a == metrics.maj_at_k(answers, "7", 9, n_subsets=2000, seed=3)
    exact = metrics.maj_at_k(answers, "7", 9, n_subsets=math.comb(24, 9))
    assert a == pytest.approx(exact, abs=0.05)
    assert 0.5 < exact < 1.0


def test_maj_at_k_rejects_k_above_n():
    with pytest.raises(ConfigError):
        metrics.maj_at_k(["1", "2"], "1", 3)


def test_test_time_curve_averages_problems():
    problems = [(["1", "1", "2", None], "1"), (["5", "6", "6", "6"], "5")]
    curve = metrics.test_time_curve(problems)
    assert [point["k"] for point in curve] == [1, 2, 4]
    assert curve[0]["pass_at_k"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert curve[0]["maj_at_k"] == pytest.approx((2 / 4 + 1 / 4) / 2)  # maj@1 = accuracy of one sample
    assert curve[-1]["pass_at_k"] == 1.0
    assert curve[-1]["maj_at_k"] == pytest.approx((1.0 + 0.0) / 2)
    assert metrics.default_ks(6) == [1, 2, 4, 6]


# ---- task loss ----------------------------------------------------------------------------------


def test_task_loss_units():
    loss = metrics.task_loss(nll_nats=8 * math.log(2), n_tokens=4, n_bytes=8)
    assert loss.nats_per_token == pytest.approx(2 * math.log(2))
    assert loss.bits_per_token == pytest.approx(2.0)
    assert loss.bits_per_byte == pytest.approx(1.0)
    with pytest.raises(ConfigError):
        metrics.task_loss(1.0, 0, 3)


# ---- lm-eval parity: stop strings, filters, exact_match -------------------------------------------

TRICKY = [
    "#### 1,000",
    "The answer is $5.",
    "#### -3.50",
    "no number",
    "I have 3 apples and 4 pears so 7 total",
    "So she pays 18.",
    "#### 72\n\nQuestion: what is 1+1?\nAnswer: 2",
    " #### 72",
    "####72",
    "#### $1,000.00",
    "costs $1,000.",
    "#### 5\n#### 6",
    "-7",
    "#### .5",
    "1,2,3",
    "",
    "#### 4.",
]
REFERENCES = [
    "blah\n#### 1000",
    "x = 5\n#### 5",
    "#### -3.50",
    "#### 7",
    "#### 18",
    "#### 72",
    "#### 6",
    "#### .5",
    "#### 4",
]


def _lm_eval_gsm8k():
    pytest.importorskip("lm_eval", reason="lm-eval is not installed")
    yaml = pytest.importorskip("yaml")
    import lm_eval
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter
    from lm_eval.filters.selection import TakeFirstFilter

    config = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks/gsm8k/gsm8k.yaml").read_text())
    kwargs = {k: v for k, v in config["metric_list"][0].items() if k not in ("metric", "aggregation", "higher_is_better")}
    pipelines = {}
    for entry in config["filter_list"]:
        regex_step = entry["filter"][0]
        assert [step["function"] for step in entry["filter"]] == ["regex", "take_first"]
        regex = RegexFilter(regex_step["regex_pattern"], group_select=regex_step.get("group_select", 0))
        pipelines[entry["name"]] = lambda resp, regex=regex: list(TakeFirstFilter().apply(regex.apply([[resp]], [{}]), [{}]))[0]
    return config, pipelines, kwargs, exact_match_hf_evaluate


def test_gsm8k_constants_match_yaml():
    config, _, kwargs, _ = _lm_eval_gsm8k()
    assert tuple(kwargs["regexes_to_ignore"]) == metrics.GSM8K_REGEXES_TO_IGNORE
    assert tuple(config["generation_kwargs"]["until"]) == metrics.GSM8K_STOP
    patterns = {e["name"]: e["filter"][0]["regex_pattern"] for e in config["filter_list"]}
    assert patterns == {"strict-match": metrics.STRICT_MATCH_PATTERN, "flexible-extract": metrics.FLEXIBLE_EXTRACT_PATTERN}


@pytest.mark.parametrize("response", TRICKY)
def test_gsm8k_extraction_and_exact_match_match_lm_eval(response):
    config, pipelines, kwargs, exact_match_hf = _lm_eval_gsm8k()
    response = metrics.truncate_at_stop(response, config["generation_kwargs"]["until"])
    ours_extract = {"strict-match": metrics.strict_match, "flexible-extract": metrics.flexible_extract}
    for name, pipeline in pipelines.items():
        extracted = pipeline(response)
        assert ours_extract[name](response) == extracted
        for reference in REFERENCES:
            lm = exact_match_hf(predictions=[extracted], references=[reference], **kwargs)["exact_match"]
            assert metrics.gsm8k_exact_match(extracted, reference) == lm, (response, name, reference)
            assert metrics.gsm8k_score(response, reference)[f"exact_match,{name}"] == lm


def test_gsm8k_expected_verdicts():
    assert metrics.strict_match("#### 1,000") == "1,000"
    assert metrics.gsm8k_score("#### 1,000", "#### 1000") == {"exact_match,strict-match": 1.0, "exact_match,flexible-extract": 1.0}
    assert metrics.strict_match("no number") == metrics.INVALID
    assert metrics.flexible_extract("The answer is $5.") == "$5."
    assert metrics.gsm8k_exact_match("$5.", "#### 5") == 1.0
    assert metrics.flexible_extract("3 apples and 4 pears so 7 total") == "7"


@pytest.mark.parametrize(
    "text, stop",
    [
        ("#### 72\n\nQuestion: next", metrics.GSM8K_STOP),
        ("abc</s>Question:", metrics.GSM8K_STOP),
        ("no stop here", metrics.GSM8K_STOP),
        ("Paris, France.", metrics.TRIVIAQA_STOP),
        ("x<|im_end|>y", metrics.GSM8K_STOP),
        ("xaby", ("b", "ab")),
        ("keep", ("", "z")),
    ],
)
def test_truncate_at_stop_matches_lm_eval(text, stop):
    utils = pytest.importorskip("lm_eval.models.utils", reason="lm-eval is not installed")
    expected = utils.postprocess_generated_text(text, list(stop), None)
    assert metrics.truncate_at_stop(text, stop) == expected


def test_truncate_at_stop_cuts_at_first_occurrence_of_non_overlapping_stops():
    assert metrics.truncate_at_stop("a #### 72\n\nQuestion: b</s>", metrics.GSM8K_STOP) == "a #### 72\n\n"
    assert metrics.truncate_at_stop("Paris, France.", metrics.TRIVIAQA_STOP) == "Paris"
    # lm-eval splits stop by stop, in order: a later stop overlapping an earlier one's cut is missed
    assert metrics.truncate_at_stop("xaby", ("b", "ab")) == "xa"


@pytest.mark.parametrize(
    "response, aliases",
    [
        (" Paris", ["Paris", "paris france"]),
        ("PARIS!", ["Paris"]),
        (" The Beatles", ["Beatles", "The Beatles"]),
        (" U.S.A", ["USA"]),
        (" 1,000", ["1000"]),
        (" Lyon", ["Paris"]),
        ("", ["Paris"]),
        ("  rock-n-roll ", ["rock n roll", "rocknroll"]),
    ],
)
def test_triviaqa_exact_match_matches_lm_eval(response, aliases):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed")
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import WhitespaceFilter

    filtered = list(WhitespaceFilter().apply([[response]], [{}]))[0][0]
    score = exact_match_hf_evaluate(
        predictions=[filtered] * len(aliases), references=aliases, ignore_case=True, ignore_punctuation=True
    )["exact_match"]
    assert metrics.triviaqa_exact_match(response, aliases) == (1.0 if score > 0 else 0.0)
