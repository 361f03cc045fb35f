"""Hugging Face Mixtral interop: export -> transformers, transformers -> import, both exact in fp32."""

from __future__ import annotations

import json

import pytest
import torch

import moelab
from moelab.errors import CheckpointError

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra: pip install -e '.[hf]'")

CONFIGS = [
    dict(n_experts=8, top_k=2),
    dict(n_experts=4, top_k=1, norm_topk_prob=True, n_kv_heads=1),
    dict(n_experts=8, top_k=8, n_kv_heads=2),
    dict(n_experts=1, top_k=1),
    dict(n_experts=4, top_k=2, tie_embeddings=True),
    dict(n_experts=4, top_k=2, head_dim=12),  # head_dim != d_model / n_heads
]


def tiny_cfg(**kw):
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_expert=24, max_seq_len=64, rope_theta=10000.0)
    base.update(kw)
    return moelab.ModelConfig(**base)


def hf_load(path):
    model, info = transformers.MixtralForCausalLM.from_pretrained(str(path), output_loading_info=True, torch_dtype=torch.float32)
    return model.eval(), info


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_export_matches_transformers(tmp_path, kw):
    model = moelab.build(tiny_cfg(**kw), seed=3).eval()
    with torch.no_grad():  # make routing decisive so tiny fp differences cannot flip a top-k choice
        for block in model.layers:
            if block.moe.router is not None:
                block.moe.router.weight.mul_(20)
    moelab.export_hf(model, tmp_path / "hf")
    hf, info = hf_load(tmp_path / "hf")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.randint(0, 97, (3, 21))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_import_of_save_pretrained(tmp_path):
    hf_cfg = transformers.MixtralConfig(
        vocab_size=101, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, max_position_embeddings=128,
        rope_theta=10000.0, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():  # transformers' default init leaves norms at 1 and std 0.02 elsewhere
            if p.dim() > 1:
                p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path / "hf")
    model = moelab.load(tmp_path / "hf").eval()
    assert model.config.n_experts == 6 and model.config.n_kv_heads == 2 and model.config.norm_topk_prob
    ids = torch.randint(0, 101, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)


def test_sharded_export_and_roundtrip(tmp_path):
    model = moelab.build(tiny_cfg(n_experts=4, top_k=2), seed=0).eval()
    moelab.export_hf(model, tmp_path / "hf", max_shard_bytes=40_000)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    hf, info = hf_load(tmp_path / "hf")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    back = moelab.load(tmp_path / "hf")
    for (n, a), b in zip(model.named_parameters(), back.parameters()):
        assert torch.equal(a, b), n


def test_export_refuses_unrenormalised_routing(tmp_path):
    model = moelab.build(tiny_cfg(n_experts=4, top_k=2, norm_topk_prob=False))
    with pytest.raises(CheckpointError, match="norm_topk_prob"):
        moelab.export_hf(model, tmp_path / "x")
    assert not (tmp_path / "x" / "config.json").exists()
    with pytest.raises(CheckpointError, match="qk_norm"):
        moelab.export_hf(moelab.build(tiny_cfg(qk_norm="head")), tmp_path / "y")


def test_import_bad_mixtral_dirs(tmp_path):
    model = moelab.build(tiny_cfg(), seed=0)
    src = moelab.export_hf(model, tmp_path / "hf")
    # missing field in config.json
    cfg = json.loads((src / "config.json").read_text())
    bad = tmp_path / "nofield"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    (bad / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"}))
    with pytest.raises(CheckpointError, match="hidden_size"):
        moelab.load(bad)
    # config says more layers than the weights hold
    cfg3 = dict(cfg, num_hidden_layers=3)
    (bad / "config.json").write_text(json.dumps(cfg3))
    with pytest.raises(CheckpointError, match="missing tensor model.layers.2"):
        moelab.load(bad)
    # only pickled weights
    pick = tmp_path / "pickled"
    pick.mkdir()
    (pick / "config.json").write_text(json.dumps(cfg))
    (pick / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="safetensors"):
        moelab.load(pick)


def _mixtral_config_dict(**kw) -> dict:
    base = dict(vocab_size=101, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, max_position_embeddings=128,
                rope_theta=10000.0)
    return {**base, **kw}


def test_import_sliding_window_caps_the_context(tmp_path):
    """A sliding-window checkpoint imports with max_seq_len capped at the window, where moelab's full
    attention equals transformers' windowed attention exactly; a longer context is refused."""
    from moelab.hf import config_from_mixtral

    assert config_from_mixtral(_mixtral_config_dict(sliding_window=16)).max_seq_len == 16
    assert config_from_mixtral(_mixtral_config_dict(sliding_window=4096)).max_seq_len == 128  # window above the context
    assert config_from_mixtral(_mixtral_config_dict(sliding_window=None)).max_seq_len == 128
    assert config_from_mixtral(_mixtral_config_dict(sliding_window=16), max_seq_len=8).max_seq_len == 8
    with pytest.raises(CheckpointError, match="sliding_window=16"):
        config_from_mixtral(_mixtral_config_dict(sliding_window=16), max_seq_len=64)
    for bad in (0, -4, "4096", 16.5, True):
        with pytest.raises(CheckpointError, match="sliding_window must be a positive integer"):
            config_from_mixtral(_mixtral_config_dict(sliding_window=bad))

    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(**_mixtral_config_dict(sliding_window=16))).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path / "hf")
    model = moelab.load(tmp_path / "hf").eval()
    assert model.config.max_seq_len == 16
    ids = torch.randint(0, 101, (2, 16))  # the whole window: exact
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)
        longer = torch.randint(0, 101, (1, 40))  # beyond the window the two models differ: why the cap exists
        assert not torch.allclose(model(longer).logits[:, 20:], hf(longer).logits[:, 20:], atol=1e-3)


@pytest.mark.parametrize("key,value", [
    ("rope_scaling", {"type": "linear", "factor": 2.0}),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
    ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
])
def test_import_refuses_rope_scaling(key, value):
    from moelab.hf import config_from_mixtral

    with pytest.raises(CheckpointError, match="unsupported RoPE scaling"):
        config_from_mixtral(_mixtral_config_dict(**{key: value}))
    # a default rope_parameters beside a scaling rope_scaling (or the reverse) is still refused
    other = "rope_scaling" if key == "rope_parameters" else "rope_parameters"
    with pytest.raises(CheckpointError, match="unsupported RoPE scaling"):
        config_from_mixtral(_mixtral_config_dict(**{key: value, other: {"rope_type": "default", "rope_theta": 10000.0}}))
    assert config_from_mixtral(_mixtral_config_dict(rope_scaling={"type": "default"})).rope_theta == 10000.0
    with pytest.raises(CheckpointError, match="must be an object"):
        config_from_mixtral(_mixtral_config_dict(rope_scaling="linear"))
