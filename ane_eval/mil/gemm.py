"""Products with weights held in their stored precision (fp16): a decode step reads every weight once, so it is
bound by memory bandwidth, and fp16 weights are half the bytes of float32 ones.

Three ways, all computing the op in float32 from fp16 operands (CoreML's fp16 semantics):

- one column (a decode step's projections) whose output is rounded to fp16 right after (fp16 mode): the project's
  fp16 GEMV (_fp16.c), rows split over the CPU's cores. It widens each weight in registers and sums the
  float32 products in another order than numpy's BLAS: an output differs from the float32-weight path by at most
  one fp16 ulp, and rarely (about 0.2 % of outputs here). It streams fp16 weights at the rate float32 GEMV streams
  float32 ones (30.9 against 31.4 GB/s on an Intel Xeon with AVX-512), so a token takes half the time. torch's
  fp16 GEMV, used before, did so on an AMD EPYC but streamed 9 GB/s on that Xeon (another code path).
- several such columns (prefill batches) whose output is rounded to fp16: where torch computes fp16 GEMMs with
  oneDNN (AVX512-FP16 or AMX-FP16) torch's fp16 GEMM, float32 accumulation, the result rounded to fp16 once
  (on an Intel Xeon a 64-row batch's products took 0.5 s against 1.0 s for the blocked path below); elsewhere,
  on CPUs with AVX-512, the project's GEMM (_fp16.c: each weight block widened into the L1 cache, float32 fused
  multiply-adds in k order), which never writes a float32 copy of the weights to memory: on a Zen 5 EPYC
  310-350 GF/s on a 64-row batch's products, against 130-160 for the blocked path and 160-185 for numpy's
  float32 BLAS on float32 weights. Like the GEMV, other orders of the same float32 sums: 0.3-0.5 % of fp16
  outputs one ulp apart from the blocked path.
- anything else (prefill batches on other CPUs, float32 activations): the weight's rows widened to float32 a
  block at a time into a reused buffer, each block multiplied by numpy's BLAS: the same products as a float32
  weight, and the same sums where BLAS sums a block of rows as it sums the whole product (OpenBLAS's SkylakeX
  kernels do in the shapes converted models use; its Haswell kernels, which it runs on a Zen 5 EPYC, do not).
The project's GEMM and GEMV each sum an output in an order that depends on nothing but the weight's row length:
a token's projections are the same bits in any prefill batch (and in any decode step), on any number of threads,
though the GEMV's order is not the GEMM's; attention's products in fp16 mode are the GEMM's for a prefill batch
and a decode step alike (invariant_products). FAST_GEMV and FAST_GEMM off: the blocked path and BLAS for
everything, the float32-weight path's numbers where BLAS's are the same in blocks.
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
FAST_GEMM = True  # for several columns rounded to fp16: torch's oneDNN fp16 GEMM or the AVX-512 one; off: the blocked path
SPLIT = 1 << 18  # weights: from this many on, a GEMV's rows are split over the cores
_buffers = threading.local()  # one block buffer per thread: no allocation per call


def weight_product(w: np.ndarray, x: np.ndarray, fp16_values: bool = False) -> np.ndarray:
    """w (O, I) float16 times x (I, T) float32: (O, T) float32. `fp16_values`: x holds fp16 values and the caller
    rounds the result to fp16 (what lets the fp16 GEMV compute it)."""
    if fp16_values and FAST_GEMV and x.shape[1] == 1:
        return _gemv(np.ascontiguousarray(w), np.ascontiguousarray(x[:, 0]))[:, None]
    kind = fast_gemm() if fp16_values else None
    if kind == "onednn":
        torch = _torch()  # x holds fp16 values: exact in fp16; the product comes back rounded to fp16
        product = torch.mm(torch.from_numpy(np.ascontiguousarray(w)), torch.from_numpy(np.ascontiguousarray(x)).half())
        return product.float().numpy()
    if kind == "avx512":
        return _gemm(w, x, _cores())
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


@functools.cache
def avx512_gemm() -> bool:
    """Whether the project's fp16-weight GEMM runs here (it needs AVX-512)."""
    return "avx512" in _fp16.isas()


def fast_gemm() -> str | None:
    """The GEMM fp16 mode's prefill batches take: 'onednn', 'avx512', or None (the blocked path)."""
    if not FAST_GEMM:
        return None
    return "onednn" if onednn_fp16_gemm() else "avx512" if avx512_gemm() else None


def invariant_products() -> bool:
    """Whether fp16 mode computes attention's products with the project's GEMM (AVX-512, FAST_GEMM on): each
    output summed in k order, the same value whatever the batch's rows, the slots or the threads. numpy's BLAS
    does not promise that: OpenBLAS's Haswell kernels (which it runs on a Zen 5 EPYC) change 70-90 % of a row's
    float32 sums when the row is multiplied alone instead of among 32, and with the thread count, so a token's
    scores would depend on the batch it came in and the process it ran in."""
    return FAST_GEMM and avx512_gemm()


def times_transposed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a (..., M, K) float32 times b (..., N, K) fp16, transposed: (..., M, N) float32 by the project's GEMM
    (invariant_products), the products exact, each output's sum in k order; one call for all leading dims."""
    rows, cols, m = b.shape[-2], b.shape[-1], a.shape[-2]
    threads = _cores() if rows * cols * m >= SPLIT * 16 else 1
    return _gemm(b, a.swapaxes(-1, -2), threads).swapaxes(-1, -2)


@contextlib.contextmanager
def threads_for_products(fp16_weights: bool):
    """Around a program run: where a GEMM of torch's or of the project's computes the fp16 weights' products,
    numpy's BLAS (the small products left on it) runs on the calling thread meanwhile. OpenBLAS's threads spin for a
    while after each call and take the cores the GEMM's threads need: a 1B model's 512-token prefill took 10.0 s
    with them, 5.8 s without (torch's GEMM, on an Intel Xeon)."""
    blas = _blas() if fp16_weights and fast_gemm() else None
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


def _gemm(w: np.ndarray, x: np.ndarray, threads: int) -> np.ndarray:
    """w (..., N, K) fp16 times x (..., K, M) float32: (..., N, M), one product per leading index."""
    *lead, rows, cols = w.shape
    out = np.empty(tuple(lead) + (rows, x.shape[-1]), np.float32)
    _fp16.gemm(np.ascontiguousarray(w), np.ascontiguousarray(x), out, cols, x.shape[-1], threads,
               int(np.prod(lead, dtype=np.int64)))
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
