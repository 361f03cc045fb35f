"""`moelab data` CLI: prepare, tokenizer-train, synthetic; errors exit 1 with one message."""

import json

import pytest
from typer.testing import CliRunner

from moelab.data.cli import app
from moelab.data.shards import ShardSet

runner = CliRunner()


def test_prepare_ok(tmp_path):
    j = tmp_path / "in.jsonl"
    j.write_text("".join(json.dumps({"body": f"line {i}"}) + "\n" for i in range(50)))
    r = runner.invoke(app, ["prepare", str(j), "--out", str(tmp_path / "out"), "--field", "body", "--shard-tokens", "100"])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output
    s = ShardSet.open(tmp_path / "out", verify=True)
    assert s.manifest["n_documents"] == 50 and len(s.manifest["shards"]) > 1


def test_prepare_malformed_exit_1(tmp_path):
    j = tmp_path / "in.jsonl"
    j.write_text('{"text": "ok"}\n{"text": oops}\n')
    r = runner.invoke(app, ["prepare", str(j), "--out", str(tmp_path / "out")])
    assert r.exit_code == 1
    assert f"error: {j}:2: invalid JSON" in r.output
    assert "Traceback" not in r.output
    assert r.stderr.strip() == f"error: {j}:2: invalid JSON (Expecting value at column 10); fix or remove the line"
    assert not (tmp_path / "out").exists()


def test_prepare_unknown_tokenizer_exit_1(tmp_path):
    j = tmp_path / "in.jsonl"
    j.write_text('{"text": "ok"}\n')
    r = runner.invoke(app, ["prepare", str(j), "--out", str(tmp_path / "out"), "--tokenizer", "gpt5"])
    assert r.exit_code == 1 and "error: unknown tokenizer spec 'gpt5'" in r.output


def test_tokenizer_train(tmp_path):
    pytest.importorskip("tokenizers")
    t = tmp_path / "c.txt"
    t.write_text("the cat sat on the mat. " * 200)
    r = runner.invoke(app, ["tokenizer-train", str(t), "--out", str(tmp_path / "tok.json"), "--vocab-size", "300"])
    assert r.exit_code == 0, r.output
    j = tmp_path / "in.jsonl"
    j.write_text('{"text": "the cat sat"}\n')
    r = runner.invoke(app, ["prepare", str(j), "--out", str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok.json")])
    assert r.exit_code == 0, r.output
    s = ShardSet.open(tmp_path / "out")
    assert s.tokenizer().decode(s.all_tokens().tolist()) == "the cat sat"


def test_synthetic_command(tmp_path):
    r = runner.invoke(app, ["synthetic", "--out", str(tmp_path / "syn"), "--tokens", "40000", "--entities", "10", "--seed", "2"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "syn" / "synthetic.json").read_text())
    assert summary["world"]["n_entities"] == 10 and summary["config"]["seed"] == 2
    assert summary["train"]["facts_covered"] == 50
    r = runner.invoke(app, ["synthetic", "--out", str(tmp_path / "bad"), "--entities", "0"])
    assert r.exit_code == 1 and "error: SyntheticConfig: n_entities" in r.output
