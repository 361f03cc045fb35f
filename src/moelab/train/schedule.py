"""Learning-rate schedule: linear warmup, then cosine decay to a floor (a pure function of the step).

For optimizer update ``s`` (0-based) of a run of ``S`` updates, ``W`` warmup steps, peak ``lr`` and
floor ``m = min_ratio * lr``::

    lr(s) = lr * (s + 1) / W                                   for s < W
    lr(s) = m + (lr - m) * (1 + cos(pi * p)) / 2,  p = (s - W) / (S - W)   for W <= s

so update ``W - 1`` is the first at peak, ``lr(W) = lr`` and ``lr(S) = m`` (the value one past the last
update; ``p`` is clamped to 1 beyond). There is no scheduler state: resuming only needs the step.
"""

from __future__ import annotations

import math


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Learning rate for 0-based optimizer update ``step`` (see module docstring)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    floor = peak * min_ratio
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
