"""``materialize``: a copy of a tensor that ``torch.compile`` cannot fuse into its consumers.

Inductor inlines cheap producers (a RoPE rotation, a softmax, a SwiGLU) into every consumer. When the
consumer is a reduction that reads each element many times -- a single-query attention product, a
per-slot expert product in the compiled decode step -- the producer would be recomputed for every
output. Passing the tensor through this opaque op makes the compiler compute it once, into a buffer.
Eager, it is a ``clone``.
"""

from __future__ import annotations

import torch

# an opaque op for the compiler; ``torch.library.define`` rather than ``custom_op``, whose Python wrapper
# costs ~15 us more per call (see ``linear.py``)
torch.library.define("moelab::materialize", "(Tensor x) -> Tensor")


@torch.library.impl("moelab::materialize", "CompositeExplicitAutograd")
def _materialize(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@torch.library.register_fake("moelab::materialize")
def _(x):
    return torch.empty_like(x)


def materialize(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` that ``torch.compile`` cannot fuse into its consumers (an opaque op): forces the
    compiler to compute ``x`` once instead of inlining its producer into every use."""
    return torch.ops.moelab.materialize(x)
