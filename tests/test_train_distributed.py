"""torchrun with 2 CPU processes (gloo, DDP) follows the 1-process loss curve at the same global batch."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from moelab.train.checkpoint import list_checkpoints
from moelab.train.config import run_config_from_dict
from moelab.train.loop import train
from moelab.train.metrics import read_metrics
from test_train_support import cli_env, tiny_run_dict, write_config

STEPS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    train(run_config_from_dict(tiny_run_dict(STEPS, grad_accum_steps=2, checkpoint_every=6, eval_every=6)), out, quiet=True)
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_two_ranks_matches_one_process(strategy, one_process_run, tmp_path):
    # global batch: micro 4 x accum 1 x world 2 == micro 4 x accum 2 x world 1
    two = write_config(tmp_path / "two.yaml", tiny_run_dict(STEPS, grad_accum_steps=1, checkpoint_every=6, eval_every=6,
                                                             distributed=strategy))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "moelab", "train", str(two), "--out", str(tmp_path / "ddp"), "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=cli_env())
    assert r.returncode == 0, r.stderr[-3000:]

    ddp, one = read_metrics(tmp_path / "ddp"), read_metrics(one_process_run)
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == list(range(1, STEPS + 1))
    for a, b in zip(ddp, one):
        assert a["tokens"] == b["tokens"] == a["step"] * 8 * 32
        for key in ("loss", "ce_loss", "aux_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
        assert a["expert_load_max_over_mean"] == pytest.approx(b["expert_load_max_over_mean"], rel=1e-6)
        if "val_loss" in b:
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    assert ddp[-1]["loss"] < ddp[0]["loss"]
    # rank 0 alone wrote one set of checkpoints, and the run can be resumed by a single process
    assert [s for s, _ in list_checkpoints(tmp_path / "ddp")] == [6, 12]
    summary = train(run_config_from_dict(tiny_run_dict(STEPS + 2, grad_accum_steps=2, checkpoint_every=6, eval_every=6,
                                                       distributed=strategy)), tmp_path / "ddp", quiet=True)
    assert summary["resumed_from"].endswith("step_00000012") and summary["step"] == STEPS + 2
