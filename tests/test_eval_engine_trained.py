"""End-to-end: evaluate trained tiny models on the synthetic tasks (slow: trains models).

* ``trained_tiny_run`` (session fixture, configs/tiny.yaml): numbers are stable per seed, sampling is
  reproducible per seed, the trained model's answer-only task loss is far below an untrained one, and
  it scores far above chance on both synthetic tasks (greedy exact match).
* A purpose-built small run (few facts, one-step modular sums, 128-token context) trained for 500 steps
  recalls memorised facts far above chance. Reasoning needs more steps than that (the variable lookup
  forms late), so for reasoning this run checks the learned answer format only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import moelab
from moelab.cli import main
from moelab.data.world import ATTRIBUTES

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]




def assert_same(a: dict, b: dict) -> None:
    """Same metrics and curves exactly; task losses up to fp32 summation noise (batch padding differs)."""
    assert a.keys() == b.keys()
    for task in a:
        assert a[task]["metrics"] == b[task]["metrics"]
        assert a[task].get("test_time") == b[task].get("test_time")
        for key in ("nats_per_token", "bits_per_byte"):
            assert a[task]["task_loss"][key] == pytest.approx(b[task]["task_loss"][key], rel=1e-5)


def eval_json(run: Path, out: Path, *args: str) -> dict:
    rc = main(["eval", str(run), "--tasks", "synthetic-memorization,synthetic-reasoning", "--out", str(out),
               "--no-progress", *args])
    assert rc == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny_run_scores(trained_tiny_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("scores") / "r.json"
    return eval_json(trained_tiny_run, path, "--max-new-tokens", "128")["tasks"]


def test_tiny_run_memorizes_above_chance(tiny_run_scores):
    memo = tiny_run_scores["synthetic-memorization"]["metrics"]
    # memorisation: a uniform guess over an attribute's values is right ~3 % of the time
    assert memo["exact_match"] >= 0.5, memo


def test_tiny_run_reasons_above_chance(trained_tiny_run, tiny_run_scores):
    # configs/tiny.yaml at 4000 steps learned the sums in 12 of train.seed 0-13 (jumps at steps 1000-3500;
    # seeds 1 and 6 stayed at chance). This run (seed 0, jump at 3500) is the same at any thread count on a
    # given CPU type, but a change that only moves rounding gives it a new trajectory and may make it fail:
    # measure the odds before and after with `python -m benchmarks.reasoning_seeds --seeds 0-13 --jobs 2`.
    reason = tiny_run_scores["synthetic-reasoning"]["metrics"]
    # reasoning (configs/tiny.yaml: sums modulo 5, 1-2 steps): a uniform guess is right 1/modulus of the time
    chance = 1 / yaml.safe_load((trained_tiny_run / "config.yaml").read_text())["data"]["synthetic"]["modulus"]
    assert reason["exact_match/difficulty=1"] >= 3 * chance, reason
    assert reason["exact_match"] >= 2 * chance, reason


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


# 500 steps: 94-100 % of facts recalled for train.seed 0-3 with the fused AdamW (100 % before it; 300 steps
# gave 25-69 % against a threshold of 30 %: too close for a check whose numerics vary with the host)
SMALL_RUN = {
    "model": {"vocab_size": 257, "d_model": 64, "n_layers": 2, "n_heads": 4, "d_expert": 128, "n_experts": 4,
              "top_k": 2, "max_seq_len": 128},
    "data": {"source": "synthetic", "tokenizer": "byte", "seq_len": 128, "synthetic_tokens": 200_000,
             "synthetic": {"n_entities": 8, "attributes": ["birth_year", "birth_city"], "n_paraphrases": 1,
                           "max_ops": 1, "modulus": 5, "operations": ["+"], "n_test_reasoning": 20}},
    "train": {"lr": 3e-3, "warmup_steps": 20, "micro_batch_size": 16, "steps": 500, "eval_every": 1000,
              "log_every": 100, "checkpoint_every": 1000, "keep_checkpoints": 1},
}


def test_small_trained_model_recalls_facts_above_chance(tmp_path):
    train_mod = pytest.importorskip("moelab.train.loop", reason="the trainer (moelab.train) is not available")
    from moelab.train.config import run_config_from_dict

    run = tmp_path / "run"
    train_mod.train(run_config_from_dict(SMALL_RUN), run, quiet=True)
    r = eval_json(run, tmp_path / "r.json", "--max-new-tokens", "64", "--log-samples")
    again = eval_json(run, tmp_path / "r2.json", "--max-new-tokens", "64", "--batch-size", "5")
    assert_same(again["tasks"], r["tasks"])

    chance = sum(1 / len(ATTRIBUTES[a]["values"]) for a in ("birth_year", "birth_city")) / 2  # uniform guess: 3 %
    memo = r["tasks"]["synthetic-memorization"]["metrics"]["exact_match"]
    assert memo >= 10 * chance, memo

    samples = [json.loads(x) for x in (tmp_path / "r.samples.jsonl").read_text().splitlines()]
    reasoning = [s for s in samples if s["task"] == "synthetic-reasoning"]
    well_formed = [s for s in reasoning if s["answer"] is not None and s["answer"] in {str(v) for v in range(5)}]
    assert len(well_formed) >= 0.8 * len(reasoning)  # "... #### <residue mod 5>" learned
