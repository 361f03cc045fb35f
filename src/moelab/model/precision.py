"""The accumulation dtype: where moelab says a computation runs "in fp32" (routing, the combine of the
experts' outputs, RMSNorm, RoPE, logits, the router losses) it means *at least* fp32 -- fp32 for
fp32, bf16 and fp16 tensors, float64 for a float64 model (so a float64 model, e.g. for
``torch.autograd.gradcheck``, loses no precision anywhere)."""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` promoted to at least fp32."""
    return torch.promote_types(dtype, torch.float32)


def to_acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in :func:`acc_dtype` (itself, no call, when already there)."""
    dtype = acc_dtype(t.dtype)
    return t if t.dtype == dtype else t.to(dtype)
