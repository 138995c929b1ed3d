"""`metadata.json` of a compiled `.mlmodelc`: the interface CoreML shows for a model, read as untrusted input.

The file is a one-element JSON list whose object mirrors the model description: `inputSchema`, `outputSchema`,
`stateSchema` (entries with `name`, `type`, `dataType`, `shape` as text such as "[1, 1, 2048]",
`hasShapeFlexibility` "0"/"1", and for flexible inputs `enumeratedShapes` "[[1, 1], [1, 64]]" or `shapeRange`
"[[1, 1], [1, -1]]"), `userDefinedMetadata` (string -> string: the `com.anemll.*` keys), `specificationVersion`,
`modelType`, `generatedClassName`. The string forms are coremltools' own (`mlmodel/src/FeatureType.cpp`,
`FeatureType::toDictionary`: `dimensionsToString(shape, true)`, `enumeratedShapesToString(shapes, true)`,
`dimensionRangesToString(ranges, true)`). A multifunction model's default function is `defaultFunctionName`, and its
per-function schemas `functions: [{name, inputSchema, ...}]` (the names of the model description's protobuf fields,
`ModelDescription.defaultFunctionName` / `functions`, which CoreML's `MLModelAssetDescription.defaultFunctionName`
also uses). Only what the interface needs is read; every field read is type- and bounds-checked, and every error
names the file and the field.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .. import ir
from ..ir import ModelFormatError

FILE = "metadata.json"
MAX_BYTES = 64 << 20
MAX_SHAPES = 4096
_SHAPE_TEXT = re.compile(r"\[\s*(?:-?\d{1,12}\s*(?:,\s*-?\d{1,12}\s*){0,31})?\]")
_DTYPES = {"Float16": "fp16", "Float32": "fp32", "Double": "fp64", "Float64": "fp64", "Int32": "int32",
           "Int8": "int8", "Int16": "int16", "Int64": "int64", "UInt8": "uint8", "Bool": "bool"}


@dataclass(frozen=True)
class Entry:
    """One schema entry: the default shape, and the enumerated shapes or per-dimension ranges of a flexible one."""
    name: str
    dtype: str | None
    shape: tuple
    shapes: tuple = ()
    ranges: tuple = ()
    where: str = ""

    def check_against(self, t: ir.TensorType, what: str) -> None:
        """The entry agrees with the program's declaration (rank, static sizes, element type)."""
        problems = []
        if self.dtype is not None and self.dtype != t.dtype:
            problems.append(f"element type {self.dtype}, the program declares {t.dtype}")
        for shape in (self.shape, *self.shapes) if self.shape else self.shapes:
            if len(shape) != t.rank or any(d is not None and d != s for d, s in zip(t.shape, shape)):
                problems.append(f"shape {list(shape)}, the program declares {list(t.shape)}")
                break
        if self.ranges and len(self.ranges) != t.rank:
            problems.append(f"{len(self.ranges)} ranges for a rank-{t.rank} tensor")
        if problems:
            raise ModelFormatError(f"{self.where}: {what}: " + "; ".join(problems) + "; the compiled model is "
                                   "inconsistent: re-compile or re-download it")


@dataclass(frozen=True)
class Metadata:
    path: Path
    user: dict
    default_function: str | None
    schemas: dict  # (function or None for the top-level schema, kind) -> {name: Entry}

    def feature(self, function: str, is_default: bool, kind: str, name: str) -> Entry | None:
        """The entry describing `name`: the function's own schema, else the top level (the default function's)."""
        own = self.schemas.get((function, kind), {}).get(name)
        if own is not None or not is_default:
            return own
        return self.schemas.get((None, kind), {}).get(name)


def read(model_dir: Path) -> Metadata:
    """The metadata of a `.mlmodelc` directory; an absent file reads as empty (the program alone then decides)."""
    path = Path(model_dir) / FILE
    if not path.is_file():
        return Metadata(path, {}, None, {})
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise ModelFormatError(f"{path}: {size} bytes, far more than a model's metadata; the file is corrupt")
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ModelFormatError(f"{path}: not UTF-8 text (byte {e.start}); the file is corrupt: re-compile or "
                               "re-download the model") from None
    except (ValueError, RecursionError) as e:
        raise ModelFormatError(f"{path}: not valid JSON ({str(e)[:120]}); the file is corrupt: re-compile or "
                               "re-download the model") from None
    return _Reader(path).metadata(doc)


