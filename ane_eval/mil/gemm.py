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
  a time into a reused buffer, each block multiplied by numpy's BLAS: the same products as a float32 weight, and
  in the shapes converted models use (1 or 64 columns) the same sums, bit for bit (BLAS splits its work by rows
  too; for other column counts its kernel choice may depend on the row count, and the sums' order with it).
"""
from __future__ import annotations

import threading

import numpy as np

from . import fp16

# one float32 block, reused (no page faults). Each block is one BLAS call, and each call hands work to BLAS's
# threads: on a busy 2-core machine a 7-matrix layer at batch 64 took 3.6x the float32-weight time with 4 MB
# blocks, 1.9x with 8 MB, 1.14x with 32 MB (the last-level cache's size)
BLOCK_BYTES = 32 << 20
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
    step = min(rows, max(1, BLOCK_BYTES // (4 * cols)))
    out = np.empty((rows, x.shape[1]), np.float32)
    buffer = _buffer(step * cols)  # a weight smaller than a block is widened into it too: no float32 copy of its own
    x = np.ascontiguousarray(x)
    with fp16.single_threaded():  # the conversion's torch threads would spin against BLAS's (see fp16.py)
        for start in range(0, rows, step):
            n = min(step, rows - start)
            block = buffer[:n * cols].reshape(n, cols)
            fp16.widen_into(block, w[start:start + n])
            np.matmul(block, x, out=out[start:start + n])
    return out


def _buffer(size: int) -> np.ndarray:
    buf = getattr(_buffers, "block", None)
    if buf is None or buf.size < size:
        buf = _buffers.block = np.empty(size, np.float32)
    return buf
