"""Keep freed CPU memory for reuse: stop glibc's malloc from mapping and unmapping large tensors.

By default glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it to the OS on ``free``. PyTorch's CPU allocator does not cache, so a tensor of
that size that is created every step -- the logits and their gradient (tokens x vocabulary x 4 bytes:
262 MB for 2 048 tokens and a 32 000-token vocabulary), a wide FFN's activations -- is new memory
every time, and its first touch costs a page fault per 4 KiB page: ~0.4 ms per MB on the 2-core
development machine, where cloning a 33 MB tensor took 12-15 ms instead of 2.6 ms.
``benchmarks/train_step.py`` with ``--vocab 32000`` (d 256, 2 layers, 8 x 256 tokens) measured a
dense training step at 1 237 ms with glibc's defaults and 794 ms with freed memory kept.

:func:`keep_freed_memory` sets ``mallopt(M_MMAP_MAX, 0)`` (every allocation from the heap, none
mapped on its own) and ``mallopt(M_TRIM_THRESHOLD, 2**31 - 1)`` (freed memory stays with the process),
which is what jemalloc or tcmalloc do by default and what the CUDA caching allocator does on GPUs.
The cost is that the process keeps its peak heap size until it exits. Only glibc (Linux) has these
settings; elsewhere it does nothing. The ``moelab`` command applies it at start-up unless
``MOELAB_SYSTEM_MALLOC=1`` (or true/yes/on); Python users may call it themselves (once, early).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

from .errors import ConfigError

# glibc <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
#: environment variable that keeps the system allocator's defaults when set to 1 (or true/yes/on)
OPT_OUT_ENV = "MOELAB_SYSTEM_MALLOC"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")

_state: str | None = None


def allocator_state() -> str:
    """What :func:`keep_freed_memory` did in this process: ``"kept freed memory (glibc mallopt ...)"``
    or ``"system default"`` (not called, opted out, not glibc, or ``mallopt`` refused)."""
    return _state or "system default"


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve large allocations from its heap and keep freed memory (see the module
    docstring). Returns True when the setting is in effect. Idempotent (the first call decides); does
    nothing when not on glibc or when ``MOELAB_SYSTEM_MALLOC=1``. Raises :class:`ConfigError` for any
    other value of that variable than 0/1, false/true, no/yes, off/on (or empty)."""
    global _state
    if _state is not None:
        return _state != "system default"
    opt_out = os.environ.get(OPT_OUT_ENV, "").strip().lower()
    if opt_out not in _TRUE + _FALSE:
        raise ConfigError(f"{OPT_OUT_ENV}={os.environ[OPT_OUT_ENV]!r} is not understood; set it to 1 to keep the system allocator or 0 (or unset it) to keep freed memory")
    if opt_out in _TRUE or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _state = "system default"
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        ok = False
    _state = "kept freed memory (glibc mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)" if ok else "system default"
    return ok
