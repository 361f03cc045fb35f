"""The core CLI commands: count, export-hf, import-hf, and their error handling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moelab
from moelab.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


def run(capsys, *args):
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_count_json_reference_models(capsys):
    for name, total, active in [("mixtral-8x7b", 46.7, 12.9), ("olmoe-1b-7b", 6.9, 1.3), ("qwen3-30b-a3b", 30.5, 3.3)]:
        rc, out, _ = run(capsys, "count", str(CONFIGS / f"{name}.yaml"), "--json")
        assert rc == 0
        d = json.loads(out)
        assert abs(d["total_params"] / 1e9 - total) <= 0.06 and abs(d["active_params"] / 1e9 - active) <= 0.06
        for key in ("total_params_no_embed", "active_params_no_embed", "train_flops_per_token", "sparsity"):
            assert key in d


def test_count_flags_and_tokens(capsys):
    rc, out, _ = run(capsys, "count", "--vocab-size", "99584", "--d-model", "512", "--n-layers", "16", "--n-heads", "4",
                     "--d-expert", "1024", "--n-experts", "8", "--top-k", "2", "--tokens", "125e9", "--json")
    assert rc == 0
    d = json.loads(out)
    cfg = moelab.ModelConfig(vocab_size=99584, d_model=512, n_layers=16, n_heads=4, d_expert=1024, n_experts=8, top_k=2)
    assert d["total_params"] == moelab.accounting.param_counts(cfg).total
    assert d["tpp"] == pytest.approx(125e9 / d["total_params"]) and 380 < d["tpp"] < 400  # the study: ~390
    assert d["sparsity"] == 0.75


def test_count_flag_overrides_file(capsys):
    rc, out, _ = run(capsys, "count", str(CONFIGS / "mixtral-8x7b.yaml"), "--top-k", "8", "--json")
    d = json.loads(out)
    assert rc == 0 and d["active_params"] == d["total_params"] and d["sparsity"] == 0


def test_count_table(capsys):
    rc, out, _ = run(capsys, "count", str(CONFIGS / "olmoe-1b-7b.yaml"), "--tokens", "5e12")
    assert rc == 0 and "total params" in out and "TPP" in out


def test_count_errors(capsys, tmp_path):
    rc, _, err = run(capsys, "count", "--top-k", "9")
    assert rc == 1 and "top_k (9) cannot exceed n_experts (8)" in err
    rc, _, err = run(capsys, "count", str(tmp_path / "missing.yaml"))
    assert rc == 1 and "config file not found" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("d_model: [unclosed\n")
    rc, _, err = run(capsys, "count", str(bad))
    assert rc == 1 and "not valid YAML" in err
    bad.write_text("dmodel: 12\n")
    rc, _, err = run(capsys, "count", str(bad))
    assert rc == 1 and "did you mean 'd_model'" in err


def test_error_text_with_brackets_printed_verbatim(capsys, tmp_path):
    # error messages go through rich; square brackets (paths, pip extras) must not be eaten as markup
    rc, _, err = run(capsys, "count", str(tmp_path / "moelab[datasets].yaml"))
    assert rc == 1 and "moelab[datasets].yaml" in err

def test_export_import_cli(capsys, tmp_path):
    model = moelab.build(moelab.ModelConfig(vocab_size=40, d_model=16, n_heads=2, d_expert=8, n_experts=4, top_k=2))
    moelab.save(model, tmp_path / "ck")
    assert run(capsys, "export-hf", str(tmp_path / "ck"), str(tmp_path / "hf"))[0] == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "mixtral"
    assert run(capsys, "import-hf", str(tmp_path / "hf"), str(tmp_path / "back"))[0] == 0
    back = moelab.load(tmp_path / "back")
    ids = torch.randint(0, 40, (1, 5))
    torch.testing.assert_close(back(ids).logits, model(ids).logits)
    rc, _, err = run(capsys, "import-hf", str(tmp_path / "ck"), str(tmp_path / "x"))
    assert rc == 1 and "not a Hugging Face Mixtral directory" in err


def test_console_script_exit_code(tmp_path):
    """The installed entry point exits non-zero with one line and no traceback."""
    proc = subprocess.run([sys.executable, "-m", "moelab", "count", "--top-k", "0"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_usage_errors_are_one_line_not_tracebacks(capsys):
    for argv in (["count", "--bogus"], ["train", "configs/tiny.yaml", "--no-such-flag"], ["eval"]):
        rc, _, err = run(capsys, *argv)
        assert rc == 2 and "Traceback" not in err, err
        assert "No such option" in err or "Missing argument" in err
