"""Products with weights held in their stored precision (fp16): a decode step reads every weight once, so it is
bound by memory bandwidth, and fp16 weights are half the bytes of float32 ones.

Three ways, all computing the op in float32 from fp16 operands (CoreML's fp16 semantics):

- one column (a decode step's projections) whose output is rounded to fp16 right after (fp16 mode): the project's
  fp16 GEMV (_fp16.c), rows split over the CPU's cores. It widens each weight in registers and sums the
  float32 products in another order than numpy's BLAS: an output differs from the float32-weight path by at most
  one fp16 ulp, and rarely (about 0.2 % of outputs here). It streams fp16 weights at the rate float32 GEMV streams
  float32 ones (30.9 against 31.4 GB/s on an Intel Xeon with AVX-512), so a token takes half the time. torch's
  fp16 GEMV, used before, did so on an AMD EPYC but streamed 9 GB/s on that Xeon (another code path).
- several such columns (prefill batches) on a CPU where torch computes fp16 GEMMs with oneDNN (AVX512-FP16 or
  AMX-FP16): torch's fp16 GEMM, float32 accumulation, the result rounded to fp16 once; like the GEMV, another
  order of the same sums (0.3-0.5 % of outputs one fp16 ulp apart). On that Xeon a 64-row batch's products took
  0.5 s against 1.0 s for the blocked path below, which spends a third of its time widening weights.
- anything else (prefill batches elsewhere, float32 activations): the weight's rows widened to float32 a block at
  a time into a reused buffer, each block multiplied by numpy's BLAS: the same products as a float32 weight, and
  in the shapes converted models use (1 or 64 columns) the same sums, bit for bit (BLAS splits its work by rows
  too; for other column counts its kernel choice may depend on the row count, and the sums' order with it).
FAST_GEMV and FAST_GEMM off: the blocked path for everything, bit-identical to float32-resident weights.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import numpy as np

from . import _fp16, fp16

# one float32 block, reused (no page faults). Each block is one BLAS call, and each call hands work to BLAS's
# threads: on a busy 2-core machine a 7-matrix layer at batch 64 took 3.6x the float32-weight time with 4 MB
# blocks, 1.9x with 8 MB, 1.14x with 32 MB (the last-level cache's size)
BLOCK_BYTES = 32 << 20
FAST_GEMV = True  # the fp16 GEMV for single columns rounded to fp16; off: the blocked path
FAST_GEMM = True  # torch's oneDNN fp16 GEMM, where it has one, for several columns rounded to fp16; off: the blocked path
SPLIT = 1 << 18  # weights: from this many on, a GEMV's rows are split over the cores
_buffers = threading.local()  # one block buffer per thread: no allocation per call


def weight_product(w: np.ndarray, x: np.ndarray, fp16_values: bool = False) -> np.ndarray:
    """w (O, I) float16 times x (I, T) float32: (O, T) float32. `fp16_values`: x holds fp16 values and the caller
    rounds the result to fp16 (what lets the fp16 GEMV compute it)."""
    if fp16_values and FAST_GEMV and x.shape[1] == 1:
        return _gemv(np.ascontiguousarray(w), np.ascontiguousarray(x[:, 0]))[:, None]
    if fp16_values and FAST_GEMM and onednn_fp16_gemm():
        torch = _torch()  # x holds fp16 values: exact in fp16; the product comes back rounded to fp16
        product = torch.mm(torch.from_numpy(np.ascontiguousarray(w)), torch.from_numpy(np.ascontiguousarray(x)).half())
        return product.float().numpy()
    return _blocked(w, x)


@functools.cache
def onednn_fp16_gemm() -> bool:
    """Whether torch computes fp16 GEMMs with oneDNN here: its own condition (ATen's mkldnn_fp16_device_check), a
    CPU with AVX512-FP16 or AMX-FP16. Elsewhere its fp16 GEMM is scalar code, ~20x slower than float32 BLAS."""
    torch = _torch()
    if torch is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return "avx512_fp16" in flags or "amx_fp16" in flags


@contextlib.contextmanager
def threads_for_products(fp16_weights: bool):
    """Around a program run: where torch's oneDNN computes the fp16 weights' GEMMs, numpy's BLAS (attention's
    small products) runs on the calling thread meanwhile. OpenBLAS's threads spin for a while after each call and
    take the cores torch's GEMM threads need: a 1B model's 512-token prefill took 10.0 s with them, 5.8 s
    without."""
    blas = _blas() if fp16_weights and FAST_GEMM and onednn_fp16_gemm() else None
    if blas is None:
        yield
        return
    with blas.limit(limits=1):
        yield


@functools.cache
def _torch():
    try:
        import torch
    except (ImportError, OSError):  # not installed, or a build whose libraries do not load: no oneDNN GEMM
        return None
    return torch


@functools.cache
def _blas():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController().select(user_api="blas")


def _gemv(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    rows, cols = w.shape
    out = np.empty(rows, np.float32)
    _fp16.gemv(w, x, out, cols, fp16.ISA, _cores() if w.size >= SPLIT else 1)
    return out


def _blocked(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    rows, cols = w.shape
    step = min(rows, max(1, BLOCK_BYTES // (4 * cols)))
    out = np.empty((rows, x.shape[1]), np.float32)
    buffer = _buffer(step * cols)  # a weight smaller than a block is widened into it too: no float32 copy of its own
    x = np.ascontiguousarray(x)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        block = buffer[:n * cols].reshape(n, cols)
        fp16.widen_into(block, w[start:start + n])
        np.matmul(block, x, out=out[start:start + n])
    return out


@functools.cache
def _cores() -> int:
    """The cores this process may run on: the GEMV's threads (the caller's among them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _buffer(size: int) -> np.ndarray:
    buf = getattr(_buffers, "block", None)
    if buf is None or buf.size < size:
        buf = _buffers.block = np.empty(size, np.float32)
    return buf
