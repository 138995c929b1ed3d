"""Products with weights held in their stored precision (fp16): a decode step reads every weight once, so it is
bound by memory bandwidth, and fp16 weights are half the bytes of float32 ones.

Two ways, both computing the op in float32 from fp16 operands (CoreML's fp16 semantics):

- one column (a decode step's projections) whose inputs are fp16 values and whose output is rounded to fp16 right
  after (fp16 mode): torch's fp16 GEMV, which reads the fp16 weight, accumulates the exact fp16 x fp16 products in
  float32 and rounds the sum to fp16 once. The sums run in another float32 order than numpy's BLAS: an output
  differs from the float32-weight path by at most one fp16 ulp, and rarely (about 0.2 % of outputs here).
  On this project's machine (AMD EPYC, AVX-512, no AVX512-FP16) it streams fp16 weights at the rate float32 GEMV
  streams float32 ones, so a token takes half the time; its fp16 GEMM (several columns) is scalar code, ~20x
  slower than float32 BLAS, and is never used.
- anything else (prefill batches, float32 activations, no torch): the weight's rows widened to float32 a block at
  a time into a reused per-thread buffer small enough to stay in cache, each block multiplied by numpy's BLAS on
  one thread, the blocks shared out among as many worker threads as BLAS would use. The same products as a float32
  weight, and in the shapes converted models use (1 or 64 columns) the same sums, bit for bit: rows are
  independent, and BLAS splits its own work by rows too (for other column counts its kernel choice may depend on
  the row count, and the sums' order with it). Faster than float32 weights under BLAS's own threads: the fp16
  rows are half the bytes to stream, the widened block is still in cache when BLAS packs it, and no block waits
  for another thread (measured below).
"""
from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import fp16

# one float32 block per thread, reused (no page faults) and in cache when BLAS reads it. 2 MB: a 64-column prefill
# product of a 16384x2048 (8192x2048, 2048x8192) weight took 51 ms (11, 30) in 2 MB blocks against 64 ms (15, 29)
# for a float32 weight under BLAS's threads, 72 ms (32, 33) with one 32 MB block at a time, on 2 busy cores
BLOCK_BYTES = 4 << 20
FAST_GEMV = True  # torch's fp16 GEMV for single fp16 columns; off: the bit-exact blocked path for everything
_buffers = threading.local()  # one block buffer per thread: no allocation per call


def weight_product(w: np.ndarray, x: np.ndarray, fp16_values: bool = False) -> np.ndarray:
    """w (O, I) float16 times x (I, T) float32: (O, T) float32. `fp16_values`: x holds fp16 values and the caller
    rounds the result to fp16 (what lets the fp16 GEMV compute it)."""
    if fp16_values and FAST_GEMV and x.shape[1] == 1:
        torch = fp16._torch()
        if torch is not None:
            column = torch.from_numpy(np.ascontiguousarray(x[:, 0]).astype(np.float16))
            return torch.mv(torch.from_numpy(w), column).numpy().astype(np.float32)[:, None]
    return _blocked(w, x)


def _blocked(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    rows, cols = w.shape
    step = max(1, BLOCK_BYTES // (4 * cols))
    if step >= rows:
        return fp16.widen(w) @ x
    out = np.empty((rows, x.shape[1]), np.float32)
    x = np.ascontiguousarray(x)
    starts = iter(range(0, rows, step))  # shared by the workers: next() on it is atomic under the GIL

    def work():
        buffer = _buffer(step * cols)
        for start in starts:  # each worker takes the next block: a worker on a busy core just takes fewer
            n = min(step, rows - start)
            block = buffer[:n * cols].reshape(n, cols)
            fp16.widen_into(block, w[start:start + n])
            np.matmul(block, x, out=out[start:start + n])

    workers = _workers(os.getpid())
    # one thread each for the conversion and for BLAS: the workers are the parallelism (see fp16.single_threaded).
    # One product at a time: each uses every core, and the thread limits are process-wide settings that two
    # overlapping products would restore out of order
    with workers.lock, fp16.single_threaded(), workers.blas.limit(limits=1):
        helpers = [workers.pool.submit(work) for _ in range(workers.count - 1)]
        work()
        for h in helpers:
            h.result()
    return out


class _Workers:
    """The threads that share a product's blocks: as many as BLAS would run (OPENBLAS_NUM_THREADS,
    OMP_NUM_THREADS or the cores), the caller being one of them."""

    def __init__(self):
        from threadpoolctl import ThreadpoolController

        self.blas = ThreadpoolController().select(user_api="blas")
        self.lock = threading.Lock()
        self.count = max([1] + [lib["num_threads"] for lib in self.blas.info()])
        self.pool = ThreadPoolExecutor(self.count - 1, thread_name_prefix="ane-eval-gemm") if self.count > 1 \
            else None


@functools.cache
def _workers(pid: int) -> _Workers:
    """Per process: a forked child inherits the pool but not its threads, and would wait on them forever."""
    return _Workers()


def _buffer(size: int) -> np.ndarray:
    buf = getattr(_buffers, "block", None)
    if buf is None or buf.size < size:
        buf = _buffers.block = np.empty(size, np.float32)
    return buf
