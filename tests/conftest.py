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


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
