"""Conversions between fp16 values and the float32 compute form, fast: the runtime rounds after every op.

The project's C kernels (_fp16.c) convert with the CPU's conversion instructions (AVX-512, F16C, NEON; the same
IEEE rounding in integer arithmetic elsewhere), in one pass and in place where the caller allows it: bit-identical
to numpy's cast pair `astype(float16).astype(float32)` (tested over every fp16 value and random float32 bit
patterns, on every code path the CPU has), which takes two passes and a temporary array. torch's conversions, used
before, cost 4x as much on one thread for a 64-row prefill batch's 2 MB arrays and several microseconds per call,
and their threads spun against numpy's BLAS. Below SMALL elements the cast pair's two calls cost less than
building the C call's buffers.
Callers run these under np.errstate(all="ignore"), as the interpreter does: overflow to inf is the point.
"""
from __future__ import annotations

import numpy as np

from . import _fp16

SMALL = 1024  # elements: below this numpy's cast pair
ISA = -1  # the C kernels' code path (_fp16.isas()), GEMV included: -1 the fastest this CPU has; tests pin each one


def round_to_fp16(v) -> np.ndarray:
    """float32 values rounded to the nearest fp16 value (ties to even), kept as float32: exactly
    `v.astype(float16).astype(float32)`."""
    x = np.asarray(v, dtype=np.float32)
    if x.size < SMALL:
        return x.astype(np.float16).astype(np.float32)
    x = np.ascontiguousarray(x)
    out = np.empty(x.shape, np.float32)
    _fp16.round_fp16(x, out, ISA)
    return out


def round_in_place(x) -> np.ndarray:
    """round_to_fp16 for an array the caller owns outright (an op's freshly computed output): large ones are
    rounded where they lie, with no output array to allocate and fill."""
    if (type(x) is np.ndarray and x.dtype == np.float32 and x.size >= SMALL and x.flags.writeable
            and (x.flags.c_contiguous or x.flags.f_contiguous)):
        c = x if x.flags.c_contiguous else x.T  # elementwise: any memory order will do
        _fp16.round_fp16(c, c, ISA)
        return x
    return round_to_fp16(x)


def widen(v) -> np.ndarray:
    """An fp16 array as float32 (exact); other arrays as float32 the plain way."""
    if not (isinstance(v, np.ndarray) and v.dtype == np.float16) or v.size < SMALL:
        return np.asarray(v, dtype=np.float32)
    v = np.ascontiguousarray(v)  # a KV state's slice: copied at half the bytes, then widened in one pass
    out = np.empty(v.shape, np.float32)
    _fp16.widen(v, out, ISA)
    return out


def widen_into(out: np.ndarray, v: np.ndarray) -> None:
    """widen(v) written into `out` (float32, C order, v's shape), an existing buffer: no allocation."""
    if v.flags.c_contiguous:
        _fp16.widen(v, out, ISA)
    else:
        np.copyto(out, v)
