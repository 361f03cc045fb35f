"""Analytic counts equal the built model: parameters by name, and matmul FLOPs measured by torch."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import moelab
from moelab.accounting import (
    attention_flops_per_token,
    inference_flops_per_token,
    param_counts,
    summarize,
    tokens_for_flops,
    tokens_for_tpp,
    train_flops_per_token,
)


def random_configs(n=30, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        n_kv = rng.choice([1, 2, 4])
        n_heads = n_kv * rng.choice([1, 2])
        E = rng.choice([1, 2, 4, 8, 16])
        k = rng.choice([1, E, min(2, E), rng.randint(1, E)])
        out.append(
            moelab.ModelConfig(
                vocab_size=rng.randint(17, 300), d_model=rng.choice([16, 24, 32]), n_layers=rng.randint(1, 3),
                n_heads=n_heads, n_kv_heads=n_kv, head_dim=rng.choice([4, 8, 12]), d_expert=rng.choice([8, 20, 33]),
                n_experts=E, top_k=k, tie_embeddings=rng.random() < 0.4, qk_norm=rng.choice(["none", "none", "head", "full"]),
                max_seq_len=64, moe_backend="loop",
            )
        )
    # the explicit corner cases the issue names
    out += [
        moelab.ModelConfig(vocab_size=50, d_model=16, n_heads=2, n_experts=1, top_k=1, d_expert=8, moe_backend="loop"),
        moelab.ModelConfig(vocab_size=50, d_model=16, n_heads=2, n_experts=4, top_k=4, d_expert=8, moe_backend="loop"),
        moelab.ModelConfig(vocab_size=50, d_model=16, n_heads=4, n_kv_heads=1, n_experts=8, top_k=2, d_expert=8, tie_embeddings=True, moe_backend="loop"),
    ]
    return out


def active_by_name(model) -> int:
    cfg = model.config
    n = 0
    for name, p in model.named_parameters():  # duplicates (tied) are skipped by named_parameters
        if name.endswith(("w_gate_up", "w_down")):
            n += p.numel() // cfg.n_experts * cfg.top_k
        else:
            n += p.numel()
    return n


@pytest.mark.parametrize("cfg", random_configs(), ids=lambda c: f"E{c.n_experts}k{c.top_k}g{c.n_kv_heads}t{int(c.tie_embeddings)}{c.qk_norm}")
def test_param_counts_match_built_model(cfg):
    model = moelab.build(cfg)
    c = param_counts(cfg)
    assert c.total == sum(p.numel() for p in model.parameters())
    assert c.active == active_by_name(model)
    embed = model.embed.weight.numel() + (0 if cfg.tie_embeddings else model.lm_head.weight.numel())
    assert c.total_no_embed == c.total - embed
    assert c.active_no_embed == c.active - embed
    if cfg.n_experts == cfg.top_k:
        assert c.active == c.total


def norm_params(cfg) -> int:
    qk = {"none": 0, "head": 2 * cfg.head_dim, "full": cfg.d_attn + cfg.d_kv}[cfg.qk_norm]
    return cfg.n_layers * (2 * cfg.d_model + qk) + cfg.d_model


def matmul_flops(counter: FlopCounterMode) -> int:
    """FLOPs of the matmuls, without attention kernels (counted by formula in moelab)."""
    return sum(v for op, v in counter.get_flop_counts()["Global"].items() if "attention" not in str(op))


@pytest.mark.parametrize("cfg", random_configs(8, seed=1), ids=lambda c: f"E{c.n_experts}k{c.top_k}")
def test_flops_match_torch_flop_counter(cfg):
    """torch's FlopCounterMode on the built model (loop backend, so only selected experts run).

    Attention scores (QK^T, AV) are excluded from the measurement and from the formula: moelab counts
    them by the causal-half convention, which no kernel-level counter reproduces. Norms are not matmuls.
    Everything else -- projections, router, the k selected experts, LM head, forward and backward --
    must agree exactly.
    """
    model = moelab.build(cfg)
    B, T = 2, 16
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    with FlopCounterMode(display=False) as fwd:
        model(ids)
    with FlopCounterMode(display=False) as train:
        model(ids[:, :-1], ids[:, 1:]).loss.backward()
    per_token_fwd = inference_flops_per_token(cfg, T) - attention_flops_per_token(cfg, T, backward=False)
    assert matmul_flops(fwd) == B * T * (per_token_fwd - 2 * norm_params(cfg))
    Tt = T - 1
    per_token_train = train_flops_per_token(cfg, Tt) - attention_flops_per_token(cfg, Tt, backward=True)
    assert matmul_flops(train) == B * Tt * (per_token_train - 6 * norm_params(cfg))


def test_attention_flop_term():
    cfg = moelab.ModelConfig(d_model=64, n_layers=3, n_heads=4, head_dim=16)
    # QK^T and AV: 2 matmuls x 2 FLOPs per MAC x T/2 keys on average x d_attn, per layer
    assert attention_flops_per_token(cfg, 128, backward=False) == 2 * 2 * 64 * 64 * 3
    assert attention_flops_per_token(cfg, 128) == 3 * attention_flops_per_token(cfg, 128, backward=False)


def test_reference_models_published_sizes():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs" / "models"
    expect = {"mixtral-8x7b": (46.7e9, 12.9e9), "olmoe-1b-7b": (6.9e9, 1.3e9), "qwen3-30b-a3b": (30.5e9, 3.3e9)}
    for name, (total, active) in expect.items():
        s = summarize(moelab.ModelConfig.from_file(root / f"{name}.yaml"))
        # published figures have one decimal, some rounded and some truncated (Qwen's 3.35B -> "3.3B")
        assert abs(s.total_params - total) <= 0.06e9, (name, s.total_params)
        assert abs(s.active_params - active) <= 0.06e9, (name, s.active_params)
    # Mixtral's exact count is widely quoted
    assert summarize(moelab.ModelConfig.from_file(root / "mixtral-8x7b.yaml")).total_params == 46_702_792_704


def test_study_smallest_model_sizes():
    """The published grid's smallest model: d 512, E 8, k 2 -> 320 M total / 170 M active."""
    cfg = moelab.ModelConfig(vocab_size=99584, d_model=512, n_layers=16, n_heads=4, d_expert=1024, n_experts=8, top_k=2)
    s = summarize(cfg)
    assert round(s.total_params / 1e6, -1) == 320 and round(s.active_params / 1e6, -1) == 170
    assert s.sparsity == 0.75


def test_tpp_and_budget_helpers():
    cfg = moelab.ModelConfig(vocab_size=100, d_model=32, n_heads=2, n_experts=4, top_k=1)
    s = summarize(cfg, tokens=tokens_for_tpp(cfg, 20))
    assert s.tpp == pytest.approx(20, rel=1e-4)
    assert s.tokens_per_active_param > s.tpp
    assert tokens_for_flops(cfg, 6e12) == int(6e12 // train_flops_per_token(cfg))
