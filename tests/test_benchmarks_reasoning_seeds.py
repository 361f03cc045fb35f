"""benchmarks/reasoning_seeds.py: seed parsing, jump detection, and one short end-to-end run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.reasoning_seeds import jump_step, parse_seeds

REPO = Path(__file__).resolve().parents[1]


def test_parse_seeds_lists_and_ranges():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("5, 1,3-4,3") == [1, 3, 4, 5]
    for bad in ("", "a", "3-1", "-2", "1-x"):
        with pytest.raises(SystemExit):
            parse_seeds(bad)


def test_jump_step_is_the_first_checkpoint_at_the_threshold():
    curve = [(250, 0.2), (500, 0.95), (750, 0.7), (1000, 1.0)]
    assert jump_step(curve, 0.9) == 500
    assert jump_step(curve, 0.99) == 1000
    assert jump_step([(250, 0.2)], 0.9) is None
    assert jump_step([], 0.9) is None


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "benchmarks.reasoning_seeds", *args], check=False, cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_short_run_evaluates_every_checkpoint_and_writes_json(tmp_path):
    out, keep = tmp_path / "seeds.json", tmp_path / "runs"
    p = run("--seeds", "3", "--jobs", "1", "--threads", "2", "--every", "10", "--set", "train.steps=30",
            "--set", "train.warmup_steps=5", "--set", "data.synthetic_tokens=300000", "--keep", str(keep), "--out", str(out))
    assert p.returncode == 0, p.stderr
    payload = json.loads(out.read_text())
    (r,) = payload["runs"]
    assert r["seed"] == 3 and [step for step, _ in r["curve"]] == [10, 20, 30]
    assert all(0 <= em <= 1 for _, em in r["curve"]) and 0 <= r["reasoning"] <= 1 and 0 <= r["memorization"] <= 1
    assert payload["summary"]["runs"] == 1 and payload["threads"] == 2 and "learned in" in p.stdout
    assert "runs (2 threads per run)" in p.stdout  # the summary says how the runs were made: trajectories depend on it
    assert (keep / "seed3" / "checkpoints").is_dir()
    cfg = (keep / "seed3" / "config.yaml").read_text()
    assert "seed: 3" in cfg and "checkpoint_every: 10" in cfg

    # an existing --keep folder, a bad thread count and a bad override are one-line errors, not tracebacks
    p = run("--seeds", "0", "--keep", str(keep))
    assert p.returncode != 0 and "folder exists" in p.stderr and "Traceback" not in p.stderr
    p = run("--seeds", "0", "--threads", "0")
    assert p.returncode != 0 and "--threads" in p.stderr and "Traceback" not in p.stderr
    p = run("--seeds", "0", "--set", "train.steps=20", "--set", "data.synthetic_tokens=300000")
    assert p.returncode != 0 and "train.warmup_steps=20" in p.stderr and "Traceback" not in p.stderr
    p = run("--seeds", "0", "--config", "configs/study-d512.yaml")
    assert p.returncode != 0 and "data.source: synthetic" in p.stderr and "Traceback" not in p.stderr
    p = run("--seeds", "0", "--config", str(tmp_path / "missing.yaml"))
    assert p.returncode != 0 and "missing.yaml" in p.stderr and "Traceback" not in p.stderr
    p = run("--seeds", "0", "--out", str(tmp_path))  # a folder: refused before any training
    assert p.returncode != 0 and "is a folder" in p.stderr and "Traceback" not in p.stderr
