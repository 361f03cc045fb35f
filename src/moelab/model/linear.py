"""A bias-free ``nn.Linear`` that, for inference on CPU, multiplies by a pre-packed copy of its weight.

On this kind of CPU an fp32 matmul with few rows (a decoding step: M = batch size) runs 2-5x faster
through oneDNN with the weight reordered once into its blocked layout than through the default MKL
call that reads the ``[out, in]`` weight as stored (``benchmarks/generate.py``; e.g. a 16 x 256 x 32 000
LM head: 4.2 ms -> 0.9 ms). :class:`Linear` therefore keeps, next to a large weight, a packed copy made
on first use without autograd and re-made whenever the weight changes (its version counter or
storage), so training, loading a checkpoint or ``model.to(...)`` can never leave it stale. Small
weights (under :data:`PACK_MIN_BYTES`), other devices and dtypes use ``F.linear`` unchanged; training
on CPU uses :func:`moelab.model.weight_grad.linear` (``F.linear`` with a weight gradient summed over
tokens in a thread-count-independent order).
The packed copy costs the weight's size again in memory while the model is used for inference.
A weight made under ``torch.inference_mode()`` (an inference tensor) has no version counter, so it is
never packed: it multiplies with ``F.linear`` (a model built or loaded in inference mode works, without
the speed-up).

The packed multiply is the custom op ``moelab::packed_linear``, so ``torch.compile`` keeps it as one
call (its packed weight is looked up at run time, never baked into a graph).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .weight_grad import linear

#: Weights smaller than this multiply with ``F.linear``: packing does not pay for itself there.
PACK_MIN_BYTES = 1 << 19

_HAS_PACKED = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
#: How a stored weight becomes the ``[N, K]`` matrix of a product (``x @ matrix.T``):
#: ``"nk"`` as stored; ``"experts_gate_up"`` ``[E, 2F, D]`` -> ``[E*2F, D]`` (every expert's gate/up rows);
#: ``"experts_down"`` ``[E, D, F]`` -> ``[D, E*F]`` (a sum over experts of their down projections).
LAYOUTS = {
    "nk": lambda w: w,
    "experts_gate_up": lambda w: w.reshape(-1, w.shape[-1]),
    "experts_down": lambda w: w.permute(1, 0, 2).reshape(w.shape[1], -1),
}
_PACKED: dict[tuple[int, str], tuple[weakref.ref[torch.Tensor], int, int, torch.Tensor]] = {}


def _packed_weight(w: torch.Tensor, layout: str = "nk") -> torch.Tensor:
    """The oneDNN-packed copy of ``LAYOUTS[layout](w)``, made again when ``w`` was modified in place or
    re-allocated. Entries die with their weight."""
    key = (id(w), layout)
    hit = _PACKED.get(key)
    if hit is not None and hit[0]() is w and hit[1] == w._version and hit[2] == w.data_ptr():
        return hit[3]
    packed = torch.ops.mkldnn._reorder_linear_weight(LAYOUTS[layout](w.detach()).contiguous(), 16)
    _PACKED[key] = (weakref.ref(w, lambda _, key=key: _PACKED.pop(key, None)), w._version, w.data_ptr(), packed)
    return packed


# Registered with ``torch.library.define`` / ``impl`` rather than ``torch.library.custom_op``: the latter's
# Python wrapper (alias checks of the outputs) cost ~28 us per call against ~12 us here, eight calls per
# decoding step of a 4-layer model.
torch.library.define("moelab::packed_linear", "(Tensor x, Tensor w, str layout='nk') -> Tensor")


@torch.library.impl("moelab::packed_linear", "cpu")
def _packed_linear_cpu(x_MK: torch.Tensor, w: torch.Tensor, layout: str = "nk") -> torch.Tensor:
    if w.is_inference():  # made under torch.inference_mode(): no version counter to tell a stale copy by
        return F.linear(x_MK, LAYOUTS[layout](w))
    return torch.ops.mkldnn._linear_pointwise(x_MK, _packed_weight(w, layout), None, "none", [], "")


@torch.library.register_fake("moelab::packed_linear")
def _(x_MK, w, layout="nk"):
    return x_MK.new_empty(*x_MK.shape[:-1], LAYOUTS[layout](w).shape[0])


def packed_linear(x_MK: torch.Tensor, w: torch.Tensor, layout: str = "nk") -> torch.Tensor:
    """``x @ LAYOUTS[layout](w).T`` through the cached packed copy (CPU, no autograd)."""
    return torch.ops.moelab.packed_linear(x_MK, w, layout)


def use_packed(x: torch.Tensor, w_NK: torch.Tensor) -> bool:  # w_NK: any stored weight, by its size
    """Inference on CPU in fp32 with a weight of at least :data:`PACK_MIN_BYTES`."""
    return (
        _HAS_PACKED
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == w_NK.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and w_NK.numel() * 4 >= PACK_MIN_BYTES
    )


class Linear(nn.Linear):
    """``nn.Linear(in_features, out_features, bias=False)`` with the packed inference path above."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_packed(x, self.weight):
            return packed_linear(x, self.weight)
        return linear(x, self.weight)
