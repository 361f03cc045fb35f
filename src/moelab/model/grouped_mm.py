"""Grouped matmul usable everywhere: eager and ``torch.compile``, CPU and GPU, fp32 and bf16.

``torch.nn.functional.grouped_mm(x_SK, w_EKN, offs=offsets_E)`` multiplies each contiguous group of
rows of ``x`` (group ``e`` ends at ``offsets_E[e]``) by its own ``w[e]``. Eagerly it runs on CPU in
any float dtype, but its compile-time (fake tensor) rules accept only bf16. This module wraps it in a
custom op with its own shape rule and backward, so a compiled model in fp32 works too; CUDA bf16
calls go to the native op, which inductor lowers to a fused kernel.

Backward, for ``y_s = x_s @ w_e(s)``: ``dx = grouped_mm(dy, w^T)`` and ``dw_e = x_e^T @ dy_e``, the
latter a 2-D x 2-D grouped matmul over the shared row dimension (zero for experts with no rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("moelab::grouped_mm", mutates_args=())
def _grouped_mm(x_SK: torch.Tensor, w_EKN: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(x_SK, w_EKN, offs=offsets_E)


@_grouped_mm.register_fake
def _(x_SK, w_EKN, offsets_E):
    return x_SK.new_empty(x_SK.shape[0], w_EKN.shape[-1])


@torch.library.custom_op("moelab::grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad(x_SK: torch.Tensor, dy_SN: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(x_SK.t(), dy_SN, offs=offsets_E)


@_grouped_mm_wgrad.register_fake
def _(x_SK, dy_SN, offsets_E):
    return x_SK.new_empty(offsets_E.shape[0], x_SK.shape[1], dy_SN.shape[1])


def _setup_context(ctx, inputs, output):
    x_SK, w_EKN, offsets_E = inputs
    ctx.save_for_backward(x_SK, w_EKN, offsets_E)


def _backward(ctx, dy_SN):
    x_SK, w_EKN, offsets_E = ctx.saved_tensors
    dy_SN = dy_SN.contiguous()
    dx = _grouped_mm(dy_SN, w_EKN.transpose(1, 2), offsets_E) if ctx.needs_input_grad[0] else None
    dw = _grouped_mm_wgrad(x_SK, dy_SN, offsets_E) if ctx.needs_input_grad[1] else None
    return dx, dw, None


_grouped_mm.register_autograd(_backward, setup_context=_setup_context)


def grouped_mm(x_SK: torch.Tensor, w_EKN: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """``[S, K] x [E, K, N] -> [S, N]`` over expert-contiguous row groups ending at ``offsets_E`` (int32)."""
    if x_SK.is_cuda and x_SK.dtype == torch.bfloat16:
        return F.grouped_mm(x_SK, w_EKN, offs=offsets_E)
    return _grouped_mm(x_SK, w_EKN, offsets_E)
