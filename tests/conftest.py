"""Shared fixtures. Real data sets live outside the repo in $MOELAB_DATA (default ../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("MOELAB_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture
def data_dir() -> Path:
    root = data_root()
    if not root.is_dir():
        pytest.skip(f"real data folder {root} not found; set MOELAB_DATA to the shared data folder to run this test")
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one thread: they gain nothing from threads, and OpenMP barriers
    stall when other processes hold the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def trained_tiny_run(tmp_path_factory) -> Path:
    """A run directory trained once per session with ``configs/tiny.yaml`` (byte tokenizer, synthetic data).

    Holds ``config.yaml``, ``metrics.jsonl``, ``data/`` (with the synthetic test sets) and checkpoints;
    ``moelab.load(run_dir)`` returns the final model.
    """
    from moelab.train.config import load_run_config
    from moelab.train.loop import train

    out = tmp_path_factory.mktemp("trained_tiny") / "run"
    train(load_run_config(REPO / "configs" / "tiny.yaml"), out, quiet=True)
    return out
