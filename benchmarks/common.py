"""Timing helpers shared by the benchmarks.

Ratios are what we report: every implementation in a table is measured in the same process, in
interleaved rounds (A, B, C, A, B, C, ...), so slow drifts of the machine (thermal, other processes)
affect all columns alike. A time is the median over rounds; a ratio to a reference is the median of
the per-round ratios (:func:`paired_ratios`), which cancels drift between rounds as well, with its
interquartile range as the measured noise.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from moelab.allocator import allocator_state, keep_freed_memory
from moelab.blas import mkl_reproducibility
from moelab.errors import MoelabError
from moelab.io import atomic_write_json


def interleaved_times(
    fns: dict[str, Callable[[], object]], rounds: int = 7, warmup: int = 2, min_seconds: float = 0.0, number: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each function in every round (``rounds`` or more, until ``min_seconds``
    have passed), measured round-robin.

    Each sample times ``number`` back-to-back calls (use > 1 for calls of ~100 us, whose single
    timings are dominated by timer and scheduling noise). Each round runs the functions in a fresh
    order (a permutation seeded by the round number, so runs are repeatable), so no function always
    runs right after the same other one, whose leftovers (cache contents, freed memory, clock
    frequency) it would otherwise always inherit. Rotating one fixed order would not do that: it
    keeps every function's predecessor.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    r = 0
    while r < rounds or time.perf_counter() - start < min_seconds:
        order = names[:]
        random.Random(r).shuffle(order)
        for name in order:
            fn = fns[name]
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            times[name].append((time.perf_counter() - t0) / number)
        r += 1
    return times


def paired_ratios(times: dict[str, list[float]], reference: str) -> dict[str, dict[str, float]]:
    """Each function's time over the reference's, round by round (both measured in the same round, so
    a slow phase of the machine scales both): ``{name: {"median", "q1", "q3"}}`` of the per-round
    ratios; ``q1``-``q3`` (interquartile range) shows how much the ratio moved between rounds."""
    ref = times[reference]
    out = {}
    for name, ts in times.items():
        ratios = [t / r for t, r in zip(ts, ref)]
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else (ratios[0],) * 3
        out[name] = {"median": statistics.median(ratios), "q1": q1, "q3": q3}
    return out


def summarise(times: dict[str, list[float]], reference: str) -> dict:
    """What a benchmark stores for one comparison: ``seconds`` (median per function), ``ratio`` (median
    per-round ratio to ``reference``) and ``ratio_iqr`` (its interquartile range, ``(q1, q3)``)."""
    ratios = paired_ratios(times, reference)
    return {"seconds": {n: statistics.median(ts) for n, ts in times.items()},
            "ratio": {n: r["median"] for n, r in ratios.items()},
            "ratio_iqr": {n: (r["q1"], r["q3"]) for n, r in ratios.items()}}


def ratio_text(ratio: float, iqr: tuple[float, float] | None = None) -> str:
    """``1.27 (1.22-1.31)``: a ratio with its interquartile range, when known."""
    return f"{ratio:.2f}" + (f" ({iqr[0]:.2f}-{iqr[1]:.2f})" if iqr else "")


def setup() -> None:
    """Every benchmark's first step: keep freed CPU memory for reuse
    (:func:`moelab.allocator.keep_freed_memory`), so that an implementation whose temporaries exceed
    glibc's 32 MiB mmap threshold is not timed paying a page fault per 4 KiB page on every call. With
    glibc's defaults the dense floor of the wide layer shapes (hidden width 1 024 at 4 096 tokens:
    33.5 MB activations) paid them and moelab's layer (its blocks then under 4 MiB) did not, which flattered the
    layer's ratios (E 64: 1.29x the floor with glibc's defaults, 1.70x with freed memory kept, in two runs
    of ``benchmarks/moe_layer.py`` minutes apart). As in the
    ``moelab`` command, ``MOELAB_SYSTEM_MALLOC=1`` keeps the defaults; the JSON records which was used.
    A value of that variable it does not understand ends the run with a one-line error (exit 1)."""
    try:
        keep_freed_memory()
    except MoelabError as e:
        raise SystemExit(f"error: {e}") from None


def machine_info() -> dict:
    return {
        "allocator": allocator_state(),
        "mkl_reproducibility": mkl_reproducibility(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """Plain-text table (rich when available) so output can be pasted into notes."""
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for c in columns:
            table.add_column(c, justify="right" if c not in (columns[0],) else "left")
        for row in rows:
            table.add_row(*row)
        Console(width=200).print(table)
    except ImportError:  # pragma: no cover
        print(title)
        print(" | ".join(columns))
        for row in rows:
            print(" | ".join(row))


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` as JSON atomically (creating the folder)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, payload)
