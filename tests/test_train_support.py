"""Helpers shared by the trainer tests (a tiny run config, running the CLI in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from moelab.train.metrics import TIMING_FIELDS, read_metrics


def tiny_run_dict(steps: int = 40, **train) -> dict:
    """A very small MoE run on a small synthetic corpus (a step takes milliseconds on CPU)."""
    return {
        "model": {"vocab_size": 257, "d_model": 32, "n_layers": 2, "n_heads": 2, "d_expert": 64,
                  "n_experts": 8, "top_k": 2, "max_seq_len": 32},
        "data": {"source": "synthetic", "synthetic": {"n_entities": 10, "n_paraphrases": 1, "max_ops": 2,
                                                      "n_test_reasoning": 5},
                 "synthetic_tokens": 20_000, "seq_len": 32, "seed": 0},
        "train": {"lr": 3e-3, "warmup_steps": 5, "micro_batch_size": 4, "grad_accum_steps": 1, "steps": steps,
                  "eval_every": 10, "eval_batches": 2, "log_every": 1, "checkpoint_every": 5,
                  "keep_checkpoints": 20, "peak_flops": 1e10, **train},
    }


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def cli_env() -> dict:
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    return env


def moelab_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "moelab", *args]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(moelab_cmd(*args), capture_output=True, text=True, timeout=timeout, env=cli_env())


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir)]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def test_tiny_run_dict_is_valid():
    from moelab.train.config import run_config_from_dict, total_steps

    run = run_config_from_dict(tiny_run_dict())
    assert total_steps(run) == 40
