"""moelab checkpoint directories: round trip, and each kind of damage is a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import moelab
from moelab.errors import CheckpointError, ConfigError


def tiny(**kw):
    base = dict(vocab_size=50, d_model=16, n_layers=2, n_heads=2, d_expert=8, n_experts=4, top_k=2)
    base.update(kw)
    return moelab.build(moelab.ModelConfig(**base), seed=0)


@pytest.mark.parametrize("tie", [False, True])
def test_roundtrip(tmp_path, tie):
    model = tiny(tie_embeddings=tie)
    moelab.save(model, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["format"] == "moelab" and meta["format_version"] == 1 and meta["model"]["n_experts"] == 4
    back = moelab.load(tmp_path / "ck")
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(model(ids).logits, back(ids).logits)
    assert back.config == model.config
    assert (back.lm_head.weight is back.embed.weight) == tie
    # nothing but the two files, no temporary leftovers
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]


def test_load_with_backend_override(tmp_path):
    moelab.save(tiny(), tmp_path / "ck")
    assert moelab.load(tmp_path / "ck", moe_backend="loop").config.moe_backend == "loop"


def test_missing_tensor(tmp_path):
    moelab.save(tiny(), tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    t = load_file(str(f))
    del t["layers.1.moe.w_down"]
    save_file(t, str(f))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) layers.1.moe.w_down"):
        moelab.load(tmp_path / "ck")


def test_wrong_shape(tmp_path):
    moelab.save(tiny(), tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    t = load_file(str(f))
    t["layers.0.attn.wq.weight"] = torch.zeros(3, 3)
    save_file(t, str(f))
    with pytest.raises(CheckpointError, match=r"layers.0.attn.wq.weight has shape \(3, 3\), expected \(16, 16\)"):
        moelab.load(tmp_path / "ck")


def test_truncated_safetensors(tmp_path):
    moelab.save(tiny(), tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        moelab.load(tmp_path / "ck")
    f.write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        moelab.load(tmp_path / "ck")


def test_neither_format(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a moelab checkpoint nor a Hugging Face Mixtral"):
        moelab.load(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not a moelab config"):
        moelab.load(tmp_path / "other")
    with pytest.raises(CheckpointError, match="does not exist"):
        moelab.load(tmp_path / "nope")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable JSON"):
        moelab.load(tmp_path / "broken")


def test_invalid_config_in_checkpoint(tmp_path):
    moelab.save(tiny(), tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    meta["model"]["top_k"] = 9
    (tmp_path / "ck" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="top_k"):
        moelab.load(tmp_path / "ck")


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("top_k", 9, "top_k \\(9\\) cannot exceed n_experts \\(8\\)"),
        ("top_k", 0, "top_k must be at least 1"),
        ("n_heads", 3, "not divisible by n_heads"),
        ("n_kv_heads", 3, "n_heads \\(4\\) must be divisible by n_kv_heads \\(3\\)"),
        ("d_model", 0, "d_model must be a positive integer"),
        ("vocab_size", -1, "vocab_size must be a positive integer"),
        ("d_expert", 0, "d_expert must be a positive integer"),
        ("n_experts", 0, "n_experts must be a positive integer"),
        ("n_layers", 0, "n_layers must be a positive integer"),
        ("head_dim", 7, "head_dim must be a positive even integer"),
        ("rms_norm_eps", 0, "rms_norm_eps must be > 0"),
        ("router_aux_loss_coef", -1, "router_aux_loss_coef must be >= 0"),
        ("moe_backend", "magic", "moe_backend"),
        ("qk_norm", "sometimes", "qk_norm"),
        ("n_expert", 4, "unknown model config field 'n_expert'; did you mean 'n_experts'"),
    ],
)
def test_invalid_config_fields(field, value, match):
    fields = dict(d_model=64, n_heads=4, n_experts=8, top_k=2)
    fields[field] = value
    with pytest.raises(ConfigError, match=match) as info:
        moelab.ModelConfig.create(**fields)
    assert "\n" not in str(info.value)
