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


# --- CPU in bf16 / fp16: oneDNN matmuls with bucketed row counts ------------------------------------
# On CPU a half-precision matmul runs through oneDNN, which builds (JIT-compiles) a kernel for every new
# (M, N, K) and caches it: ~2 ms for a new shape against ~0.2 ms for a cached one ([512, 1001] x
# [1001, 128] in bf16). Expert row counts change every training step, so ``grouped_mm``'s per-group
# matmuls would build new kernels all the time (bf16 training measured 3-5x slower than fp32). Rounding
# each group's rows up to one of a few sizes (zero rows appended) keeps the set of shapes small.


def _row_bucket(n: int) -> int:
    """``n`` rounded up to ``m * 2**j`` with ``8 <= m < 16`` (``n <= 16``: ``n`` itself): at most 12.5 %
    more rows, and 8 sizes per octave -- about 100 shapes up to 65 536 rows."""
    if n <= 16:
        return n
    step = 1 << (n.bit_length() - 4)  # n has 4 leading binary digits m (8 <= m < 16) above this unit
    return -(-n // step) * step


def _uses_onednn(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16)


def _group_bounds(offsets_E: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(expert, first_row, n_rows)`` of every non-empty group."""
    ends = offsets_E.tolist()
    return [(e, s0, s1 - s0) for e, (s0, s1) in enumerate(zip([0, *ends[:-1]], ends)) if s1 > s0]


def _padded_rows(t: torch.Tensor, s0: int, n: int) -> torch.Tensor:
    """Rows ``s0 : s0 + n`` of ``t``, zero rows appended up to ``_row_bucket(n)`` (a view if none are)."""
    rows = t[s0 : s0 + n]
    b = _row_bucket(n)
    return rows if b == n else F.pad(rows, (0, 0, 0, b - n))


def _bucketed_rows_mm(x_SA: torch.Tensor, w_EAB: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """``[S, A] x [E, A, B] -> [S, B]``: row group ``e`` of ``x`` times ``w[e]``, each group's rows bucketed."""
    out = x_SA.new_zeros(x_SA.shape[0], w_EAB.shape[2])
    for e, s0, n in _group_bounds(offsets_E):
        out[s0 : s0 + n] = (_padded_rows(x_SA, s0, n) @ w_EAB[e])[:n]
    return out


def _bucketed_weight_grad(dy_SN: torch.Tensor, x_SK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """``dw[e] = dy_e^T @ x_e`` over each group's rows, bucketed with zero rows (which add nothing)."""
    dw = dy_SN.new_zeros(offsets_E.shape[0], dy_SN.shape[1], x_SK.shape[1])
    for e, s0, n in _group_bounds(offsets_E):
        torch.mm(_padded_rows(dy_SN, s0, n).t(), _padded_rows(x_SK, s0, n), out=dw[e])
    return dw


@torch.library.custom_op("moelab::grouped_linear", mutates_args=())
def _grouped_linear(x_SK: torch.Tensor, w_ENK: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    N, K = w_ENK.shape[1:]
    if _uses_onednn(x_SK):
        return _bucketed_rows_mm(x_SK, w_ENK.transpose(1, 2), offsets_E)
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
    if _uses_onednn(dy_SN):
        return _bucketed_rows_mm(dy_SN, w_ENK, offsets_E)
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
    if _uses_onednn(x_SK):
        return _bucketed_weight_grad(dy_SN, x_SK, offsets_E)
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
