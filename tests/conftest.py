"""Shared fixtures. Real data sets live outside the repo in $MOELAB_DATA (default ../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# The suite runs on pytest-xdist workers (README: ``-n 2 --dist loadfile``). Each worker gets
# cores / workers threads, for torch in the worker and (through OMP_NUM_THREADS) for the processes its
# tests start, so workers do not oversubscribe the cores (OpenMP barriers stall when another process
# holds them). Results do not depend on the thread count (tests/test_blas.py, tests/test_weight_grad.py).
TRAINED_TINY_MODULE = "test_trained_tiny.py"
_DEFAULT_THREADS = torch.get_num_threads()


def worker_threads() -> int:
    """Threads for this process's share of the cores: torch's default, or cores / workers on xdist."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    return max(1, (os.cpu_count() or 1) // workers) if workers > 1 else _DEFAULT_THREADS


def pytest_configure(config):
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")) > 1:
        n = worker_threads()
        torch.set_num_threads(n)
        os.environ["OMP_NUM_THREADS"] = str(n)


def pytest_collection_modifyitems(config, items):
    """The once-trained ``tiny`` run's module goes first: with ``--dist loadfile`` its worker starts the
    training (minutes) at once, while the other worker runs the rest of the suite."""
    items.sort(key=lambda item: item.path.name != TRAINED_TINY_MODULE)  # stable: otherwise in order


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
