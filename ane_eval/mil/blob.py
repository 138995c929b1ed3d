"""Reader for CoreML's MIL blob storage (`weights/weight.bin`), bounds-checked.

Layout: a 64-byte header (uint32 count, uint32 version = 2, reserved); then, 64-byte aligned, per blob a 64-byte
record (uint32 sentinel 0xDEADBEEF, uint32 blob dtype, uint64 size in bytes, uint64 absolute data offset,
uint64 padding bits, reserved) followed by its data. A program's BLOBFILE offset points at the record. Sub-byte
types are packed LSB-first. Model files are untrusted: every offset and size is checked against the file before
anything is read or allocated.
"""
from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from pathlib import Path

import numpy as np

from . import ir

SENTINEL = 0xDEADBEEF
HEADER = struct.Struct("<II")
RECORD = struct.Struct("<IIQQQ")
# BlobDataType (MILBlob/Blob/BlobDataType.hpp) -> (numpy dtype, bits per element)
BLOB_DTYPES = {
    1: (np.float16, 16), 2: (np.float32, 32), 3: (np.uint8, 8), 4: (np.int8, 8), 5: ("bf16", 16),
    6: (np.int16, 16), 7: (np.uint16, 16), 8: ("int4", 4), 9: ("uint1", 1), 10: ("uint2", 2), 11: ("uint4", 4),
    12: ("uint3", 3), 13: ("uint6", 6), 14: (np.int32, 32), 15: (np.uint32, 32),
}
# the declared tensor dtype each blob dtype may back
COMPATIBLE = {1: "fp16", 2: "fp32", 3: "uint8", 4: "int8", 5: "bf16", 6: "int16", 7: "uint16", 8: "int4",
              9: "uint1", 10: "uint2", 11: "uint4", 12: "uint3", 13: "uint6", 14: "int32", 15: "uint32"}


class BlobError(ir.ModelFormatError):
    """A weight file that does not hold what the program says it holds."""


