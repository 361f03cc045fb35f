"""The quickstart's tiny run (``configs/tiny.yaml``, trained once by the ``trained_tiny_run`` fixture;
slow): it learns, it memorises and reasons far above chance (greedy exact match), its answer-only task
loss is far below an untrained model's, and its evaluation numbers and samples are stable per seed.

Every test of that run lives in this one module: the suite runs on xdist workers with
``--dist loadfile`` (README), so the training (at most 4 000 steps, ~11 minutes on one core) happens
once, on one worker, while the other worker runs the rest of the suite (``tests/conftest.py``
schedules this module first).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import worker_threads
from test_eval_engine_trained import assert_same, eval_json
from test_weight_grad import threads

import moelab
from moelab.data.shards import ShardSet
from moelab.train.config import load_run_config
from moelab.train.loop import train
from moelab.train.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

REPO = Path(__file__).resolve().parents[1]
SLICE_STEPS = 1000  # the fixture checks the scores every this many steps
MEMORIZATION_MIN = 0.5  # exact match; a uniform guess over an attribute's values is right ~3 % of the time
REASONING_MIN_ONE_STEP, REASONING_MIN = 3, 2  # exact match, in multiples of chance (1 / modulus)


def evaluate_run(run: Path, out: Path) -> dict:
    """Greedy scores of the run's newest checkpoint on both synthetic tasks (the tests' protocol)."""
    return eval_json(run, out, "--max-new-tokens", "128")["tasks"]


def reasoning_chance(run: Path) -> float:
    return 1 / yaml.safe_load((run / "config.yaml").read_text())["data"]["synthetic"]["modulus"]


def meets_thresholds(scores: dict, chance: float) -> bool:
    reason = scores["synthetic-reasoning"]["metrics"]
    return (scores["synthetic-memorization"]["metrics"]["exact_match"] >= MEMORIZATION_MIN
            and reason["exact_match/difficulty=1"] >= REASONING_MIN_ONE_STEP * chance
            and reason["exact_match"] >= REASONING_MIN * chance)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    """A run directory of ``configs/tiny.yaml`` (byte tokenizer, synthetic data), trained on its own
    4 000-step schedule until it meets this module's thresholds, and its scores (:func:`evaluate_run`).

    It trains in slices of :data:`SLICE_STEPS` (``train(until_step=...)``, bit for bit the same run as
    one call), scoring each slice's end, and stops at the first whose scores meet the thresholds the
    tests below assert, or at the end of the schedule. The run directory holds ``config.yaml``,
    ``metrics.jsonl``, ``data/`` (with the synthetic test sets) and checkpoints; ``moelab.load(run_dir)``
    returns the newest model.
    """
    run = load_run_config(REPO / "configs" / "tiny.yaml")
    out = tmp_path_factory.mktemp("trained_tiny") / "run"
    score_dir = tmp_path_factory.mktemp("slice_scores")
    with threads(worker_threads()):  # all of this process's share of the cores (one_thread is for the tests)
        for until in range(SLICE_STEPS, run.train.steps + SLICE_STEPS, SLICE_STEPS):
            step = train(run, out, quiet=True, until_step=until)["step"]
            scores = evaluate_run(out, score_dir / f"step{step}.json")
            if step >= run.train.steps or meets_thresholds(scores, reasoning_chance(out)):
                return out, scores
    raise AssertionError("unreachable: the last slice ends the schedule")


@pytest.fixture(scope="module")
def trained_tiny_run(tiny_run) -> Path:
    return tiny_run[0]


@pytest.fixture(scope="module")
def tiny_run_scores(tiny_run) -> dict:
    return tiny_run[1]


def unigram_entropy_nats(shards: ShardSet) -> float:
    counts = np.bincount(shards.all_tokens()).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_tiny_preset_learns(trained_tiny_run: Path):
    records = read_metrics(trained_tiny_run)
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    h = unigram_entropy_nats(ShardSet.open(trained_tiny_run / "data" / "train"))
    assert h > 2.0
    assert vals[-1] < 0.5 * h, (vals, h)
    assert vals[-1] < vals[0]
    model = moelab.load(trained_tiny_run)
    assert model.config.d_model == 64


def test_tiny_run_memorizes_above_chance(tiny_run_scores):
    memo = tiny_run_scores["synthetic-memorization"]["metrics"]
    assert memo["exact_match"] >= MEMORIZATION_MIN, memo


def test_tiny_run_reasons_above_chance(trained_tiny_run, tiny_run_scores):
    # configs/tiny.yaml at 4000 steps learned the sums in 12 of train.seed 0-13 on a Xeon (jumps at steps
    # 1000-3500; seeds 1 and 6 stayed at chance); seed 0 had learned them by step 3000 on an AMD EPYC. This
    # run is the same at any thread count on a given CPU type, but a change that only moves rounding gives it
    # a new trajectory and may make it fail (the fixture then trains all 4000 steps first): measure the odds
    # before and after with `python -m benchmarks.reasoning_seeds --seeds 0-13 --jobs 2`.
    reason = tiny_run_scores["synthetic-reasoning"]["metrics"]
    # reasoning (configs/tiny.yaml: sums modulo 5, 1-2 steps): a uniform guess is right 1/modulus of the time
    chance = reasoning_chance(trained_tiny_run)
    assert reason["exact_match/difficulty=1"] >= REASONING_MIN_ONE_STEP * chance, reason
    assert reason["exact_match"] >= REASONING_MIN * chance, reason


def test_tiny_run_numbers_stable_per_seed_and_learned(trained_tiny_run, tmp_path):
    common = ["--limit", "30", "--max-new-tokens", "8"]  # short generations: this test is about stability
    a = eval_json(trained_tiny_run, tmp_path / "a.json", *common)
    b = eval_json(trained_tiny_run, tmp_path / "b.json", *common, "--batch-size", "7")
    assert_same(a["tasks"], b["tasks"])

    sampled = [*common, "--samples", "4", "--temperature", "1.0", "--log-samples"]
    s1 = eval_json(trained_tiny_run, tmp_path / "s1.json", *sampled, "--seed", "1")
    s1_log = (tmp_path / "s1.samples.jsonl").read_text()
    s1b = eval_json(trained_tiny_run, tmp_path / "s1b.json", *sampled, "--seed", "1")
    assert s1["tasks"] == s1b["tasks"] and (tmp_path / "s1b.samples.jsonl").read_text() == s1_log
    eval_json(trained_tiny_run, tmp_path / "s2.json", *sampled, "--seed", "2")
    assert (tmp_path / "s2.samples.jsonl").read_text() != s1_log

    # the trained model predicts the gold answers far better than the same architecture untrained
    untrained = moelab.build(moelab.load(trained_tiny_run).config, seed=0)
    fresh = tmp_path / "untrained"
    moelab.save(untrained, fresh)
    ckpt_cfg = json.loads(next((trained_tiny_run / "checkpoints").glob("step_*/config.json")).read_text())
    cfg = json.loads((fresh / "config.json").read_text())
    (fresh / "config.json").write_text(json.dumps({**cfg, "data": ckpt_cfg["data"]}))
    u = eval_json(fresh, tmp_path / "u.json", *common, "--tokenizer", "byte")
    for task in ("synthetic-memorization", "synthetic-reasoning"):
        trained_bpb = a["tasks"][task]["task_loss"]["bits_per_byte"]
        assert trained_bpb < 0.6 * u["tasks"][task]["task_loss"]["bits_per_byte"]
