"""The weighted SwiGLU's backward: the fused (compiled) loop against the eager arithmetic and autograd."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import moelab.model.swiglu as sw
from moelab.model.swiglu import fused_weighted_swiglu_backward, swiglu_backward, weighted_swiglu, weighted_swiglu_backward


def _autograd_reference(h, w, da):
    """dh, dw and the weighted activation from plain autograd in float64."""
    h64, w64 = (t.detach().double().clone().requires_grad_(True) for t in (h, w))
    gate, up = h64.chunk(2, dim=-1)
    a = F.silu(gate) * up * w64.unsqueeze(-1)
    a.backward(da.double())
    return h64.grad, w64.grad, a.detach()


@pytest.mark.parametrize("rows,f", [(2, 2), (37, 13), (300, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_backward_matches_autograd_and_eager(rows, f, dtype):
    g = torch.Generator().manual_seed(rows)
    h = (torch.randn(rows, 2 * f, generator=g) * 3).to(dtype)  # large |gate| too: the sigmoid's tails
    w, da = torch.rand(rows, generator=g).to(dtype), torch.randn(rows, f, generator=g).to(dtype)
    dh, dw, act_w = fused_weighted_swiglu_backward(h, w, da)
    assert (dh.dtype, dw.dtype, act_w.dtype) == (dtype,) * 3
    ref_dh, ref_dw, ref_a = _autograd_reference(h, w, da)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(dh.double(), ref_dh, **tol)
    torch.testing.assert_close(dw.double(), ref_dw, **tol)
    torch.testing.assert_close(act_w.double(), ref_a, **tol)
    eager_dh, eager_dw = weighted_swiglu_backward(h, w, da, True)
    torch.testing.assert_close(dh, eager_dh, **tol)
    torch.testing.assert_close(dw, eager_dw, **tol)


def test_fused_backward_bf16_computes_in_fp32():
    """bf16 inputs: the loop runs in fp32 and rounds once, so it is within bf16 rounding of float64."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 32, generator=g).bfloat16()
    w, da = torch.rand(64, generator=g), torch.randn(64, 16, generator=g).bfloat16()
    dh, dw, act_w = fused_weighted_swiglu_backward(h, w, da)
    assert (dh.dtype, dw.dtype, act_w.dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)
    ref_dh, ref_dw, ref_a = _autograd_reference(h, w, da)
    torch.testing.assert_close(dh.double(), ref_dh, rtol=8e-3, atol=1e-3)
    torch.testing.assert_close(dw.double(), ref_dw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(act_w.double(), ref_a, rtol=8e-3, atol=1e-3)


def test_fused_path_is_chosen_by_size_device_and_switch(monkeypatch):
    monkeypatch.setattr(sw, "FUSED_BACKWARD_MIN_ELEMENTS", 1000)
    assert sw.use_fused_backward(torch.empty(10, 100))
    assert not sw.use_fused_backward(torch.empty(10, 98))
    monkeypatch.setattr(sw, "FUSED_BACKWARD_MIN_ELEMENTS", None)
    assert not sw.use_fused_backward(torch.empty(100, 100))


@pytest.mark.parametrize("need_dw,need_act_w", [(True, True), (False, True), (True, False), (False, False)])
def test_swiglu_backward_fused_and_eager_agree(need_dw, need_act_w, monkeypatch):
    g = torch.Generator().manual_seed(1)
    h, w, da = torch.randn(40, 24, generator=g), torch.rand(40, generator=g), torch.randn(40, 12, generator=g)
    results = {}
    for threshold in (0, None):
        monkeypatch.setattr(sw, "FUSED_BACKWARD_MIN_ELEMENTS", threshold)
        results[threshold] = swiglu_backward(h, w, da, need_dw, need_act_w)
    for fused, eager in zip(results[0], results[None]):
        assert (fused is None) == (eager is None)
        if fused is not None:
            torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
    assert (results[0][1] is None) != need_dw and (results[0][2] is None) != need_act_w


def test_autograd_function_uses_the_fused_backward(monkeypatch):
    monkeypatch.setattr(sw, "FUSED_BACKWARD_MIN_ELEMENTS", 0)
    calls = []
    fused = sw.fused_weighted_swiglu_backward
    monkeypatch.setattr(sw, "fused_weighted_swiglu_backward", lambda *a: calls.append(1) or fused(*a))
    h = torch.randn(20, 2 * 7, dtype=torch.float64, requires_grad=True)
    w = torch.rand(20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(weighted_swiglu, (h, w))
    assert calls


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    """No C++ compiler for inductor, or any other failure of the compiled loop: one warning, and the
    eager arithmetic for that dtype from then on."""

    def broken(*args):
        raise RuntimeError("no compiler\nmore detail")

    monkeypatch.setattr(sw, "_fused_backward_compiled", broken)
    monkeypatch.setattr(sw, "_fused_backward_broken", set())
    monkeypatch.setattr(sw, "FUSED_BACKWARD_MIN_ELEMENTS", 0)
    h, w, da = torch.randn(8, 6), torch.rand(8), torch.randn(8, 3)
    with pytest.warns(RuntimeWarning, match="failed for torch.float32 .*no compiler\\);"):
        dh, dw, act_w = swiglu_backward(h, w, da, True, True)
    eager_dh, eager_dw = weighted_swiglu_backward(h, w, da, True)
    torch.testing.assert_close(dh, eager_dh)
    torch.testing.assert_close(dw, eager_dw)
    torch.testing.assert_close(act_w, F.silu(h[:, :3]) * h[:, 3:] * w[:, None])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the dtype is remembered
        assert not sw.use_fused_backward(h)
        swiglu_backward(h, w, da, True, True)
    assert sw.use_fused_backward(h.double())  # other dtypes are unaffected


def test_fused_backward_compiles_once_for_slices_and_sizes(monkeypatch):
    """Blocks are slices of larger tensors at varying offsets, with varying row counts and widths:
    the compiled loop handles them all without recompiling per block (dynamo's limit would fail)."""
    monkeypatch.setattr(sw, "FUSED_BACKWARD_MIN_ELEMENTS", 0)
    monkeypatch.setattr(sw, "_fused_backward_broken", set())
    g = torch.Generator().manual_seed(2)
    for f in (5, 8, 12):
        h_all, w_all, da_all = torch.randn(200, 2 * f, generator=g), torch.rand(200, generator=g), torch.randn(200, f, generator=g)
        for r0, r1 in [(0, 7), (7, 40), (40, 41), (41, 130), (130, 200), (3, 5)]:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                dh, dw, act_w = swiglu_backward(h_all[r0:r1], w_all[r0:r1], da_all[r0:r1].t().contiguous().t(), True, True)
            eager_dh, eager_dw = weighted_swiglu_backward(h_all[r0:r1], w_all[r0:r1], da_all[r0:r1], True)
            torch.testing.assert_close(dh, eager_dh, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(dw, eager_dw, rtol=1e-5, atol=1e-6)
    assert not sw._fused_backward_broken
