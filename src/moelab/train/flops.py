"""Achieved-FLOP/s yardstick: the measured dense matmul rate of this machine (for MFU).

``measure_matmul_flops`` times ``n x n @ n x n`` products (``2 n^3`` FLOPs each) and returns FLOP/s.
:func:`peak_flops` caches one measurement per (device, dtype) for the life of the process, so MFU
on CPU reads "fraction of what a large fp32 matmul achieves here", not a datasheet number.
"""

from __future__ import annotations

import functools
import time

import torch


def measure_matmul_flops(n: int = 1024, dtype: torch.dtype = torch.float32, device: str = "cpu", min_seconds: float = 0.3) -> float:
    """FLOP/s of repeated ``[n, n] @ [n, n]`` matmuls (best of a few timed rounds after a warm-up)."""
    a = torch.randn(n, n, dtype=dtype, device=device, generator=None)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    sync()
    best, spent, reps = 0.0, 0.0, 1
    while spent < min_seconds:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        dt = time.perf_counter() - t0
        spent += dt
        best = max(best, 2 * n**3 * reps / dt)
        reps *= 2
    return best


@functools.lru_cache(maxsize=None)
def peak_flops(device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Cached :func:`measure_matmul_flops` (larger matrices on GPU); does not disturb the global RNG."""
    state = torch.random.get_rng_state()
    try:
        n = 8192 if device.startswith("cuda") else 1024
        return measure_matmul_flops(n=n, dtype=dtype, device=device)
    finally:
        torch.random.set_rng_state(state)
