"""The runtime's own program representation, independent of how a program was stored.

A front end (`frontends/proto.py` for `.mlpackage`/`.mlmodel` protobuf, `frontends/text.py` for the `model.mil` text
of a compiled `.mlmodelc`) produces a `Program`; the interpreter only ever sees these classes. Values are numpy
arrays; types carry the declared dtype and shape.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class ModelFormatError(ValueError):
    """A model file that cannot be read as a program: the message names the file and what is wrong."""


# what a corrupt file can make parsing code raise, short of a bug: turned into one line naming the file
_PARSE_ERRORS = (KeyError, IndexError, TypeError, ValueError, OverflowError, UnicodeDecodeError, StopIteration,
                 RecursionError, MemoryError)


@contextmanager
def reading(path):
    """Errors while reading a model file name the file: a ModelFormatError that does not say which file gets it in
    front, anything else a corrupt file can raise becomes a ModelFormatError with the file and the reason."""
    try:
        yield
    except ModelFormatError as e:
        if str(path) in str(e) or str(Path(path).parent) in str(e):
            raise
        raise type(e)(f"{path}: {e}") from None
    except _PARSE_ERRORS as e:
        raise ModelFormatError(f"{path}: cannot read it ({e.__class__.__name__}: {str(e)[:200]}); the file is corrupt: "
                               "re-export or re-download the model") from None


# declared dtype name -> numpy dtype used to hold values of that type at run time
NUMPY_DTYPES = {
    "fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "bf16": np.float32,
    "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
    "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "bool": np.bool_,
    # sub-byte types are unpacked to one byte per element
    "int4": np.int8, "uint1": np.uint8, "uint2": np.uint8, "uint3": np.uint8, "uint4": np.uint8, "uint6": np.uint8,
}


@dataclass(frozen=True, slots=True)
class TensorType:
    dtype: str  # e.g. "fp16", "int32", "string"
    shape: tuple  # ints, or None for a dimension not known until run time

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        return f"{tuple(self.shape)} {self.dtype}"


@dataclass(frozen=True, slots=True)
class StateType:
    wrapped: TensorType


@dataclass(frozen=True, slots=True)
class ListType:  # list/tuple values (rare in converted models; kept so loading never fails on them)
    element: Any
    length: int | None


@dataclass(slots=True)
class Arg:
    """One binding of an op input: a reference to a named value, or an inline constant."""
    name: str | None = None
    value: Any = None


@dataclass(slots=True)
class Op:
    type: str
    inputs: dict[str, list[Arg]]  # variadic inputs (concat's values) have several bindings
    outputs: list[tuple[str, Any]]  # (name, type)
    attributes: dict[str, Any] = field(default_factory=dict)
    blocks: list["Block"] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.attributes.get("name") or (self.outputs[0][0] if self.outputs else self.type)

    def input_name(self, key: str) -> str | None:
        """The value name bound to a single-binding input (None for constants, lists and absent inputs)."""
        args = self.inputs.get(key, [])
        return args[0].name if len(args) == 1 else None


@dataclass(slots=True)
class Block:
    inputs: list[tuple[str, Any]]
    operations: list[Op]
    outputs: list[str]


@dataclass(slots=True)
class Function:
    name: str
    inputs: list[tuple[str, Any]]  # (name, TensorType | StateType)
    block: Block
    opset: str = ""


@dataclass(slots=True)
class Program:
    functions: dict[str, Function]
    default_function: str
    metadata: dict[str, str] = field(default_factory=dict)  # user-defined metadata
    description: Any = None  # the front end's model description, if any (names, shapes for validation)


@dataclass(frozen=True, slots=True)
class Feature:
    """A declared input, output or state of a function, as CoreML validates it."""
    name: str
    dtype: str  # "fp16", "fp32", "int32", ...
    shape: tuple  # the default shape (() if undeclared, e.g. outputs with flexible shapes)
    shapes: tuple = ()  # enumerated alternatives (each a tuple), if the input is enumerated
    ranges: tuple = ()  # per-dimension (lower, upper) bounds, upper -1 = unbounded, if the input has ranges

    def accepts(self, shape: tuple) -> bool:
        if self.shapes:
            return tuple(shape) in self.shapes
        if self.ranges:
            return len(shape) == len(self.ranges) and all(
                lo <= s and (hi < 0 or s <= hi) for s, (lo, hi) in zip(shape, self.ranges))
        return tuple(shape) == tuple(self.shape)

    def expected(self) -> str:
        if self.shapes:
            return " or ".join(str(s) for s in self.shapes) + f" {self.dtype}"
        if self.ranges:
            dims = ", ".join(f"{lo}..{hi if hi >= 0 else 'inf'}" for lo, hi in self.ranges)
            return f"({dims}) {self.dtype}"
        return f"{tuple(self.shape)} {self.dtype}"


@dataclass(frozen=True, slots=True)
class Signature:
    inputs: tuple  # Feature, in declaration order
    outputs: tuple
    states: tuple


@dataclass(frozen=True, slots=True)
class BlobRef:
    """A constant stored in a weight file, read (and bounds-checked) when a function is prepared."""
    path: Any  # pathlib.Path inside the model package
    offset: int
    type: TensorType


@dataclass(frozen=True, slots=True)
class StackedBlobs:
    """Stored constants concatenated along their first axis (projection weights a rewrite merged), read straight
    into one array."""
    parts: tuple  # BlobRef, each with the same dtype and trailing shape
    type: TensorType


def check_references(fn: Function, where: str) -> None:
    """Every name an op reads is a function input or an earlier op's output, and every block output is defined:
    a broken file fails here, at load, naming the function, the op and the name, never later as a KeyError."""
    defined = {n for n, _ in fn.inputs}
    _check_block(fn.block, defined, f"{where} function {fn.name!r}")


def _check_block(block: Block, defined: set, where: str) -> None:
    defined = defined | {n for n, _ in block.inputs}
    for op in block.operations:
        for key, bindings in op.inputs.items():
            for a in bindings:
                if a.name is not None and a.name not in defined:
                    raise ModelFormatError(f"{where}: op {op.name!r} ({op.type}) reads {a.name!r} as {key}, which is "
                                           "never defined before it; the program is corrupt: re-export the model")
        for inner in op.blocks:
            _check_block(inner, defined, where)
        defined.update(n for n, _ in op.outputs)
    for name in block.outputs:
        if name not in defined:
            raise ModelFormatError(f"{where}: output {name!r} is never defined; the program is corrupt: re-export "
                                   "the model")
