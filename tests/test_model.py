"""The full language model: backends agree end to end, KV-cache decoding equals full recompute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moelab
from moelab.model import KVCache


def tiny(**kw):
    base = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_expert=24, n_experts=8, top_k=2, max_seq_len=64)
    base.update(kw)
    return moelab.build(moelab.ModelConfig(**base), seed=1)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("kw", [{}, {"n_experts": 1, "top_k": 1}, {"tie_embeddings": True, "n_kv_heads": 4}, {"qk_norm": "head"}, {"qk_norm": "full", "top_k": 1}])
def test_full_model_backends_match_naive(backend, kw):
    model = tiny(**kw)
    ids = torch.randint(0, 61, (3, 20))
    results = {}
    for b in ("naive", backend):
        model.set_moe_backend(b)
        model.zero_grad(set_to_none=True)
        out = model(ids[:, :-1], ids[:, 1:])
        out.loss.backward()
        results[b] = (out.logits.detach(), out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results[backend][0], results["naive"][0], rtol=1e-5, atol=1e-5)
    assert results[backend][1] == pytest.approx(results["naive"][1], rel=1e-6)
    for n, g in results["naive"][2].items():
        torch.testing.assert_close(results[backend][2][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_loss_is_ce_plus_router_losses():
    model = tiny()
    ids = torch.randint(0, 61, (2, 16))
    out = model(ids[:, :-1], ids[:, 1:])
    ce = F.cross_entropy(out.logits.reshape(-1, 61), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.ce_loss, ce)
    torch.testing.assert_close(out.loss, ce + out.aux_loss + out.z_loss)
    assert len(out.tokens_per_expert) == 2 and all(c.sum() == 2 * 15 * 2 for c in out.tokens_per_expert)
    # near-uniform routing at init: the balancing loss is close to its coefficient
    assert out.aux_loss.item() == pytest.approx(1e-2, rel=0.2)


def test_gqa_equals_repeated_kv_heads():
    """A GQA model equals the same model with its K/V heads repeated (plain multi-head attention)."""
    gqa = tiny(n_heads=4, n_kv_heads=1)
    mha = tiny(n_heads=4, n_kv_heads=4)
    sd = gqa.state_dict()
    for i in range(2):
        for w in ("wk", "wv"):
            key = f"layers.{i}.attn.{w}.weight"
            sd[key] = sd[key].view(1, 8, 32).repeat(4, 1, 1).reshape(32, 32)
    mha.load_state_dict(sd)
    ids = torch.randint(0, 61, (2, 12))
    torch.testing.assert_close(gqa(ids).logits, mha(ids).logits, rtol=1e-5, atol=1e-5)


def test_causality():
    model = tiny()
    ids = torch.randint(0, 61, (1, 16))
    a = model(ids).logits
    ids2 = ids.clone()
    ids2[0, 10:] = (ids2[0, 10:] + 1) % 61
    b = model(ids2).logits
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_kv_cache_incremental_equals_full_forward():
    model = tiny().eval()
    ids = torch.randint(0, 61, (2, 24))
    full = model(ids).logits
    cache = KVCache.empty(model.config, 2, 32)
    parts = [model(ids[:, :10], cache=cache).logits]
    for t in range(10, 24):
        parts.append(model(ids[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_left_padding_with_mask_equals_unpadded():
    model = tiny().eval()
    ids = torch.randint(0, 61, (1, 9))
    ref = model(ids).logits[0, -1]
    pad = 5
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, 9, dtype=torch.bool)], 1)
    positions = (torch.arange(pad + 9) - pad).clamp(min=0)[None]
    out = model(padded, positions=positions, key_padding_mask=mask).logits[0, -1]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_init_is_seeded_and_std():
    a, b = tiny(), tiny()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    w = a.layers[0].moe.w_gate_up
    assert w.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.all(a.layers[0].attn_norm.weight == 1)


def test_tied_embeddings_share_storage():
    model = tiny(tie_embeddings=True)
    assert model.lm_head.weight is model.embed.weight


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    """torch.compile per block (the GPU path) runs on CPU in fp32 and gives the eager results."""
    eager, compiled = tiny(), tiny()
    compiled.compile_blocks()
    ids = torch.randint(0, 61, (2, 16))
    a = eager(ids[:, :-1], ids[:, 1:])
    b = compiled(ids[:, :-1], ids[:, 1:])
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-6, atol=1e-6)
    for (n, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_bf16_autocast_forward_backward():
    """The GPU mixed-precision path (bf16 autocast, fp32 router and master weights) on the CPU device."""
    model = tiny()
    ids = torch.randint(0, 61, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids[:, :-1], ids[:, 1:])
    out.loss.backward()
    ref = tiny()(ids[:, :-1], ids[:, 1:])
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.loss)
    assert abs(out.loss.item() - ref.loss.item()) < 0.05
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_float64_model_keeps_float64_and_has_exact_gradients():
    """A float64 model (e.g. for gradient checks) computes in float64 throughout: logits and loss in
    float64, equal to the fp32 model's to fp32 precision, decoding with the cache equals full recompute
    to float64 precision, and the loss's gradient with respect to a few parameters passes gradcheck."""
    model64, model32 = tiny().double(), tiny()
    ids = torch.randint(0, 61, (2, 12))
    out64, out32 = model64(ids[:, :-1], ids[:, 1:]), model32(ids[:, :-1], ids[:, 1:])
    assert out64.logits.dtype == out64.loss.dtype == torch.float64
    assert out64.loss.item() == pytest.approx(out32.loss.item(), rel=1e-5)
    out64.loss.backward()  # the training path (grouped_mm takes no float64: it runs as the loop backend)
    model64.zero_grad(set_to_none=True)

    with torch.no_grad():
        full = model64(ids).logits
        cache = KVCache.empty(model64.config, 2, 16, dtype=torch.float64)
        steps = [model64(ids[:, :6], cache=cache).logits] + [model64(ids[:, t : t + 1], cache=cache).logits for t in range(6, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)

    names = ["layers.0.moe.router.weight", "layers.1.ffn_norm.weight", "norm.weight"]
    params = dict(model64.named_parameters())

    def loss(*ws):
        return torch.func.functional_call(model64, {**params, **dict(zip(names, ws))}, (ids[:, :-1], ids[:, 1:])).loss

    assert torch.autograd.gradcheck(loss, tuple(params[n].detach().clone().requires_grad_(True) for n in names))