class _Reader:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, field: str, expected: str, got) -> ModelFormatError:
        shown = repr(got)
        return ModelFormatError(f"{self.path}: {field} must be {expected}, found {shown[:80]}; the file is corrupt: "
                                "re-compile or re-download the model")

    def metadata(self, doc) -> Metadata:
        if not isinstance(doc, list) or not doc or not isinstance(doc[0], dict):
            raise self.fail("the top level", "a list holding one object", doc)
        top = doc[0]
        user = top.get("userDefinedMetadata", {})
        if not isinstance(user, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in user.items()):
            raise self.fail("userDefinedMetadata", "an object of strings", user)
        default = top.get("defaultFunctionName")
        if default is not None and (not isinstance(default, str) or not default):
            raise self.fail("defaultFunctionName", "a function name", default)
        schemas = self.schemas(top, None, "")
        functions = top.get("functions", [])
        if not isinstance(functions, list):
            raise self.fail("functions", "a list", functions)
        for i, f in enumerate(functions):
            if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                raise self.fail(f"functions[{i}]", "an object with a name", f)
            schemas.update(self.schemas(f, f["name"], f"functions[{i}]."))
        return Metadata(self.path, dict(user), default or None, schemas)

    def schemas(self, obj: dict, function: str | None, prefix: str) -> dict:
        out = {}
        for kind, key in (("inputs", "inputSchema"), ("outputs", "outputSchema"), ("states", "stateSchema")):
            entries = obj.get(key, [])
            if not isinstance(entries, list):
                raise self.fail(prefix + key, "a list", entries)
            out[(function, kind)] = {}
            for i, e in enumerate(entries):
                entry = self.entry(e, f"{prefix}{key}[{i}]")
                out[(function, kind)][entry.name] = entry
        return out

    def entry(self, e, field: str) -> Entry:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            raise self.fail(field, "an object with a name", e)
        dtype = e.get("dataType")
        if dtype is not None and not isinstance(dtype, str):
            raise self.fail(field + ".dataType", "a string", dtype)
        shape = self.shape(e.get("shape", "[]"), field + ".shape")
        shapes, ranges = (), ()
        if "enumeratedShapes" in e:
            shapes = self.shape_list(e["enumeratedShapes"], field + ".enumeratedShapes")
            if any(min(s, default=0) < 0 for s in shapes):
                raise self.fail(field + ".enumeratedShapes", "non-negative sizes", e["enumeratedShapes"])
        elif "shapeRange" in e:
            ranges = self.shape_list(e["shapeRange"], field + ".shapeRange")
            if any(len(r) != 2 or r[0] < 0 or (r[1] >= 0 and r[1] < r[0]) for r in ranges):
                raise self.fail(field + ".shapeRange", "[lower, upper] pairs (upper -1: unbounded)", e["shapeRange"])
        if any(d < 0 for d in shape):
            raise self.fail(field + ".shape", "non-negative sizes", e.get("shape"))
        return Entry(e["name"], _DTYPES.get(dtype) if dtype else None, shape, shapes, tuple(map(tuple, ranges)),
                     str(self.path))

    def shape(self, text, field: str) -> tuple:
        if not isinstance(text, str) or len(text) > 512 or not _SHAPE_TEXT.fullmatch(text.strip()):
            raise self.fail(field, 'a shape such as "[1, 64]"', text)
        return tuple(json.loads(text))

    def shape_list(self, text, field: str) -> tuple:
        if not isinstance(text, str) or len(text) > 64 * MAX_SHAPES:
            raise self.fail(field, 'a list of shapes such as "[[1, 1], [1, 64]]"', text)
        inner = text.strip()
        if not (inner.startswith("[") and inner.endswith("]")):
            raise self.fail(field, 'a list of shapes such as "[[1, 1], [1, 64]]"', text)
        parts = re.findall(r"\[[^\[\]]*\]", inner[1:-1])
        rest = re.sub(r"\[[^\[\]]*\]", "", inner[1:-1]).replace(",", "").strip()
        if rest or len(parts) > MAX_SHAPES:
            raise self.fail(field, 'a list of shapes such as "[[1, 1], [1, 64]]"', text)
        return tuple(self.shape(p, field) for p in parts)
