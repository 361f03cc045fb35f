"""moelab.model.linear: the packed-weight inference path equals F.linear and never goes stale."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelab.model import linear as linear_module
from moelab.model.linear import Linear, use_packed

pytestmark = pytest.mark.skipif(not linear_module._HAS_PACKED, reason="this torch has no oneDNN packed linear")


@pytest.fixture
def packed_always(monkeypatch):
    monkeypatch.setattr(linear_module, "PACK_MIN_BYTES", 0)


def calls(monkeypatch) -> list[str]:
    """Record the layout of every packed multiply."""
    seen: list[str] = []
    real = linear_module._packed_weight

    def counting(w, layout="nk"):
        seen.append(layout)
        return real(w, layout)

    monkeypatch.setattr(linear_module, "_packed_weight", counting)
    return seen


@pytest.mark.parametrize("shape", [(1, 64), (16, 64), (3, 5, 64)])
def test_packed_equals_f_linear(packed_always, monkeypatch, shape):
    lin = Linear(64, 300)
    x = torch.randn(*shape)
    seen = calls(monkeypatch)
    with torch.no_grad():
        y = lin(x)
    assert seen and y.shape == (*shape[:-1], 300)
    torch.testing.assert_close(y, F.linear(x, lin.weight), rtol=1e-5, atol=1e-5)


def test_packed_copy_follows_weight_changes(packed_always):
    lin = Linear(32, 48)
    x = torch.randn(4, 32)
    with torch.inference_mode():
        lin(x)
    with torch.no_grad():
        lin.weight.mul_(2)  # in-place update (an optimizer step): the version counter moves
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight), rtol=1e-5, atol=1e-5)
        lin.load_state_dict({"weight": torch.randn(48, 32)})  # copy_ into the same storage
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight), rtol=1e-5, atol=1e-5)
        lin.weight.data = torch.randn(48, 32)  # new storage
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight), rtol=1e-5, atol=1e-5)


def test_packed_entries_die_with_their_weight(packed_always):
    lin = Linear(32, 48)
    with torch.no_grad():
        lin(torch.randn(2, 32))
    key = (id(lin.weight), "nk")
    assert key in linear_module._PACKED
    del lin
    import gc

    gc.collect()
    assert key not in linear_module._PACKED


def test_training_autocast_small_weights_use_f_linear(monkeypatch):
    seen = calls(monkeypatch)
    big = Linear(256, 1024)  # 1 MiB: packed for inference
    x = torch.randn(4, 256, requires_grad=True)
    big(x).sum().backward()  # autograd: plain F.linear, gradients flow
    assert big.weight.grad is not None and x.grad is not None and not seen
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert big(x).dtype == torch.bfloat16 and not seen
    with torch.no_grad():
        assert not use_packed(x, Linear(16, 16).weight)  # small: not worth packing
        big(x)
    assert seen


def test_packed_linear_compiles_as_one_op(packed_always):
    """Inside torch.compile the packed multiply is an opaque op; the result still follows the weight."""
    lin = Linear(32, 40)
    fn = torch.compile(lambda x: lin(x) * 2, fullgraph=True)
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(fn(x), 2 * F.linear(x, lin.weight), rtol=1e-5, atol=1e-5)
        lin.weight.add_(1.0)
        torch.testing.assert_close(fn(x), 2 * F.linear(x, lin.weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["experts_gate_up", "experts_down"])
def test_expert_layouts(packed_always, monkeypatch, layout):
    """All experts in one product: ``[E, 2F, D]`` as ``[E*2F, D]`` and ``[E, D, F]`` as ``[D, E*F]``."""
    w = torch.randn(4, 6, 5)
    x = torch.randn(3, 5 if layout == "experts_gate_up" else 4 * 5)
    want = torch.cat([x @ w[e].T for e in range(4)], dim=1) if layout == "experts_gate_up" else sum(
        x[:, 5 * e : 5 * (e + 1)] @ w[e].T for e in range(4))
    with torch.no_grad():
        torch.testing.assert_close(linear_module.packed_linear(x, w, layout), want, rtol=1e-5, atol=1e-5)
        w.mul_(-1)  # the derived packed copy follows the weight too
        torch.testing.assert_close(linear_module.packed_linear(x, w, layout), -want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["nk", "experts_gate_up", "experts_down"])
def test_weights_made_in_inference_mode_are_not_packed(packed_always, monkeypatch, layout):
    """An inference tensor has no version counter: it multiplies unpacked, and in-place changes show."""
    seen = calls(monkeypatch)
    with torch.inference_mode():
        w = torch.randn(48, 32) if layout == "nk" else torch.randn(4, 6, 5)
        x = torch.randn(3, 32 if layout == "nk" else (5 if layout == "experts_gate_up" else 20))
        want = F.linear(x, linear_module.LAYOUTS[layout](w))
        torch.testing.assert_close(linear_module.packed_linear(x, w, layout), want, rtol=1e-5, atol=1e-5)
        w.mul_(-1)
        torch.testing.assert_close(linear_module.packed_linear(x, w, layout), -want, rtol=1e-5, atol=1e-5)
    assert not seen  # never packed


def test_model_built_in_inference_mode_runs_and_generates():
    """``moelab.build`` / load under ``torch.inference_mode()`` (a common way to load for evaluation):
    forward, eager and compiled decoding agree with a model built normally."""
    import moelab
    from moelab.data.tokenizer import ByteTokenizer
    from moelab.eval.generate import generate

    cfg = moelab.ModelConfig(vocab_size=257, d_model=64, n_layers=2, n_heads=4, d_expert=1024, n_experts=4, top_k=2)
    normal = moelab.build(cfg, seed=0).eval()
    with torch.inference_mode():
        inference = moelab.build(cfg, seed=0).eval()
        assert inference.lm_head.weight.is_inference()
        x = torch.randint(0, 257, (2, 12))
        torch.testing.assert_close(inference(x).logits, normal(x).logits, rtol=1e-5, atol=1e-5)
    tok, prompts = ByteTokenizer(), ["the cat", "a b c", "xyz", "hello"] * 4
    want = [g.token_ids for g in generate(normal, tok, prompts, max_new_tokens=6, batch_size=16)]
    assert [g.token_ids for g in generate(inference, tok, prompts, max_new_tokens=6, batch_size=16)] == want
    assert [g.token_ids for g in generate(inference, tok, prompts, max_new_tokens=6, batch_size=16, compile=True)] == want
