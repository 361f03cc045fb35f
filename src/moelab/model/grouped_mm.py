"""Grouped linear layer usable everywhere: eager and ``torch.compile``, CPU and GPU, fp32 and bf16.

``grouped_linear(x_SK, w_ENK, offsets_E)`` multiplies each contiguous group of rows of ``x`` (group
``e`` ends at row ``offsets_E[e]``) by its own ``w[e].T`` -- ``nn.Linear`` semantics with the
``[out, in]`` weight layout of every expert stacked into ``[E, N, K]``.

It wraps ``torch.nn.functional.grouped_mm``, whose compile-time (fake tensor) rules accept only bf16,
in a custom op with its own shape rule and backward, so a compiled model in fp32 works too; CUDA bf16
calls go to the native op, which inductor lowers to a fused kernel.

Backward, for ``y_s = x_s @ w_e(s)^T``: ``dx = grouped_mm(dy, w)`` and ``dw_e = dy_e^T @ x_e``, the
latter a 2-D x 2-D grouped matmul over the shared row dimension that lands directly in ``[E, N, K]``
(zero for experts with no rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _aligned(n: int, t: torch.Tensor) -> int:
    """``n`` rounded up so that ``n`` elements of ``t``'s dtype fill whole 16-byte units (``grouped_mm``
    needs 16-byte aligned strides: d_model and d_expert multiples of 8 in bf16, of 4 in fp32)."""
    per_16_bytes = max(1, 16 // t.element_size())
    return -(-n // per_16_bytes) * per_16_bytes


def _pad(t: torch.Tensor, *sizes: int) -> torch.Tensor:
    """Zero-pad the trailing ``len(sizes)`` dimensions of ``t`` up to ``sizes`` (no copy if already there)."""
    pad: list[int] = []
    for dim, size in zip(range(t.dim() - 1, t.dim() - 1 - len(sizes), -1), reversed(sizes)):
        pad += [0, size - t.shape[dim]]
    return t if not any(pad) else F.pad(t, pad)


def _is_aligned(t: torch.Tensor, *dims: int) -> bool:
    return all(_aligned(d, t) == d for d in dims)


# Unaligned sizes are zero-padded (zeros add nothing to the products) and the result sliced back.


@torch.library.custom_op("moelab::grouped_linear", mutates_args=())
def _grouped_linear(x_SK: torch.Tensor, w_ENK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    N, K = w_ENK.shape[1:]
    if _is_aligned(x_SK, N, K):
        return F.grouped_mm(x_SK, w_ENK.transpose(1, 2), offs=offsets_E)
    Np, Kp = _aligned(N, x_SK), _aligned(K, x_SK)
    y = F.grouped_mm(_pad(x_SK, Kp), _pad(w_ENK, Np, Kp).transpose(1, 2), offs=offsets_E)
    return y[:, :N].contiguous()


@_grouped_linear.register_fake
def _(x_SK, w_ENK, offsets_E):
    return x_SK.new_empty(x_SK.shape[0], w_ENK.shape[1])


@torch.library.custom_op("moelab::grouped_linear_dx", mutates_args=())
def _grouped_linear_dx(dy_SN: torch.Tensor, w_ENK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    N, K = w_ENK.shape[1:]
    if _is_aligned(dy_SN, N, K):
        return F.grouped_mm(dy_SN, w_ENK, offs=offsets_E)
    Np, Kp = _aligned(N, dy_SN), _aligned(K, dy_SN)
    return F.grouped_mm(_pad(dy_SN, Np), _pad(w_ENK, Np, Kp), offs=offsets_E)[:, :K].contiguous()


@_grouped_linear_dx.register_fake
def _(dy_SN, w_ENK, offsets_E):
    return dy_SN.new_empty(dy_SN.shape[0], w_ENK.shape[2])


@torch.library.custom_op("moelab::grouped_linear_dw", mutates_args=())
def _grouped_linear_dw(dy_SN: torch.Tensor, x_SK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    N, K = dy_SN.shape[1], x_SK.shape[1]
    if _is_aligned(x_SK, N, K):
        return F.grouped_mm(dy_SN.t(), x_SK, offs=offsets_E)
    Np, Kp = _aligned(N, x_SK), _aligned(K, x_SK)
    return F.grouped_mm(_pad(dy_SN, Np).t(), _pad(x_SK, Kp), offs=offsets_E)[:, :N, :K].contiguous()


@_grouped_linear_dw.register_fake
def _(dy_SN, x_SK, offsets_E):
    return dy_SN.new_empty(offsets_E.shape[0], dy_SN.shape[1], x_SK.shape[1])


def _setup_context(ctx, inputs, output):
    x_SK, w_ENK, offsets_E = inputs
    ctx.save_for_backward(x_SK, w_ENK, offsets_E)


def _backward(ctx, dy_SN):
    x_SK, w_ENK, offsets_E = ctx.saved_tensors
    dy_SN = dy_SN.contiguous()
    dx = _grouped_linear_dx(dy_SN, w_ENK, offsets_E) if ctx.needs_input_grad[0] else None
    dw = _grouped_linear_dw(dy_SN, x_SK, offsets_E) if ctx.needs_input_grad[1] else None
    return dx, dw, None


_grouped_linear.register_autograd(_backward, setup_context=_setup_context)


def grouped_linear(x_SK: torch.Tensor, w_ENK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """``[S, K] x [E, N, K] -> [S, N]``: row group ``e`` (ending at ``offsets_E[e]``, int32) times ``w[e].T``."""
    if x_SK.is_cuda and x_SK.dtype == torch.bfloat16 and _is_aligned(x_SK, *w_ENK.shape[1:]):
        return F.grouped_mm(x_SK, w_ENK.transpose(1, 2), offs=offsets_E)
    return _grouped_linear(x_SK, w_ENK, offsets_E)
