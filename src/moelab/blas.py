"""The same CPU matmul bits at any thread count: MKL's strict conditional numerical reproducibility.

On a 2-core AMD EPYC (AVX2), MKL's fp32 GEMM rounded products with 5, 6, 7, 9, 10 or 11 rows
differently at 2 threads than at 1 (every inner size 32-512 and output width 32-1 024 tried; 1-4, 8
and 12-64 rows were equal at both). Such products are common in MoE training: an expert that
receives that many tokens, forward and backward. So a seeded run's trajectory depended on
``torch.get_num_threads()``: the 40-step run of ``tests/test_train_resume.py`` logged a different
gradient norm from step 4 on at 1 and 2 threads, and a run resumed at another thread count than it
started with did not repeat the uninterrupted one.

MKL's strict CNR mode (``MKL_CBWR=AUTO,STRICT``) makes its GEMM results independent of the thread
count on a given CPU (results still differ between CPU types, as any rounding does). Measured there,
it cost nothing within noise (a ``tiny`` training step and MoE layers forward+backward at E 8-256,
three alternating processes each) and left the fixed-seed training states of
``tests/test_weight_grad.py`` unchanged bit for bit at 1 and at 2 threads. The weight gradients' own
fixed token order (:mod:`moelab.model.weight_grad`) stays: it does not rely on the BLAS.

MKL reads the variable once, at its first call, and cannot change mode afterwards. Importing
``moelab`` sets it unless it is set already (a user's own ``MKL_CBWR`` wins), so import moelab before
running any torch matmul; :func:`mkl_reproducibility` says what is in effect. Builds without MKL
ignore the variable.
"""

from __future__ import annotations

import ctypes
import os

ENV = "MKL_CBWR"
STRICT_SETTING = "AUTO,STRICT"
# mkl_cbwr_get(MKL_CBWR_ALL): the branch in the low bits, MKL_CBWR_STRICT = 0x10000 (mkl_service.h)
_MKL_CBWR_ALL, _MKL_CBWR_STRICT, _MKL_CBWR_OFF = -1, 0x10000, 1


def request_strict_reproducibility() -> None:
    """Ask MKL for strict CNR unless ``MKL_CBWR`` is set already (called when moelab is imported)."""
    os.environ.setdefault(ENV, STRICT_SETTING)


def mkl_reproducibility() -> str:
    """``"strict"`` (same bits at any thread count), ``"off"`` (MKL was used before moelab was imported,
    or ``MKL_CBWR`` chose no mode), ``"<mode>, not strict"``, or ``"unknown"`` (no MKL in this torch).
    Reading the mode fixes it: call this after moelab is imported."""
    try:
        import torch

        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        get = lib.mkl_serv_cbwr_get  # mkl_cbwr_get's name inside torch's statically linked MKL
    except (OSError, AttributeError):
        return "unknown"
    get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
    mode = get(_MKL_CBWR_ALL)
    if mode < 0:
        return "unknown"
    if mode & _MKL_CBWR_STRICT:
        return "strict"
    return "off" if mode == _MKL_CBWR_OFF else f"mode {mode}, not strict"