class BlobFile:
    """One weight file. `read(offset, dtype, shape)` returns a fresh numpy array; `view(...)` the values where the
    file's pages lie (memory-mapped, copy-on-write): nothing is read until touched and untouched rows never become
    resident (an embedding table is gathered from a few rows at a time), and the pages are the page cache's, shared
    with every other process reading the file. As with any mapped file, shrinking the file while a model uses it is
    an error the operating system signals (SIGBUS), not one this reader can report."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.size = os.path.getsize(self.path)
        except OSError as e:
            raise BlobError(f"{self.path}: cannot read weight file ({e.strerror})") from None
        if self.size < 64:
            raise BlobError(f"{self.path}: weight file is {self.size} bytes, shorter than its 64-byte header; "
                            "the model is truncated or corrupt: re-export or re-download it")
        self._mapped: mmap.mmap | None = None
        self.count, self.version = HEADER.unpack_from(self._map())
        if self.version != 2:
            raise BlobError(f"{self.path}: blob storage version {self.version}, expected 2")

    def _map(self) -> mmap.mmap:
        if self._mapped is None:
            try:
                with open(self.path, "rb") as fh:
                    # ACCESS_COPY: arrays over it are writable (torch takes them without a warning) and a write,
                    # which no kernel makes, would change this process's copy of a page, never the file
                    self._mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as e:
                raise BlobError(f"{self.path}: cannot map weight file ({e})") from None
            if len(self._mapped) != self.size:
                raise BlobError(f"{self.path}: weight file changed size while being opened; reload the model")
        return self._mapped

    def _fail(self, offset: int, what: str) -> BlobError:
        return BlobError(f"{self.path}: blob at offset {offset}: {what}; the weight file is truncated or corrupt: "
                         "re-export or re-download the model")

    def _record(self, offset: int) -> tuple[int, int, int]:
        """(blob dtype, size in bytes, data offset) of the record at `offset`, checked against the file."""
        if offset < 64 or offset % 64 or offset + RECORD.size > self.size:
            raise self._fail(offset, f"record offset outside the file ({self.size} bytes) or not 64-byte aligned")
        sentinel, blob_dtype, nbytes, data_offset, _padding = RECORD.unpack_from(self._map(), offset)
        if sentinel != SENTINEL:
            raise self._fail(offset, f"bad sentinel 0x{sentinel:08X} (expected 0xDEADBEEF)")
        if blob_dtype not in BLOB_DTYPES:
            raise self._fail(offset, f"unknown blob data type {blob_dtype}")
        if data_offset < offset + RECORD.size or data_offset + nbytes > self.size:
            raise self._fail(offset, f"data of {nbytes} bytes at {data_offset} does not hold its values inside the "
                                     f"file ({self.size} bytes)")
        return blob_dtype, nbytes, data_offset

    def records(self):
        """(blob dtype name, element count) of every blob in the file, from the records alone (no data read)."""
        offset = 64
        for _ in range(self.count):
            blob_dtype, nbytes, data_offset = self._record(offset)
            yield COMPATIBLE[blob_dtype], nbytes * 8 // BLOB_DTYPES[blob_dtype][1]
            offset = -(-(data_offset + nbytes) // 64) * 64

    def _locate(self, offset: int, dtype: str, shape: tuple) -> tuple[int, int, object, int, int]:
        """(data offset, bytes, numpy dtype or packed-type name, bits per element, element count) of the blob at
        `offset`, checked to hold `shape` values of `dtype`."""
        blob_dtype, nbytes, data_offset = self._record(offset)
        if COMPATIBLE[blob_dtype] != dtype:
            raise self._fail(offset, f"holds {COMPATIBLE[blob_dtype]} data but the program declares {dtype}")
        np_dtype, bits = BLOB_DTYPES[blob_dtype]
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        need = (count * bits + 7) // 8
        if nbytes < need:
            raise self._fail(offset, f"data of {nbytes} bytes at {data_offset} does not hold {count} "
                                     f"{dtype} values ({need} bytes) inside the file ({self.size} bytes)")
        return data_offset, need, np_dtype, bits, count

    def view(self, offset: int, dtype: str, shape: tuple) -> np.ndarray:
        """The values in place (see the class), for byte-sized and wider types; packed and bf16 blobs, which are
        converted anyway, and data misaligned for its type come back as a fresh array."""
        data_offset, _, np_dtype, _, count = self._locate(offset, dtype, shape)
        if isinstance(np_dtype, str) or data_offset % np.dtype(np_dtype).itemsize:
            return self.read(offset, dtype, shape)
        return np.frombuffer(self._map(), np_dtype, count=count, offset=data_offset).reshape(shape)

    def read(self, offset: int, dtype: str, shape: tuple, packed: bool = False):
        """The values in fresh memory, read from the file without touching its mapping: a value read once (a
        LUT's indices, a weight widened to float32) leaves nothing resident. With `packed`, sub-byte values come
        back as stored (PackedBits)."""
        data_offset, need, np_dtype, bits, count = self._locate(offset, dtype, shape)
        raw = np.empty(need, np.uint8)
        self._pread(raw, data_offset)
        if np_dtype == "bf16":
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
        if isinstance(np_dtype, str):  # sub-byte
            values = PackedBits(raw, bits, count, tuple(int(d) for d in shape), signed=np_dtype == "int4")
            return values if packed else values.unpack()
        return raw.view(np_dtype).reshape(shape)

    def read_into(self, offset: int, dtype: str, out: np.ndarray) -> None:
        """read(offset, dtype, out.shape) written into `out`: for `out` C-contiguous and of the blob's own numpy
        dtype, straight from the file (no second copy)."""
        data_offset, _, np_dtype, _, _ = self._locate(offset, dtype, out.shape)
        if isinstance(np_dtype, str) or out.dtype != np_dtype or not out.flags.c_contiguous:
            out[...] = self.read(offset, dtype, out.shape)
        else:
            self._pread(out.reshape(-1).view(np.uint8), data_offset)

    def _pread(self, dest: np.ndarray, data_offset: int) -> None:
        with open(self.path, "rb") as fh:
            fh.seek(data_offset)
            if fh.readinto(memoryview(dest)) != dest.size:
                raise self._fail(data_offset, "the file ended early (it changed while being read)")


def reference(root: Path, file_name: str, offset: int, t: ir.TensorType) -> ir.BlobRef:
    """A stored constant named by a program (`@model_path/weights/weight.bin`, `root` being the directory
    `@model_path` stands for), refused when the name leads outside `root`; the file itself is checked when read."""
    root = Path(root).resolve()
    path = (root / file_name.replace("@model_path/", "", 1)).resolve()
    if root not in path.parents:
        raise ir.ModelFormatError(f"{root}: weight file {file_name!r} points outside the model package; refusing to "
                                  "read it")
    if not path.is_file():
        raise ir.ModelFormatError(f"{path}: weight file missing; the model is incomplete")
    if any(d is None for d in t.shape):
        raise BlobError(f"{path}: blob at {offset} has a type without a static shape ({t})")
    if not 0 <= int(offset) < 1 << 63:
        raise BlobError(f"{path}: blob offset {offset} is out of range")
    return ir.BlobRef(path, int(offset), t)


@dataclasses.dataclass(frozen=True)
class PackedBits:
    """Sub-byte values as the file stores them (`raw`: `count` values of `bits` bits, LSB-first), unpacked on
    demand (numpy does so when it takes one as an array): a LUT's 4-bit indices are looked up byte by byte
    (ops.constexpr_lut_to_dense) with no index array of their own."""
    raw: np.ndarray
    bits: int
    count: int
    shape: tuple
    signed: bool = False

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def unpack(self) -> np.ndarray:
        return unpack_bits(self.raw, self.bits, self.count, signed=self.signed).reshape(self.shape)

    def __array__(self, dtype=None, copy=None):
        values = self.unpack()
        return values if dtype is None else values.astype(dtype)


UNPACK_GROUPS = 1 << 16  # groups of 8 elements unpacked at a time: small reused temporaries, in cache


def unpack_bits(raw: np.ndarray, bits: int, count: int, signed: bool = False) -> np.ndarray:
    """Elements of `bits` bits packed LSB-first into bytes -> one uint8 (or int8) per element. Widths dividing 8
    (1, 2, 4 bits) shift each byte alone, straight into the output's strided slots; other widths read each 8
    consecutive elements (exactly `bits` bytes) as one little-endian integer and shift them out, a block of groups
    at a time through reused temporaries. The output is the only large allocation: a palettized 1B model's 1.2
    billion indices are unpacked at load, and on this project's VM fresh memory costs ~2.5 s/GB to touch (whole-
    array temporaries made a LUT4 model's unpacking take 12 s). A buffer too short for `count` gives only the
    elements it holds whole: callers check the count they got."""
    count = min(count, raw.size * 8 // bits)  # never padding
    if 8 % bits == 0:
        per = 8 // bits
        out = np.empty(-(-count // per) * per, np.uint8)
        packed = raw[:out.size // per]
        for j in range(per):  # element j of each byte: its bits j*bits.. shifted down
            np.right_shift(packed, np.uint8(j * bits), out=out[j::per])
        if bits < 8:
            np.bitwise_and(out, np.uint8((1 << bits) - 1), out=out)
        values = out[:count]
        return _signed(values, bits) if signed else values
    groups = -(-count // 8)
    out = np.empty(groups * 8, np.uint8)
    whole = min(groups, raw.size // bits)
    mask = np.uint64((1 << bits) - 1)
    word, part = np.empty(min(whole, UNPACK_GROUPS), np.uint64), np.empty(min(whole, UNPACK_GROUPS), np.uint64)
    for start in range(0, whole, UNPACK_GROUPS):
        block = raw[start * bits:min(start + UNPACK_GROUPS, whole) * bits].reshape(-1, bits)
        w, p = word[:len(block)], part[:len(block)]
        w[:] = block[:, 0]
        for byte in range(1, bits):  # little-endian: byte j holds bits 8j..8j+7 of the group
            np.left_shift(block[:, byte], np.uint64(8 * byte), out=p, dtype=np.uint64)
            w |= p
        rows = out[start * 8:(start + len(block)) * 8].reshape(-1, 8)
        for k in range(8):
            np.right_shift(w, np.uint64(k * bits), out=p)
            p &= mask
            rows[:, k] = p
    if whole < groups:  # the last group, short of bytes: zero-padded (its padding is cut off below)
        tail = np.zeros(bits, np.uint8)
        rest = raw[whole * bits:]
        tail[:rest.size] = rest
        out[whole * 8:] = unpack_bits(tail, bits, 8)
    values = out[:count]
    return _signed(values, bits) if signed else values


def _signed(values: np.ndarray, bits: int) -> np.ndarray:
    """Two's complement `bits`-bit values (int4) as int8."""
    return np.where(values >= 1 << (bits - 1), values.astype(np.int16) - (1 << bits), values).astype(np.int8)
