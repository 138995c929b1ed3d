"""Front end: the `model.mil` text of a compiled `.mlmodelc` -> ir.Program, the same IR the protobuf front end gives.

A compiled model directory holds `model.mil` (the program as text), `metadata.json` (the interface CoreML shows:
enumerated shapes, user metadata, see `metadata.py`), `weights/weight.bin` (the blob storage a package holds) and an
opaque `coremldata.bin` that only CoreML reads. The grammar, from what the compiler emits (NOTES.md, "Compiled
.mlmodelc directories") and from public programs written for Apple's compiler (MIL emitters of open ANE projects on
GitHub, which hand this text to `coremlc`: the `program(1.3)` header and buildInfo, `BLOBFILE` constants, both
forms of several outputs, `values = (a, b)` tuples, the `program(1.0)` LUT op with its parameters in the bracket):

    program(1.3)
    [buildInfo = dict<string, string>({{"coremlc-version", "3505.4.1"}})]
    {
        func infer<ios18>(tensor<fp16, [1, 1, 64]> x, state<tensor<fp16, [2, 1, 8, 16]>> cache) {
            tensor<int32, [2]> st = const()[name = string("st"), val = tensor<int32, [2]>([1, 1])];
            tensor<fp16, [1, 1, 64]> y = mul(x = x, y = c)[name = string("y")];
            tensor<fp16, [1, 1, 32]> a, tensor<fp16, [1, 1, 32]> b = split(axis = ax, x = y)[name = string("s")];
            write_state(data = d, input = cache)[name = string("w")];
        } -> (y);
    }

- `program(1.3)` / `ios18` writes scalars as `string("x")`, `int32(1)`, `bool(false)`, `uint64(64)` and floats as C99
  hex (`fp16(0x1.5p-17)`, `fp32(-0x1p+0)`; printf `%a`). The older `program(1.0)` / `ios16` writes
  `tensor<string, []>("x")`, `tensor<int32, []>(1)`, and some ops keep every parameter in the attribute bracket:
  `constexpr_lut_to_dense()[indices = ..., lut = ..., shape = ...]` (attributes other than `name` are constant
  arguments of the op, as in the protobuf form, where the interpreter reads them).
- Several outputs are `T a, T b = op(...)` (also seen parenthesised: `(T a, T b) = op(...)`); variadic inputs are
  tuples, `concat(values = (a, b), ...)`; an op without outputs is a bare call (`write_state(...)`).
- Stored constants are `tensor<T, [shape]>(BLOBFILE(path = string("@model_path/weights/weight.bin"), offset =
  uint64(N)))`, also inline as op arguments (the LUT op's `indices` and `lut`). `@model_path` is the `.mlmodelc`
  directory; any other path is refused.
- `?` is a flexible dimension; its allowed sizes come from `metadata.json`.
- Function opsets map to the protobuf's names (`ios18` is `CoreML8`), so both front ends give identical IR.

The file is untrusted input: it is scanned with bounded regular expressions (no recursion beyond the nesting the
grammar allows), every name an op reads is checked at load (`ir.check_references`), and every error is one line
naming the file, the line and what was expected.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .. import blob, ir
from ..ir import ModelFormatError
from . import metadata as compiled_metadata

PROGRAM_FILE = "model.mil"
MAX_BYTES = 1 << 30  # a model.mil of a multi-billion-parameter model is tens of MB; weights are never inline
MAX_ELEMENTS = 1 << 32  # no tensor of a real model comes near 4G elements: a larger declaration is corrupt
MAX_NESTING = 32
OPSETS = {"ios15": "CoreML5", "ios16": "CoreML6", "ios17": "CoreML7", "ios18": "CoreML8"}
DTYPES = set(ir.NUMPY_DTYPES) | {"string"}

_SKIP = re.compile(r"(?:\s+|//[^\n]*)*")
_TOKEN = re.compile(r"""
    (?P<str>"(?:[^"\\\n]|\\.)*")
  | (?P<num>0[xX][0-9a-fA-F]*\.?[0-9a-fA-F]*(?:[pP][-+]?[0-9]+)?|[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)
  | (?P<id>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<p>->|[()\[\]{}<>,=;?+\-])
""", re.X)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0"}


def locate(path: Path) -> Path:
    """The program file of a `.mlmodelc` directory."""
    path = Path(path)
    mil = path / PROGRAM_FILE
    if not path.is_dir() or not mil.is_file():
        raise ModelFormatError(f"{path}: not a compiled model (no {PROGRAM_FILE} in it); a .mlmodelc directory holds "
                               "model.mil, metadata.json and weights/weight.bin: re-download or re-compile it")
    return mil


def describe(path: Path) -> tuple[dict, dict, str]:
    """({function: Signature}, user metadata, default function): what `proto.describe` gives for a package."""
    program = load(path)
    return program.description, program.metadata, program.default_function


def load(path: Path, only: str | None = None) -> ir.Program:
    """The program; with `only`, the IR of that one function (the others listed by name, with `None`)."""
    path = Path(path)
    mil = locate(path)
    meta = compiled_metadata.read(path)
    with ir.reading(mil):
        functions = parse(_read_text(mil), mil, root=path)
    if meta.default_function is not None and meta.default_function not in functions:
        raise ModelFormatError(f"{meta.path}: defaultFunctionName {meta.default_function!r} is not a function of "
                               f"{mil} (it has {sorted(functions)})")
    default = meta.default_function or ("main" if "main" in functions else next(iter(functions)))
    signatures = {name: _signature(fn, meta, name == default, mil) for name, fn in functions.items()}
    kept = {name: fn if only in (None, name) else None for name, fn in functions.items()}
    return ir.Program(functions=kept, default_function=default, metadata=dict(meta.user), description=signatures)


def _read_text(mil: Path) -> str:
    size = mil.stat().st_size
    if size > MAX_BYTES:
        raise ModelFormatError(f"{mil}: {size} bytes, more than any program text ({MAX_BYTES}); not a model.mil")
    try:
        return mil.read_bytes().decode("utf-8-sig")  # a byte-order mark, if an editor added one, is not text
    except UnicodeDecodeError as e:
        raise ModelFormatError(f"{mil}: not UTF-8 text (byte {e.start}); the file is corrupt: re-export or "
                               "re-download the model") from None


def parse(text: str, where, root: Path) -> dict[str, ir.Function]:
    """{name: Function} of a program text; `where` names it in errors, `root` is what `@model_path` stands for."""
    functions = _Parser(text, str(where), Path(root)).program()
    for fn in functions.values():
        ir.check_references(fn, str(where))
    return functions


class _Parser:
    def __init__(self, text: str, where: str, root: Path):
        self.text, self.where, self.root = text, where, root
        self.pos, self.depth = 0, 0
        self._advance()

    # --- scanning ----------------------------------------------------------------------------------------------
    def _advance(self) -> None:
        start = _SKIP.match(self.text, self.pos).end()
        self.start = start
        if start >= len(self.text):
            self.kind, self.val, self.pos = "eof", "", start
            return
        m = _TOKEN.match(self.text, start)
        if m is None:
            raise self.error(f"unexpected character {self.text[start]!r}")
        self.kind, self.val, self.pos = m.lastgroup, m.group(), m.end()

    def lookahead(self) -> str:
        m = _TOKEN.match(self.text, _SKIP.match(self.text, self.pos).end())
        return m.group() if m else ""

    def error(self, message: str) -> ModelFormatError:
        line = self.text.count("\n", 0, self.start) + 1
        return ModelFormatError(f"{self.where}: line {line}: {message}; the program text is corrupt or not a "
                                "model.mil program")

    def found(self) -> str:
        return "the end of the file" if self.kind == "eof" else repr(self.val[:40])

    def accept(self, val: str) -> bool:
        if self.val == val and self.kind in ("p", "id"):
            self._advance()
            return True
        return False

    def expect(self, val: str, what: str = "") -> None:
        if not self.accept(val):
            raise self.error(f"expected {val!r}{' ' + what if what else ''}, found {self.found()}")

    def ident(self, what: str = "a name") -> str:
        if self.kind != "id":
            raise self.error(f"expected {what}, found {self.found()}")
        val = self.val
        self._advance()
        return val

    def items(self, close: str, item, what: str) -> list:
        """`item()` repeated, comma-separated, up to `close` (the opening bracket already read)."""
        out = []
        if self.accept(close):
            return out
        while True:
            out.append(item())
            if self.accept(close):
                return out
            self.expect(",", f"or {close!r} between {what}")

    def keyed(self, close: str, value, what: str) -> dict:
        """`key = value()` pairs up to `close`, each key once."""
        out: dict = {}

        def pair():
            key = self.ident(f"{what[:-1]} name")
            self.expect("=")
            if key in out:
                raise self.error(f"{what[:-1]} {key!r} given twice")
            out[key] = value()
        self.items(close, pair, what)
        return out

    @contextmanager
    def nested(self):
        """Bounds the recursion of nested literals and types (a hostile file could nest them without end)."""
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.error(f"values nested deeper than {MAX_NESTING} levels")
        try:
            yield
        finally:
            self.depth -= 1

    # --- program structure -------------------------------------------------------------------------------------
    def program(self) -> dict[str, ir.Function]:
        self.expect("program", "(the first word of a model.mil)")
        self.expect("(")
        if self.kind != "num":
            raise self.error(f"expected the program version, found {self.found()}")
        self._advance()
        self.expect(")")
        if self.val == "[":
            self.attributes()  # buildInfo: which compiler wrote the file, nothing the program needs
        self.expect("{")
        functions: dict[str, ir.Function] = {}
        while not self.accept("}"):
            fn = self.function()
            if fn.name in functions:
                raise self.error(f"function {fn.name!r} is defined twice")
            functions[fn.name] = fn
        if self.kind != "eof":
            raise self.error(f"text after the program's closing brace: {self.found()}")
        if not functions:
            raise self.error("the program defines no function")
        return functions

    def function(self) -> ir.Function:
        self.expect("func", "(a function definition)")
        name = self.ident("a function name")
        self.expect("<")
        opset = self.ident("an opset such as ios18")
        self.expect(">")
        self.expect("(")
        inputs = self.items(")", lambda: (lambda t: (self.ident("an input name"), t))(self.type()), "inputs")
        if self.val == "[":
            self.attributes()
        self.expect("{")
        operations = []
        while not self.accept("}"):
            operations.append(self.operation())
        self.expect("->", "and the function's outputs")
        self.expect("(")
        outputs = self.items(")", lambda: self.ident("an output name"), "outputs")
        self.expect(";")
        names = [n for n, _ in inputs]
        if len(set(names)) != len(names):
            raise self.error(f"function {name!r} declares an input twice: {names}")
        return ir.Function(name=name, inputs=inputs, block=ir.Block(inputs=[], operations=operations, outputs=outputs),
                           opset=OPSETS.get(opset, opset))

    def operation(self) -> ir.Op:
        outputs = []
        if not (self.kind == "id" and self.val not in DTYPES and self.val not in ("tensor", "state", "list")
                and self.lookahead() == "("):
            paren = self.accept("(")
            while True:
                t = self.type()
                outputs.append((self.ident("an output name"), t))
                if not self.accept(","):
                    break
            if paren:
                self.expect(")")
            self.expect("=", "after the op's outputs")
        op_type = self.ident("an op type")
        self.expect("(")
        inputs = self.keyed(")", self.bindings, "arguments")
        attributes = self.attributes() if self.val == "[" else {}
        if self.val == "{":
            raise self.error(f"{op_type} has a nested block (control flow), which the portable runtime does not run")
        self.expect(";", "after the op")
        if "name" in attributes:
            attributes["name"] = str(np.asarray(attributes["name"]).reshape(-1)[0])
        return ir.Op(type=op_type, inputs=inputs, outputs=outputs, attributes=attributes)

    def bindings(self) -> list[ir.Arg]:
        if self.accept("("):  # a variadic input: (a, b, ...)
            return self.items(")", self.binding, "values")
        return [self.binding()]

    def binding(self) -> ir.Arg:
        if self.starts_literal():
            return ir.Arg(value=self.literal())
        return ir.Arg(name=self.ident("a value name or a literal"))

    def attributes(self) -> dict:
        self.expect("[")
        return self.keyed("]", self.literal, "attributes")

    # --- types -------------------------------------------------------------------------------------------------
    def type(self):
        with self.nested():
            if self.accept("tensor"):
                self.expect("<")
                dtype = self.dtype()
                self.expect(",")
                self.expect("[")
                dims = self.items("]", self.dim, "dimensions")
                self.expect(">")
                static = [d for d in dims if d is not None]
                if static and int(np.prod(static, dtype=object)) > MAX_ELEMENTS:
                    raise self.error(f"a tensor of shape {dims}, more elements than any model holds")
                return ir.TensorType(dtype, tuple(dims))
            if self.accept("state"):
                self.expect("<")
                inner = self.type()
                self.expect(">")
                if not isinstance(inner, ir.TensorType):
                    raise self.error("a state must wrap a tensor type")
                return ir.StateType(inner)
            if self.accept("list"):
                self.expect("<")
                self.type()
                self.expect(",")
                if not self.accept("?"):
                    self.dim()
                self.expect(">")
                return ir.ListType(None, None)
            if self.kind == "id" and self.val in DTYPES:
                return ir.TensorType(self.ident(), ())
            raise self.error(f"expected a type (tensor<...>, state<...> or a scalar type), found {self.found()}")

    def dtype(self) -> str:
        if self.kind != "id" or self.val not in DTYPES:
            raise self.error(f"expected an element type such as fp16 or int32, found {self.found()}")
        return self.ident()

    def dim(self):
        if self.accept("?"):
            return None
        if self.kind == "num" and self.val.isdigit():
            value = int(self.val)
            self._advance()
            if value >= 1 << 31:
                raise self.error(f"dimension {value} is out of range")
            return value
        if self.kind == "id":  # a named symbolic dimension: sized at run time like '?'
            self._advance()
            return None
        raise self.error(f"expected a dimension (a size or '?'), found {self.found()}")

    # --- literals ----------------------------------------------------------------------------------------------
    def starts_literal(self) -> bool:
        if self.kind in ("num", "str") or self.val in ("-", "+"):
            return True
        if self.kind != "id":
            return False
        if self.val in ("tensor", "dict"):
            return self.lookahead() == "<"
        if self.val in DTYPES:
            return self.lookahead() == "("
        return self.val in ("true", "false")

    def literal(self):
        with self.nested():
            if self.val == "tensor":
                t = self.type()
                self.expect("(")
                value = self.tensor_value(t)
                self.expect(")")
                return value
            if self.val == "dict":
                return self.dictionary()
            if self.kind == "id" and self.val in DTYPES and self.lookahead() == "(":
                t = ir.TensorType(self.ident(), ())
                self.expect("(")
                value = self.tensor_value(t)
                self.expect(")")
                return value
            if self.starts_literal():
                return self.scalar()
            raise self.error(f"expected a literal value, found {self.found()}")

    def dictionary(self) -> dict:
        self.expect("dict")
        self.expect("<")
        self.type()
        self.expect(",")
        self.type()
        self.expect(">")
        self.expect("(")
        self.expect("{")

        def pair():
            self.expect("{")
            key = self.literal()
            self.expect(",")
            value = self.literal()
            self.expect("}")
            return str(key), value
        out = dict(self.items("}", pair, "entries"))
        self.expect(")")
        return out

    def tensor_value(self, t: ir.TensorType):
        if self.accept("BLOBFILE"):
            return self.blobfile(t)
        if None in t.shape:
            raise self.error(f"a literal of type {t}, whose shape is not static")
        count = int(np.prod(t.shape, dtype=np.int64)) if t.shape else 1
        if self.val == "[":
            values = self.elements()
        else:
            values = [self.element()]
        if len(values) != count:
            raise self.error(f"a literal of type {t} holds {len(values)} values, its shape needs {count}")
        return _array(values, t)

    def elements(self) -> list:
        """The values of a tensor literal, flattened in row-major order (nested brackets are accepted)."""
        with self.nested():
            self.expect("[")
            rows = self.items("]", lambda: self.elements() if self.val == "[" else [self.element()], "values")
            return [x for row in rows for x in row]

    def element(self):
        """One scalar of a literal: bare (`1`, `0x1p-1`, `"s"`, `true`) or typed (`fp16(0x1p-1)`)."""
        if self.kind == "id" and self.val in DTYPES and self.lookahead() == "(":
            self._advance()
            self.expect("(")
            value = self.scalar()
            self.expect(")")
            return value
        return self.scalar()

    def scalar(self):
        if self.kind == "str":
            value = _unquote(self.val)
            self._advance()
            return value
        if self.kind == "id" and self.val in ("true", "false"):
            value = self.val == "true"
            self._advance()
            return value
        sign = -1 if self.val == "-" else 1
        if self.val in ("-", "+"):
            self._advance()
        if self.kind == "id" and self.val in ("inf", "nan"):
            value = sign * float(self.val)
        elif self.kind == "num":
            text = self.val
            if text[:2] in ("0x", "0X"):
                value = sign * float.fromhex(text) if ("p" in text.lower() or "." in text) else sign * int(text, 16)
            elif "." in text or "e" in text.lower():
                value = sign * float(text)
            else:
                value = sign * int(text)
        else:
            raise self.error(f"expected a number, a string or true/false, found {self.found()}")
        self._advance()
        return value

    def blobfile(self, t: ir.TensorType) -> ir.BlobRef:
        self.expect("(")
        fields = self.keyed(")", self.literal, "fields")
        if set(fields) != {"path", "offset"}:
            raise self.error(f"BLOBFILE needs exactly path and offset, found {sorted(fields)}")
        path, offset = fields["path"], np.asarray(fields["offset"])
        if not isinstance(path, str) or not path.startswith("@model_path/"):
            raise self.error(f"BLOBFILE path {path!r} is not inside the model (@model_path/...); refusing to read it")
        if offset.shape != () or offset.dtype.kind not in "iu":
            raise self.error(f"BLOBFILE offset {fields['offset']!r} is not an integer")
        return blob.reference(self.root, path, int(offset), t)


def _unquote(token: str) -> str:
    body, out, i = token[1:-1], [], 0
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            i += 1
            out.append(_ESCAPES.get(body[i], body[i]))
        else:
            out.append(c)
        i += 1
    return "".join(out)


def _array(values: list, t: ir.TensorType):
    """A literal as the protobuf front end holds it: a numpy array of the declared dtype (0-d for a scalar), a
    str for a string scalar."""
    if t.dtype == "string":
        if not all(isinstance(v, str) for v in values):
            raise ModelFormatError(f"a string literal holds non-string values {values[:3]}")
        arr = np.array(values, dtype=object)
        return arr[0] if t.shape == () else arr.reshape(t.shape)
    if any(isinstance(v, str) for v in values):
        raise ModelFormatError(f"a literal of type {t} holds a string")
    dtype = np.dtype(ir.NUMPY_DTYPES[t.dtype])
    if dtype.kind in "iub":
        if any(isinstance(v, float) for v in values):
            raise ModelFormatError(f"a literal of type {t} holds a fractional value")
        info = np.iinfo(dtype) if dtype.kind != "b" else None
        if info is not None and any(not info.min <= v <= info.max for v in values):
            raise ModelFormatError(f"a literal of type {t} holds a value outside the range of {t.dtype}")
    arr = np.array(values, dtype=dtype)
    return arr.reshape(t.shape)


def _signature(fn: ir.Function, meta: "compiled_metadata.Metadata", is_default: bool, mil: Path) -> ir.Signature:
    """A function's interface as CoreML shows it: the types model.mil declares (authoritative for every function),
    with the sizes of flexible (`?`) dimensions from metadata.json."""
    def feature(name: str, t: ir.TensorType, kind: str) -> ir.Feature:
        entry = meta.feature(fn.name, is_default, kind, name)
        if entry is not None:
            entry.check_against(t, f"{kind} {name!r} of function {fn.name!r} in {mil}")
        if None not in t.shape:
            return ir.Feature(name, t.dtype, tuple(t.shape))
        if kind == "outputs":  # a flexible output: the shape metadata.json shows, if any (CoreML checks none)
            return ir.Feature(name, t.dtype, entry.shape if entry is not None else ())
        if entry is None or not (entry.shapes or entry.ranges):
            raise ModelFormatError(f"{meta.path}: {kind[:-1]} {name!r} of function {fn.name!r} has a flexible "
                                   f"dimension in {mil.name} ({t}) but no enumerated shapes or ranges here")
        return ir.Feature(name, t.dtype, entry.shape, entry.shapes, entry.ranges)

    produced = {n: t for op in fn.block.operations for n, t in op.outputs}
    produced.update(fn.inputs)
    inputs = tuple(feature(n, t, "inputs") for n, t in fn.inputs if isinstance(t, ir.TensorType))
    states = tuple(ir.Feature(n, t.wrapped.dtype, tuple(t.wrapped.shape)) for n, t in fn.inputs
                   if isinstance(t, ir.StateType))
    outputs = []
    for n in fn.block.outputs:
        t = produced[n]
        if not isinstance(t, ir.TensorType):
            raise ModelFormatError(f"{mil}: output {n!r} of function {fn.name!r} is not a tensor ({t})")
        outputs.append(feature(n, t, "outputs"))
    return ir.Signature(inputs, tuple(outputs), states)
