"""Exact resume: a SIGKILLed run, re-run with the same command, repeats the uninterrupted losses bit for bit."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import warnings
from pathlib import Path

import pytest

import moelab
from moelab.errors import ConfigError
from moelab.train.checkpoint import CorruptCheckpointWarning, latest_good_checkpoint, list_checkpoints, step_dir
from moelab.train.config import run_config_from_dict
from moelab.train.loop import train
from moelab.train.metrics import read_metrics
from test_train_support import cli_env, moelab_cmd, run_cli, tiny_run_dict, without_timing, write_config


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted 40-step run (in-process)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(run_config_from_dict(tiny_run_dict(40)), out, quiet=True)
    return out


def test_reference_run_layout(reference_run):
    recs = read_metrics(reference_run)
    assert [r["step"] for r in recs] == list(range(1, 41))
    assert all("val_loss" in r for r in recs if r["step"] % 10 == 0)
    for key in ("loss", "ce_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu",
                "expert_load_max_over_mean"):
        assert key in recs[-1]
    assert len(recs[-1]["expert_load_max_over_mean"]) == 2
    assert recs[-1]["tokens"] == 40 * 4 * 32
    ckpts = [s for s, _ in list_checkpoints(reference_run)]
    assert ckpts == list(range(5, 41, 5))
    final = step_dir(reference_run, 40)
    meta = json.loads((final / "config.json").read_text())
    assert meta["format"] == "moelab" and meta["step"] == 40 and meta["tokens"] == 40 * 128
    assert meta["data"]["synthetic"]["n_entities"] == 10 and meta["train"]["steps"] == 40
    assert (final / "moelab_tokenizer.json").is_file()
    assert (reference_run / "data" / "synthetic.json").is_file()
    assert latest_good_checkpoint(reference_run) == final
    model = moelab.load(reference_run)  # a run directory loads its newest good checkpoint
    assert model.config.d_model == 32


def test_no_pickle_in_checkpoints(reference_run):
    for f in step_dir(reference_run, 40).iterdir():
        assert f.suffix in (".json", ".safetensors"), f.name


def test_kill_and_resume_is_bit_exact(reference_run, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", tiny_run_dict(40))
    out = tmp_path / "run"
    args = ["train", str(cfg), "--out", str(out), "-q"]
    proc = subprocess.Popen(moelab_cmd(*args), env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while not (step_dir(out, 10) / "checksums.json").is_file():
            assert proc.poll() is None, f"trainer exited early: {proc.stderr.read().decode()}"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = max(s for s, _ in list_checkpoints(out))
    assert killed_at < 40, "the run finished before it could be killed; the test proves nothing"
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert without_timing(read_metrics(out)) == without_timing(read_metrics(reference_run))
    # a finished run re-run is a no-op that keeps the records
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert len(read_metrics(out)) == 40


def test_corrupt_newest_checkpoint_falls_back_with_warning(reference_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    weights = step_dir(run, 40) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):
        data[i] ^= 0xFF
    weights.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        good = latest_good_checkpoint(run)
    assert good == step_dir(run, 35)
    assert any(issubclass(w.category, CorruptCheckpointWarning) and "model.safetensors" in str(w.message) for w in caught)
    # a half-written checkpoint (no checksums.json) is skipped too
    (step_dir(run, 35) / "checksums.json").unlink()
    with pytest.warns(CorruptCheckpointWarning) as record:
        assert latest_good_checkpoint(run) == step_dir(run, 30)
    assert any("no checksums.json" in str(w.message) for w in record)
    # resuming uses step 30 and re-creates 35 and 40 identically
    summary = train(run_config_from_dict(tiny_run_dict(40)), run, quiet=True)
    assert summary["resumed_from"] == str(step_dir(run, 30))
    assert without_timing(read_metrics(run)) == without_timing(read_metrics(reference_run))
    assert latest_good_checkpoint(run) == step_dir(run, 40)
    assert (step_dir(run, 40) / "model.safetensors").read_bytes() == (step_dir(reference_run, 40) / "model.safetensors").read_bytes()


def test_keep_checkpoints_prunes_old_ones(tmp_path):
    out = tmp_path / "run"
    train(run_config_from_dict(tiny_run_dict(12, checkpoint_every=3, keep_checkpoints=2)), out, quiet=True)
    assert [s for s, _ in list_checkpoints(out)] == [9, 12]


def test_training_in_slices_with_until_step_equals_one_run(reference_run, tmp_path):
    out = tmp_path / "run"
    cfg = run_config_from_dict(tiny_run_dict(40))
    first = train(cfg, out, quiet=True, until_step=17)  # not a checkpoint step: one is written there
    assert (first["step"], first["steps"]) == (17, 40) and first["checkpoint"] == str(step_dir(out, 17))
    assert max(r["step"] for r in read_metrics(out)) == 17
    assert train(cfg, out, quiet=True, until_step=12)["step"] == 17  # already past it: nothing to do
    cfg_file = write_config(tmp_path / "run.yaml", tiny_run_dict(40))
    r = run_cli("train", str(cfg_file), "--out", str(out), "-q", "--until-step", "33")
    assert r.returncode == 0, r.stderr
    assert train(cfg, out, quiet=True)["step"] == 40
    assert without_timing(read_metrics(out)) == without_timing(read_metrics(reference_run))
    assert (step_dir(out, 40) / "model.safetensors").read_bytes() == (step_dir(reference_run, 40) / "model.safetensors").read_bytes()


def test_until_step_below_one_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="until_step=0 must be at least 1"):
        train(run_config_from_dict(tiny_run_dict(40)), tmp_path / "run", quiet=True, until_step=0)
    r = run_cli("train", str(write_config(tmp_path / "run.yaml", tiny_run_dict(40))), "--out", str(tmp_path / "cli"), "--until-step", "-3")
    assert r.returncode != 0 and "until_step=-3 must be at least 1" in r.stderr and "Traceback" not in r.stderr
