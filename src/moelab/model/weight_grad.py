"""Weight gradients summed over tokens in a fixed order, so that CPU training does not depend on the
number of threads.

A weight gradient ``dW_NK = dy_TN.T @ x_TK`` is a sum over all ``T`` tokens of a batch. When its output
is small and ``T`` large (every projection of a small model, the router, the LM head, an expert that
receives many tokens), MKL splits that sum across threads, so its rounding -- and, after thousands of
steps, a run's whole trajectory -- depended on ``torch.get_num_threads()``: the same seed trained at one
and at two threads learned the synthetic reasoning task at different steps, or not at all. Every other
computation of a training step was measured equal bit for bit at 1 and 2 threads on that Xeon (forward
outputs, input gradients, gradient norm, fused AdamW, initialisation). On an AMD EPYC, MKL also
rounded products of 5-11 rows differently at 2 threads: :mod:`moelab.blas` turns on MKL's strict
reproducibility mode for that.

:func:`weight_grad` therefore cuts the tokens into chunks of :data:`TOKEN_CHUNK` rows, multiplies each
chunk with one BLAS call short enough not to be split across threads, and adds the chunk products in
token order. The result depends only on the shapes, never on the thread count (measured at 1-16
threads on 2 cores; ``tests/test_weight_grad.py`` checks 1-4 threads, run it on a machine with many
cores). It rounds differently from a plain ``mm``, so trajectories differ from before, and costs a
little: a training step on 2 cores took 2-5 % longer (``tiny`` preset 5 %, d_model 256 and ``small`` 2 %).

:class:`TokenOrderLinear` is ``F.linear`` whose weight gradient is :func:`weight_grad`; :func:`linear`
uses it where it matters (CPU, autograd recording, no autocast, not inside ``torch.compile``) and
``F.linear`` everywhere else. GPU kernels are not covered: their reductions are a separate matter
(``torch.use_deterministic_algorithms``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Rows per chunk of the token sum. On a 2-core Xeon, MKL split sums of 1 024 terms across threads
#: (small outputs, 2-16 threads) and no sum of up to 768; a chunk's product is one unsplit call. On a
#: 2-core AMD EPYC (AVX2) MKL split none of the tested sums (up to 8 192 terms), and the chunked sums
#: were equal at 1-16 threads there too. ``tests/test_weight_grad.py`` checks invariance at 1-4 threads.
TOKEN_CHUNK = 512


def is_one_product(n_tokens: int) -> bool:
    """Whether :func:`weight_grad` sums ``n_tokens`` tokens in a single product (one BLAS call, no
    chunks): then any caller making that same call per group gets its bits (the CPU experts' grouped
    weight gradients in ``moe.py``). Reads :data:`TOKEN_CHUNK` at call time."""
    return n_tokens <= TOKEN_CHUNK


def weight_grad(dy_TN: torch.Tensor, x_TK: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``dy_TN.T @ x_TK`` (``[N, K]``) summed over ``T`` in chunks of :data:`TOKEN_CHUNK` tokens, each
    chunk's product added in token order (``addmm_``): bitwise the same at any thread count. Written
    into ``out`` when given."""
    acc_NK = torch.mm(dy_TN[:TOKEN_CHUNK].t(), x_TK[:TOKEN_CHUNK], out=out)
    for t0 in range(TOKEN_CHUNK, dy_TN.shape[0], TOKEN_CHUNK):
        acc_NK.addmm_(dy_TN[t0 : t0 + TOKEN_CHUNK].t(), x_TK[t0 : t0 + TOKEN_CHUNK])
    return acc_NK


class TokenOrderLinear(torch.autograd.Function):
    """``F.linear(x, w)`` (no bias) whose weight gradient is :func:`weight_grad` over all leading
    dimensions of ``x`` flattened to tokens; the input gradient is ``dy @ w`` as in ``F.linear``."""

    @staticmethod
    def forward(ctx, x_TK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_TK, w_NK)
        return F.linear(x_TK, w_NK)

    @staticmethod
    def backward(ctx, dy_TN: torch.Tensor):
        x_TK, w_NK = ctx.saved_tensors
        dx = dy_TN.matmul(w_NK) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            dw = weight_grad(dy_TN.reshape(-1, dy_TN.shape[-1]), x_TK.reshape(-1, x_TK.shape[-1]))
        return dx, dw


def linear(x: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)``, with a thread-count-independent weight gradient when training on CPU."""
    if (
        w_NK.requires_grad
        and torch.is_grad_enabled()
        and x.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    ):
        return TokenOrderLinear.apply(x, w_NK)
    return F.linear(x, w_NK)
