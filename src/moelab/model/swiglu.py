"""SwiGLU activation times a per-row routing weight, with a hand-written backward.

``weighted_swiglu(h_S2F, w_S) = silu(h[:, :F]) * h[:, F:] * w[:, None]``.

Autograd would split ``h`` (and ``cat`` the two halves' gradients back), keep three intermediates
and run six elementwise kernels in backward; this version saves only ``h`` and ``w``, recomputes
``silu`` and writes both halves of ``dh`` in place, which matters on CPU where these memory-bound
ops cost as much as the expert matmuls for small ``d_expert``. The weight is applied in fp32.

The forward and backward arithmetic are also exposed as plain functions
(:func:`weighted_swiglu_forward`, :func:`weighted_swiglu_backward`) for callers that run them inside
their own autograd function (the blocked CPU experts in ``moe.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .precision import acc_dtype


def weighted_swiglu_forward(h_S2F: torch.Tensor, w_S: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up * w`` as ``[S, F]`` in ``h``'s dtype, the weight applied in fp32. No autograd."""
    gate, up = h_S2F.chunk(2, dim=-1)
    a_SF = F.silu(gate).mul_(up)
    if a_SF.dtype == acc_dtype(a_SF.dtype):
        return a_SF.mul_(w_S.unsqueeze(-1).to(a_SF.dtype))
    return (a_SF.float() * w_S.unsqueeze(-1)).to(h_S2F.dtype)  # weight in fp32, result in the compute dtype


def weighted_swiglu_backward(
    h_S2F: torch.Tensor,
    w_S: torch.Tensor,
    da_SF: torch.Tensor,
    need_dw: bool,
    silu_gate_SF: torch.Tensor | None = None,
    act_SF: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dh_S2F, dw_S)`` for ``a = silu(gate) * up * w`` given ``da``; ``dw_S`` is None unless
    ``need_dw``. A caller that already has them may pass ``silu_gate_SF = silu(gate)`` and the
    unweighted activation ``act_SF = silu(gate) * up``."""
    gate, up = h_S2F.chunk(2, dim=-1)
    silu_gate = F.silu(gate) if silu_gate_SF is None else silu_gate_SF
    dh_S2F = torch.empty_like(h_S2F)
    d_gate, d_up = dh_S2F.chunk(2, dim=-1)
    dw_S = None
    if need_dw:  # d/dw of (silu(g) * u * w) = silu(g) * u
        acc = acc_dtype(da_SF.dtype)
        act = silu_gate * up if act_SF is None else act_SF
        dw_S = torch.linalg.vecdot(da_SF.to(acc), act.to(acc)).to(w_S.dtype)
    da_w = (da_SF.to(acc_dtype(da_SF.dtype)) * w_S.unsqueeze(-1)).to(h_S2F.dtype)
    torch.mul(da_w, silu_gate, out=d_up)
    torch.ops.aten.silu_backward.grad_input(da_w.mul_(up), gate, grad_input=d_gate)
    return dh_S2F, dw_S


class _WeightedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_S2F: torch.Tensor, w_S: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h_S2F, w_S)
        return weighted_swiglu_forward(h_S2F, w_S)

    @staticmethod
    def backward(ctx, da_SF: torch.Tensor):
        h_S2F, w_S = ctx.saved_tensors
        return weighted_swiglu_backward(h_S2F, w_S, da_SF, ctx.needs_input_grad[1])


def weighted_swiglu(h_S2F: torch.Tensor, w_S: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up * w`` for ``h = [gate | up]`` of shape ``[S, 2F]`` and fp32 weights ``[S]``."""
    if torch.is_grad_enabled() and (h_S2F.requires_grad or w_S.requires_grad):
        return _WeightedSwiGLU.apply(h_S2F, w_S)
    with torch.no_grad():  # inference: the same arithmetic without the autograd node
        return weighted_swiglu_forward(h_S2F, w_S)
