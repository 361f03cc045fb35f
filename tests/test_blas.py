"""MKL's strict reproducibility: importing moelab asks for it, products and whole runs are then the
same at 1 and 2 threads (on the AMD EPYC where this was found, without it neither was)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_train_support import tiny_run_dict, without_timing
from test_weight_grad import threads

from moelab.blas import ENV, STRICT_SETTING, mkl_reproducibility
from moelab.train.config import run_config_from_dict
from moelab.train.loop import train
from moelab.train.metrics import read_metrics

MKL = "MKL" in torch.__config__.show()


def _report(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != ENV} | env
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, check=True)
    return r.stdout.strip()


@pytest.mark.skipif(not MKL, reason="this torch has no MKL")
def test_importing_moelab_turns_on_strict_mode_unless_the_user_chose_one():
    report = "import os, moelab; from moelab.blas import mkl_reproducibility as m; print(os.environ['MKL_CBWR'], m())"
    assert _report(report) == f"{STRICT_SETTING} strict"
    assert _report(report, MKL_CBWR="COMPATIBLE") == "COMPATIBLE mode 3, not strict"
    # MKL fixes its mode at its first call: a matmul before moelab is imported leaves it off
    late = "import torch; torch.ones(2, 2) @ torch.ones(2, 2); import moelab; from moelab.blas import mkl_reproducibility as m; print(m())"
    assert _report(late) == "off"


@pytest.mark.skipif(not MKL, reason="this torch has no MKL")
def test_this_process_runs_in_strict_mode():
    assert os.environ[ENV] == STRICT_SETTING and mkl_reproducibility() == "strict"


@pytest.mark.parametrize("rows", range(1, 17))
def test_small_products_do_not_depend_on_the_thread_count(rows):
    # without strict mode, MKL on an AMD EPYC (AVX2) rounded 5-7 and 9-11 rows differently at 2 threads
    g = torch.Generator().manual_seed(rows)
    a, w = torch.randn(rows, 64, generator=g), torch.randn(256, 64, generator=g)
    with threads(1):
        one = (a @ w.t(), w.t().t() @ a.t(), torch.nn.functional.linear(a, w))
    with threads(2):
        two = (a @ w.t(), w.t().t() @ a.t(), torch.nn.functional.linear(a, w))
    assert all(torch.equal(x, y) for x, y in zip(one, two))


def test_a_run_trains_the_same_at_one_and_two_threads(tmp_path):
    # the run of tests/test_train_resume.py logged different gradient norms from step 4 on without strict mode
    records = []
    for n in (1, 2):
        with threads(n):
            train(run_config_from_dict(tiny_run_dict(12)), tmp_path / f"threads{n}", quiet=True)
        records.append(without_timing(read_metrics(tmp_path / f"threads{n}")))
    assert records[0] == records[1]
