"""SwiGLU activation times a per-row routing weight, with a hand-written backward.

``weighted_swiglu(h_S2F, w_S) = silu(h[:, :F]) * h[:, F:] * w[:, None]``.

Autograd would split ``h`` (and ``cat`` the two halves' gradients back), keep three intermediates
and run six elementwise kernels in backward; this version saves only ``h`` and ``w``, recomputes
``silu`` and writes both halves of ``dh`` in place, which matters on CPU where these memory-bound
ops cost as much as the expert matmuls for small ``d_expert``. The weight is applied in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision compute, the dtype itself otherwise."""
    return torch.promote_types(dtype, torch.float32)


class _WeightedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_S2F: torch.Tensor, w_S: torch.Tensor) -> torch.Tensor:
        gate, up = h_S2F.chunk(2, dim=-1)
        a_SF = F.silu(gate).mul_(up)
        if a_SF.dtype == _acc(a_SF.dtype):
            a_SF.mul_(w_S.unsqueeze(-1).to(a_SF.dtype))
        else:  # weight in fp32, result in the compute dtype
            a_SF = (a_SF.float() * w_S.unsqueeze(-1)).to(h_S2F.dtype)
        if ctx is not None:
            ctx.save_for_backward(h_S2F, w_S)
        return a_SF

    @staticmethod
    def backward(ctx, da_SF: torch.Tensor):
        h_S2F, w_S = ctx.saved_tensors
        gate, up = h_S2F.chunk(2, dim=-1)
        silu_gate = F.silu(gate)
        dh_S2F = torch.empty_like(h_S2F)
        d_gate, d_up = dh_S2F.chunk(2, dim=-1)
        dw_S = None
        if ctx.needs_input_grad[1]:  # d/dw of (silu(g) * u * w) = silu(g) * u
            acc = _acc(da_SF.dtype)
            dw_S = torch.linalg.vecdot(da_SF.to(acc), (silu_gate * up).to(acc)).to(w_S.dtype)
        da_w = (da_SF.to(_acc(da_SF.dtype)) * w_S.unsqueeze(-1)).to(h_S2F.dtype)
        torch.mul(da_w, silu_gate, out=d_up)
        torch.ops.aten.silu_backward.grad_input(da_w.mul_(up), gate, grad_input=d_gate)
        return dh_S2F, dw_S


def weighted_swiglu(h_S2F: torch.Tensor, w_S: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up * w`` for ``h = [gate | up]`` of shape ``[S, 2F]`` and fp32 weights ``[S]``."""
    if torch.is_grad_enabled() and (h_S2F.requires_grad or w_S.requires_grad):
        return _WeightedSwiGLU.apply(h_S2F, w_S)
    with torch.no_grad():  # inference: the same arithmetic without the autograd node
        return _WeightedSwiGLU.forward(None, h_S2F, w_S)
