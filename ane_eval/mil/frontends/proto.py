"""Front end: `.mlpackage` / ML Program `.mlmodel` (protobuf) -> ir.Program.

Uses coremltools' generated protobuf classes only (no CoreML framework). Weight files are read through
`blob.BlobFile`; no path outside the model package is ever opened.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import numpy as np

from .. import blob, ir
from ..blob import unpack_bits
from ..ir import ModelFormatError


_DTYPES = {  # MIL.proto DataType -> our dtype names
    "BOOL": "bool", "STRING": "string", "FLOAT16": "fp16", "FLOAT32": "fp32", "FLOAT64": "fp64", "BFLOAT16": "bf16",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "INT4": "int4",
    "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "UINT1": "uint1", "UINT2": "uint2", "UINT3": "uint3", "UINT4": "uint4", "UINT6": "uint6",
}
_ARRAY_DTYPES = {65552: "fp16", 65568: "fp32", 65600: "fp64", 131104: "int32", 131080: "int8"}
_SUB_BYTE_BITS = {"int4": 4, "uint1": 1, "uint2": 2, "uint3": 3, "uint4": 4, "uint6": 6}


MAX_EMPTY = 1 << 16  # an immediate value without data is zeros; more than this is a corrupt file, not a constant
MAX_ELEMENTS = 1 << 32  # no tensor of a real model comes near 4G elements: a larger declaration is corrupt
_PROTO_PACKAGE = "_ane_eval_coreml_proto"


def _protos():
    """coremltools' generated protobuf modules, imported without running `coremltools/__init__`, which imports
    torch and its converters (~7 s): the runtime needs only the message classes."""
    if _PROTO_PACKAGE not in sys.modules:
        spec = importlib.util.find_spec("coremltools")
        if spec is None or not spec.submodule_search_locations:
            raise ModelFormatError("coremltools is not installed; it provides the model file format (pip install coremltools)")
        package = types.ModuleType(_PROTO_PACKAGE)
        package.__path__ = [str(Path(next(iter(spec.submodule_search_locations))) / "proto")]
        sys.modules[_PROTO_PACKAGE] = package
    MIL_pb2 = importlib.import_module(f"{_PROTO_PACKAGE}.MIL_pb2")
    Model_pb2 = importlib.import_module(f"{_PROTO_PACKAGE}.Model_pb2")
    return MIL_pb2, Model_pb2


def locate(path: Path) -> tuple[Path, Path]:
    """(model spec file, directory that `@model_path` refers to) for an .mlpackage or .mlmodel path."""
    path = Path(path)
    if path.is_file():
        return path, path.parent
    manifest = path / "Manifest.json"
    if not manifest.is_file():
        raise ModelFormatError(f"{path}: not an .mlpackage (no Manifest.json) nor an .mlmodel file")
    try:
        info = json.loads(manifest.read_text())
        entry = info["itemInfoEntries"][info["rootModelIdentifier"]]
        rel = entry["path"]
    except (ValueError, KeyError, TypeError) as e:
        raise ModelFormatError(f"{manifest}: malformed manifest ({e.__class__.__name__}: {e})") from None
    data = (path / "Data").resolve()
    spec = (data / rel).resolve()
    if data not in spec.parents or not spec.is_file():
        raise ModelFormatError(f"{manifest}: root model {rel!r} is missing or outside the package")
    return spec, spec.parent


def read_spec(path: Path):
    _, Model_pb2 = _protos()
    spec_path, _ = locate(path)
    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(spec_path.read_bytes())
    except Exception as e:  # protobuf raises DecodeError and friends
        raise ModelFormatError(f"{spec_path}: cannot parse the model specification ({e})") from None
    return spec


def describe(path: Path) -> tuple[dict, dict, str]:
    """({function: Signature}, user metadata, default function) from the spec alone, without reading weights."""
    spec = read_spec(Path(path))
    with ir.reading(locate(path)[0]):
        desc = spec.description
        if desc.functions:
            return ({f.name: signature(f) for f in desc.functions}, dict(desc.metadata.userDefined),
                    desc.defaultFunctionName)
        return {"main": signature(desc)}, dict(desc.metadata.userDefined), "main"


def load(path: Path, only: str | None = None) -> ir.Program:
    """The program; with `only`, the IR of that one function (the others listed by name, with `None`)."""
    path = Path(path)
    spec = read_spec(path)
    spec_path, root = locate(path)
    if spec.WhichOneof("Type") != "mlProgram":
        raise ModelFormatError(f"{spec_path}: a {spec.WhichOneof('Type')} model, not an ML Program; only ML Programs "
                               "run here")
    with ir.reading(spec_path):
        loader = _Loader(root)
        functions = {name: loader.function(name, f) if only in (None, name) else None
                     for name, f in spec.mlProgram.functions.items()}
        if not functions:
            raise ModelFormatError("the program has no function")
        for fn in functions.values():
            if fn is not None:
                ir.check_references(fn, str(spec_path))
        desc = spec.description
        default = desc.defaultFunctionName or ("main" if "main" in functions else next(iter(functions)))
        if desc.functions:
            signatures = {f.name: signature(f) for f in desc.functions}
        else:
            signatures = {default: signature(desc)}
        metadata = dict(desc.metadata.userDefined)
    return ir.Program(functions=functions, default_function=default, metadata=metadata, description=signatures)


def _feature(fd, state: bool = False) -> ir.Feature:
    if state:
        arr = fd.type.stateType.arrayType
    else:
        if fd.type.WhichOneof("Type") != "multiArrayType":
            raise ModelFormatError(f"feature {fd.name!r}: only multi-array features are supported")
        arr = fd.type.multiArrayType
    dtype = _ARRAY_DTYPES.get(arr.dataType, f"array type {arr.dataType}")
    shapes = tuple(tuple(s.shape) for s in arr.enumeratedShapes.shapes)
    ranges = tuple((r.lowerBound, r.upperBound) for r in arr.shapeRange.sizeRanges)
    return ir.Feature(fd.name, dtype, tuple(arr.shape), shapes, ranges)


def signature(desc) -> ir.Signature:
    return ir.Signature(tuple(_feature(f) for f in desc.input), tuple(_feature(f) for f in desc.output),
                        tuple(_feature(f, state=True) for f in desc.state))


class _Loader:
    def __init__(self, root: Path):
        self.root = root.resolve()

    def function(self, name: str, f) -> ir.Function:
        block = f.block_specializations.get(f.opset) or next(iter(f.block_specializations.values()))
        inputs = [(i.name, self.type(i.type)) for i in f.inputs]
        return ir.Function(name=name, inputs=inputs, block=self.block(block), opset=f.opset)

    def block(self, b) -> ir.Block:
        ops = [self.op(o) for o in b.operations]
        return ir.Block(inputs=[(i.name, self.type(i.type)) for i in b.inputs], operations=ops, outputs=list(b.outputs))

    def op(self, o) -> ir.Op:
        inputs = {k: [ir.Arg(name=a.name) if a.WhichOneof("binding") == "name" else ir.Arg(value=self.value(a.value))
                      for a in arg.arguments] for k, arg in o.inputs.items()}
        attrs = {k: self.value(v) for k, v in o.attributes.items()}
        if "name" in attrs:
            attrs["name"] = str(np.asarray(attrs["name"]).reshape(-1)[0])
        return ir.Op(type=o.type, inputs=inputs, outputs=[(x.name, self.type(x.type)) for x in o.outputs],
                     attributes=attrs, blocks=[self.block(b) for b in o.blocks])

    def type(self, t):
        kind = t.WhichOneof("type")
        if kind == "tensorType":
            tt = t.tensorType
            dims = tuple(d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in tt.dimensions)
            static = [d for d in dims if d is not None]
            if static and math.prod(static) > MAX_ELEMENTS:
                raise ModelFormatError(f"a tensor of shape {list(dims)}, more elements than any model holds")
            return ir.TensorType(_DTYPES.get(_protos()[0].DataType.Name(tt.dataType), "unknown"), dims)
        if kind == "stateType":
            return ir.StateType(self.type(t.stateType.wrappedType))
        if kind in ("listType", "tupleType"):
            return ir.ListType(None, None)
        raise ModelFormatError(f"unsupported value type {kind}")

    def value(self, v):
        t = self.type(v.type)
        kind = v.WhichOneof("value")
        if kind == "blobFileValue":
            return self.blob(v.blobFileValue.fileName, v.blobFileValue.offset, t)
        if kind == "immediateValue":
            return self.immediate(v.immediateValue, t)
        raise ModelFormatError(f"value without data ({kind})")

    def immediate(self, iv, t):
        which = iv.WhichOneof("value")
        if which != "tensor":
            if which == "list":
                return [self.value(x) for x in iv.list.values]
            if which == "tuple":
                return tuple(self.value(x) for x in iv.tuple.values)
            raise ModelFormatError(f"unsupported immediate value {which}")
        tv = iv.tensor
        field = tv.WhichOneof("value")
        shape = tuple(t.shape)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if field is None:  # empty tensor
            if count > MAX_EMPTY:
                raise ModelFormatError(f"an immediate value of type {t} holds no data")
            return np.zeros(shape, dtype=ir.NUMPY_DTYPES.get(t.dtype, np.float32))
        data = getattr(tv, field).values
        if field == "strings":
            arr = np.array([s.decode() if isinstance(s, bytes) else s for s in data], dtype=object)
        elif field == "bytes":
            raw = np.frombuffer(data, dtype=np.uint8)
            if t.dtype in _SUB_BYTE_BITS:
                arr = unpack_bits(raw, _SUB_BYTE_BITS[t.dtype], count, signed=t.dtype == "int4")
            else:
                arr = raw.view(ir.NUMPY_DTYPES[t.dtype])
        else:
            arr = np.array(list(data), dtype=ir.NUMPY_DTYPES.get(t.dtype, np.float32))
        if arr.size != count:
            raise ModelFormatError(f"immediate value holds {arr.size} elements, its type {t} needs {count}")
        return arr.reshape(shape) if shape else (arr.reshape(()) if t.dtype != "string" else arr[0])

    def blob(self, file_name: str, offset: int, t: ir.TensorType) -> ir.BlobRef:
        return blob.reference(self.root, file_name, offset, t)
