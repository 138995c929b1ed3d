"""Conversions between fp16 values and the float32 compute form, fast: the runtime rounds after every op.

numpy's own float16 casts are scalar code (about 3 ns per element here); torch's use the CPU's conversion
instructions (about 0.1 ns), and torch is installed wherever lm-eval and transformers are. Results are
bit-identical either way (tested over every float32 bit pattern); without torch, numpy does the work.
Callers run these under np.errstate(all="ignore"), as the interpreter does: overflow to inf is the point.
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np

SMALL = 1024  # elements: below this numpy's cast pair beats torch's per-call overhead
SERIAL = 32768  # elements: torch's GRAIN_SIZE, below which it converts on the calling thread


def round_to_fp16(v) -> np.ndarray:
    """float32 values rounded to the nearest fp16 value (ties to even), kept as float32: exactly
    `v.astype(float16).astype(float32)`."""
    x = np.asarray(v, dtype=np.float32)
    if x.size < SMALL:  # below this numpy's cast pair costs fewer calls than it saves
        return x.astype(np.float16).astype(np.float32)
    torch = _torch()
    if torch is None or not (x.flags.c_contiguous and x.flags.writeable):
        return round_fp16_numpy(x)
    return _in_torch(torch, x, rounding=True)


def round_in_place(x) -> np.ndarray:
    """round_to_fp16 for an array the caller owns outright (an op's freshly computed output): large ones are
    rounded where they lie, sparing torch's output allocation (about a third of a rounding's cost)."""
    if (type(x) is np.ndarray and x.dtype == np.float32 and x.size >= SMALL and x.flags.writeable
            and (x.flags.c_contiguous or x.flags.f_contiguous)):
        torch = _torch()
        if torch is not None:
            return _in_torch(torch, x, rounding=True, in_place=True)
    return round_to_fp16(x)


def widen(v) -> np.ndarray:
    """An fp16 array as float32 (exact); other arrays as float32 the plain way."""
    if not (isinstance(v, np.ndarray) and v.dtype == np.float16) or v.size < SMALL:
        return np.asarray(v, dtype=np.float32)
    torch = _torch()
    if torch is None:
        return v.astype(np.float32)
    return _in_torch(torch, np.ascontiguousarray(v), rounding=False)


def widen_into(out: np.ndarray, v: np.ndarray) -> None:
    """widen(v) written into `out` (float32, v's shape), an existing buffer: no allocation. Callers converting
    many blocks hold `single_threaded()` around the loop."""
    torch = _torch()
    if torch is None or not v.flags.c_contiguous:
        np.copyto(out, v)
        return
    torch.from_numpy(out).copy_(torch.from_numpy(v))


def _in_torch(torch, x: np.ndarray, rounding: bool, in_place: bool = False) -> np.ndarray:
    """x (contiguous) rounded through fp16 (`in_place`: overwriting x), or widened from fp16, by torch; on one
    thread when it is large enough for torch to go parallel (see single_threaded)."""
    if x.size >= SERIAL:
        with single_threaded():
            return _convert(torch, x, rounding, in_place)
    return _convert(torch, x, rounding, in_place)


def _convert(torch, x: np.ndarray, rounding: bool, in_place: bool) -> np.ndarray:
    t = torch.from_numpy(x)
    if in_place:
        t.copy_(t.half())
        return x
    return (t.half().float() if rounding else t.float()).numpy()


@contextlib.contextmanager
def single_threaded():
    """torch on one thread for conversions: its OpenMP workers spin after a parallel region and starve numpy's
    BLAS threads (a prefill ran 8x slower), and conversions are memory-bound anyway."""
    torch = _torch()
    threads = torch.get_num_threads() if torch is not None else 1
    if threads != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads != 1:
            torch.set_num_threads(threads)


@functools.cache
def _torch():
    try:
        import torch
    except (ImportError, OSError):  # not installed, or a build whose libraries do not load: numpy does the work
        return None
    return torch


def round_fp16_numpy(x: np.ndarray) -> np.ndarray:
    """round_to_fp16 in numpy alone, 1.5-5x faster than its cast pair (worst on softmax's tiny values):
    - normals, zeros, infinities: round the float32 mantissa to fp16's 10 bits with integer arithmetic;
    - fp16 subnormals (|x| < 2**-14, spacing 2**-24): x + 0.75 lands in [0.5, 1), where float32 spacing is
      2**-24, so the addition itself rounds (ties to even) and subtracting 0.75 is exact;
    - overflow past 65504 and NaN (rare): numpy's cast."""
    u = x.view(np.uint32)
    r = u >> np.uint32(13)
    r &= np.uint32(1)
    r += np.uint32(0x0FFF)
    r += u
    r &= np.uint32(0xFFFFE000)
    out = r.view(np.float32).reshape(x.shape)
    mag = u & np.uint32(0x7FFFFFFF)
    tiny = (mag - np.uint32(1)) < np.uint32(0x387FFFFF)
    if tiny.any():
        sub = x + np.float32(0.75)
        sub -= np.float32(0.75)
        np.copysign(sub, x, out=sub)  # a negative value rounding to zero gives -0, as in fp16
        np.copyto(out, sub, where=tiny.reshape(x.shape))
    rare = np.flatnonzero((mag >= np.uint32(0x477FF000)) & (mag != np.uint32(0x7F800000)))
    if rare.size:
        out.reshape(-1)[rare] = x.reshape(-1)[rare].astype(np.float16).astype(np.float32)
    return out
