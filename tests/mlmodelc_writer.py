"""Test-only: turn `.mlpackage` parts into compiled `.mlmodelc` directories, as Apple's compiler lays them out.

Off a Mac nothing compiles a package (coremltools' `compile_model` needs CoreML), and coremltools has no writer of
the compiled text: `Program.__str__` prints pymil's debug form (`main[CoreML8](%x: (1, 1, int32)(Tensor)) {...}`),
not `model.mil`. So this writes the text from the package's protobuf program, op for op, in the form the compiler
emits (NOTES.md, "Compiled .mlmodelc directories"; public `model.mil` programs written for Apple's compiler):
`program(1.3)`, a `buildInfo` dict, one `func NAME<ios18>(...)` per function, arguments and attributes in
alphabetical order (`conv(dilations = ..., groups = ..., ..., weight = ..., x = ...)[name = string("...")]`),
scalars as `int32(1)` / `string("x")` / `bool(false)`, floats in C99 hex (printf `%a`: `fp16(0x1.5p-17)`), stored
constants as `BLOBFILE(path = string("@model_path/weights/weight.bin"), offset = uint64(N))`, the LUT op's
`indices` and `lut` inline. `dialect="ios16"` writes the older `program(1.0)` form instead: `tensor<string, []>("x")`
scalars, and ops whose inputs are all literals keep them in the attribute bracket (`constexpr_lut_to_dense()[indices
= ..., lut = ..., name = ...]`).

Beside it: `weights/weight.bin` copied byte for byte (the compiled model keeps the package's blob storage, so every
BLOBFILE offset stays valid), `metadata.json` built from the package's model description in coremltools' own string
forms (`mlmodel/src/FeatureType.cpp`, `toDictionary`), and placeholder `coremldata.bin` files: their format is
Apple's and only CoreML reads them, which nothing here emulates.

    from tests.mlmodelc_writer import write_mlmodelc, compile_directory
    write_mlmodelc(package, out_dir / "llama_embeddings.mlmodelc")
    compile_directory(model_dir, out_dir)          # every part, plus meta.yaml and the tokenizer files
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from ane_eval.mil.blob import unpack_bits
from ane_eval.mil.frontends import proto

BUILD_INFO = (("coremlc-component-MIL", "3510.2.1"), ("coremlc-version", "3505.4.1"),
              ("coremltools-component-milinternal", ""), ("coremltools-version", "9.0"))
PLACEHOLDER = b"ane-eval test writer: placeholder for CoreML's compiled description (only CoreML reads it)\n"
OPSETS = {"CoreML5": "ios15", "CoreML6": "ios16", "CoreML7": "ios17", "CoreML8": "ios18"}
DTYPES = {"BOOL": "bool", "STRING": "string", "FLOAT16": "fp16", "FLOAT32": "fp32", "FLOAT64": "fp64",
          "BFLOAT16": "bf16", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "INT4": "int4",
          "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64", "UINT1": "uint1",
          "UINT2": "uint2", "UINT3": "uint3", "UINT4": "uint4", "UINT6": "uint6"}
SUB_BYTE = {"int4": 4, "uint1": 1, "uint2": 2, "uint3": 3, "uint4": 4, "uint6": 6}
ARRAY_TYPES = {65552: "Float16", 65568: "Float32", 65600: "Double", 131104: "Int32", 131080: "Int8"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def hex_float(x: float) -> str:
    """printf's %a as Apple's compiler writes it: `0x1.5p-17`, `-0x1p+0`, `inf`, `nan`."""
    if np.isnan(x):
        return "nan"
    if np.isinf(x):
        return "inf" if x > 0 else "-inf"
    text = float(x).hex()  # '0x1.5000000000000p-17'
    mantissa, exponent = text.split("p")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}p{exponent}"


class _Printer:
    def __init__(self, dialect: str):
        if dialect not in ("ios18", "ios16"):
            raise ValueError(f"dialect must be ios18 or ios16, got {dialect!r}")
        self.old = dialect == "ios16"

    # --- types -------------------------------------------------------------------------------------------------
    @staticmethod
    def tensor_parts(t) -> tuple[str, list]:
        tt = t.tensorType
        dims = [d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in tt.dimensions]
        enum = tt.DESCRIPTOR.fields_by_name["dataType"].enum_type
        return DTYPES[enum.values_by_number[tt.dataType].name], dims

    def type(self, t) -> str:
        kind = t.WhichOneof("type")
        if kind == "stateType":
            return f"state<{self.type(t.stateType.wrappedType)}>"
        if kind != "tensorType":
            raise ValueError(f"the writer handles tensor and state types, not {kind}")
        dtype, dims = self.tensor_parts(t)
        if not dims and not self.old:
            return dtype
        return f"tensor<{dtype}, [{', '.join('?' if d is None else str(d) for d in dims)}]>"

    # --- values ------------------------------------------------------------------------------------------------
    def value(self, v) -> str:
        kind = v.WhichOneof("value")
        dtype, dims = self.tensor_parts(v.type)
        tensor_type = f"tensor<{dtype}, [{', '.join(str(d) for d in dims)}]>"
        if kind == "blobFileValue":
            path, offset = v.blobFileValue.fileName, v.blobFileValue.offset
            where = f"path = {self.scalar('string', path)}, offset = {self.scalar('uint64', offset)}"
            return f"{tensor_type}(BLOBFILE({where}))"
        values = self.immediate(v.immediateValue.tensor, dtype, dims)
        if not dims:
            return self.scalar(dtype, values[0])
        return f"{tensor_type}([{', '.join(self.element(dtype, x) for x in values)}])"

    def scalar(self, dtype: str, x) -> str:
        text = self.element(dtype, x)
        return f"tensor<{dtype}, []>({text})" if self.old else f"{dtype}({text})"

    @staticmethod
    def element(dtype: str, x) -> str:
        if dtype == "string":
            return json.dumps(str(x))
        if dtype == "bool":
            return "true" if bool(x) else "false"
        if dtype in ("fp16", "fp32", "fp64", "bf16"):
            return hex_float(float(x))
        return str(int(x))

    def immediate(self, tv, dtype: str, dims: list) -> list:
        count = int(np.prod(dims, dtype=np.int64)) if dims else 1
        field = tv.WhichOneof("value")
        if field is None:
            return [False if dtype == "bool" else 0] * count
        data = getattr(tv, field).values
        if field == "bytes":
            raw = np.frombuffer(data, dtype=np.uint8)
            if dtype in SUB_BYTE:
                return unpack_bits(raw, SUB_BYTE[dtype], count, signed=dtype == "int4").tolist()
            np_dtype = {"fp16": np.float16, "int8": np.int8, "uint8": np.uint8, "int16": np.int16,
                        "uint16": np.uint16}[dtype]
            return raw.view(np_dtype).tolist()
        if field == "strings":
            return [s.decode() if isinstance(s, bytes) else s for s in data]
        return list(data)

    # --- program structure -------------------------------------------------------------------------------------
    def name(self, n: str) -> str:
        if not _NAME.match(n):
            raise ValueError(f"{n!r} is not a valid MIL identifier")
        return n

    def operation(self, o) -> str:
        if o.blocks:
            raise ValueError(f"{o.type}: ops with nested blocks are not written")
        args, attrs = {}, {k: self.value(v) for k, v in o.attributes.items()}
        for key, arg in o.inputs.items():
            bound = [self.name(b.name) if b.WhichOneof("binding") == "name" else self.value(b.value)
                     for b in arg.arguments]
            args[key] = bound[0] if len(bound) == 1 else f"({', '.join(bound)})"
        if self.old and o.type.startswith("constexpr_") and all(
                b.WhichOneof("binding") == "value" for a in o.inputs.values() for b in a.arguments):
            attrs.update(args)  # the old form keeps a constexpr op's literal parameters in the attribute bracket
            args = {}
        outputs = ", ".join(f"{self.type(x.type)} {self.name(x.name)}" for x in o.outputs)
        call = f"{o.type}({', '.join(f'{k} = {v}' for k, v in sorted(args.items()))})"
        bracket = f"[{', '.join(f'{k} = {v}' for k, v in sorted(attrs.items()))}]" if attrs else ""
        return f"{outputs} = {call}{bracket};" if outputs else f"{call}{bracket};"

    def function(self, name: str, f) -> list[str]:
        block = f.block_specializations[f.opset]
        if block.inputs:
            raise ValueError(f"function {name}: block inputs are not written")
        params = ", ".join(f"{self.type(i.type)} {self.name(i.name)}" for i in f.inputs)
        opset = "ios16" if self.old else OPSETS.get(f.opset, f.opset)
        lines = [f"    func {self.name(name)}<{opset}>({params}) {{"]
        lines += [f"            {self.operation(o)}" for o in block.operations]
        lines.append(f"    }} -> ({', '.join(block.outputs)});")
        return lines

    def program(self, spec) -> str:
        info = ", ".join(f"{{{json.dumps(k)}, {json.dumps(v)}}}" for k, v in BUILD_INFO)
        key_type = "tensor<string, []>" if self.old else "string"
        lines = ["program(1.0)" if self.old else "program(1.3)",
                 f"[buildInfo = dict<{key_type}, {key_type}>({{{info}}})]", "{"]
        for name, f in spec.mlProgram.functions.items():
            lines += self.function(name, f)
        lines.append("}")
        return "\n".join(lines) + "\n"


# --- metadata.json -------------------------------------------------------------------------------------------------
def _dims(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _schema_entry(fd, state: bool = False) -> dict:
    arr = fd.type.stateType.arrayType if state else fd.type.multiArrayType
    shapes = [list(s.shape) for s in arr.enumeratedShapes.shapes]
    ranges = [(r.lowerBound, r.upperBound) for r in arr.shapeRange.sizeRanges]
    default = list(arr.shape) or (shapes[0] if shapes else [lo for lo, _ in ranges])
    dtype = ARRAY_TYPES.get(arr.dataType, "Invalid")
    entry = {"hasShapeFlexibility": "1" if shapes or ranges else "0", "isOptional": "0", "dataType": dtype,
             "formattedType": f"{'State' if state else 'MultiArray'} ({dtype}"
                              + (f" {' × '.join(map(str, default))})" if default else ")"),
             "shortDescription": "", "shape": _dims(default), "name": fd.name,
             "type": "State" if state else "MultiArray"}
    if shapes:
        entry["enumeratedShapes"] = "[" + ", ".join(_dims(s) for s in shapes) + "]"
        entry["shapeFlexibility"] = " | ".join(" × ".join(map(str, s)) for s in shapes)
    elif ranges:
        entry["shapeRange"] = "[" + ", ".join(f"[{lo}, {hi}]" for lo, hi in ranges) + "]"
    return entry


def _schemas(desc) -> dict:
    return {"inputSchema": [_schema_entry(f) for f in desc.input],
            "outputSchema": [_schema_entry(f) for f in desc.output],
            **({"stateSchema": [_schema_entry(f, state=True) for f in desc.state]} if len(desc.state) else {})}


def metadata(spec, name: str) -> list:
    desc = spec.description
    top = {"metadataOutputVersion": "3.0", "shortDescription": desc.metadata.shortDescription,
           "author": desc.metadata.author, "license": desc.metadata.license,
           "userDefinedMetadata": dict(desc.metadata.userDefined),
           "specificationVersion": spec.specificationVersion, "modelType": {"name": "MLModelType_mlProgram"},
           "generatedClassName": name, "isUpdatable": "0"}
    if len(desc.functions):
        default = next(f for f in desc.functions if f.name == desc.defaultFunctionName)
        top.update(_schemas(default))
        top["defaultFunctionName"] = desc.defaultFunctionName
        top["functions"] = [{"name": f.name, **_schemas(f)} for f in desc.functions]
    else:
        top.update(_schemas(desc))
    return [top]


# --- files ---------------------------------------------------------------------------------------------------------
def write_mlmodelc(package: Path, out: Path, dialect: str = "ios18") -> Path:
    """`package` (.mlpackage) as a compiled directory `out` (.mlmodelc); returns `out`."""
    package, out = Path(package), Path(out)
    spec = proto.read_spec(package)
    _, root = proto.locate(package)
    text = _Printer(dialect).program(spec)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.mil").write_text(text)
    (out / "metadata.json").write_text(json.dumps(metadata(spec, out.stem), indent=2))
    (out / "coremldata.bin").write_bytes(PLACEHOLDER)
    (out / "analytics").mkdir(exist_ok=True)
    (out / "analytics" / "coremldata.bin").write_bytes(PLACEHOLDER)
    weights = root / "weights"
    if weights.is_dir():
        shutil.copytree(weights, out / "weights", dirs_exist_ok=True)
    return out


def compile_directory(model_dir: Path, out: Path, dialect: str = "ios18", keep_packages: bool = False) -> Path:
    """An ANEMLL model directory with every `.mlpackage` part written as `.mlmodelc` (the packages dropped unless
    `keep_packages`); meta.yaml, config and tokenizer files copied unchanged."""
    model_dir, out = Path(model_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.suffix == ".mlpackage":
            write_mlmodelc(item, out / f"{item.stem}.mlmodelc", dialect)
            if keep_packages:
                shutil.copytree(item, out / item.name, dirs_exist_ok=True)
        elif item.is_file():
            shutil.copy2(item, out / item.name)
    return out


def write_blobs(path: Path, arrays: list) -> list[int]:
    """A weight file in CoreML's blob storage (the layout `ane_eval/mil/blob.py` reads) holding `arrays` (numpy,
    fp16/fp32/int8/uint8, or (packed bytes, blob data type) for sub-byte data); returns each record's offset, the
    number a BLOBFILE names."""
    import struct

    codes = {np.dtype(np.float16): 1, np.dtype(np.float32): 2, np.dtype(np.uint8): 3, np.dtype(np.int8): 4}
    out, offsets = bytearray(struct.pack("<II", len(arrays), 2).ljust(64, b"\0")), []
    for a in arrays:
        data, code = (a[0], a[1]) if isinstance(a, tuple) else (np.ascontiguousarray(a).tobytes(), codes[a.dtype])
        offset = len(out)
        offsets.append(offset)
        record = struct.pack("<IIQQQ", 0xDEADBEEF, code, len(data), offset + 64, 0).ljust(64, b"\0")
        out += record + data
        out += b"\0" * (-len(out) % 64)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(bytes(out))
    return offsets
