"""Executes one ir.Function: prepared once (constants read and folded, kernels bound), then run per call.

Numerics: every op computes in float32 and its output is rounded to the declared dtype; with precision "fp16"
(the default, closest to CoreML) fp16 outputs are rounded to fp16 after every op, with "fp32" they are not.

State updates: a converted model updates its KV cache as read_state -> slice_update -> write_state. Done literally
that copies the whole cache for every layer and token. When alias analysis proves that no older version of the
state is read afterwards, slice_update writes into the state buffer in place; otherwise it copies.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from . import ir
from .blob import BlobFile
from .ops import CONSTEXPR, KERNELS, VIEW_OPS, OpError

VARIADIC = {"values"}  # inputs that are always a list (concat, stack, einsum)
SHAPE_ARGS = {"axes", "perm", "shape", "reps", "begin", "end", "stride", "begin_mask", "end_mask", "squeeze_mask",
              "size", "split_sizes", "strides", "dilations", "pad"}
# ops whose outputs are input values moved around: exact in the input's dtype, no rounding pass needed
SELECTING_OPS = {"slice_by_index", "slice_by_size", "concat", "stack", "split", "gather", "gather_along_axis", "tile",
                 "select", "reduce_max", "reduce_min", "maximum", "minimum", "relu", "abs", "band_part"}
STATE_OPS = {"read_state", "write_state", "coreml_update_state"}


class UnsupportedOpsError(NotImplementedError):
    pass


class ExecutionError(RuntimeError):
    pass


class ConstStore:
    """Weights of one model package, read once and shared by all its functions (infer and prefill share
    weights). Values are held in their compute form: float32 for floats."""

    def __init__(self):
        self.files: dict = {}
        self.values: dict = {}
        self.owned: dict[int, np.ndarray] = {}  # id -> array, for arrays this store keeps alive

    def _keep(self, key, value):
        self.values[key] = value
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, np.ndarray):
                self.owned[id(v)] = v
        return value

    def blob(self, ref: ir.BlobRef) -> np.ndarray:
        key = ("blob", str(ref.path), ref.offset)
        if key not in self.values:
            if ref.path not in self.files:
                self.files[ref.path] = BlobFile(ref.path)
            self._keep(key, compute_form(self.files[ref.path].read(ref.offset, ref.type.dtype, ref.type.shape)))
        return self.values[key]

    def fold(self, op_type, args: dict, compute):
        """Decompress once per package: infer and prefill share the dequantized weights when their inputs are
        the same stored blobs (identity is only trusted for arrays this store keeps alive)."""
        arrays = [v for v in args.values() if isinstance(v, np.ndarray) and v.ndim > 0]
        if not arrays or any(id(v) not in self.owned for v in arrays):
            return compute()
        key = (op_type,) + tuple(sorted((k, id(v) if isinstance(v, np.ndarray) and v.ndim > 0 else repr(v))
                                        for k, v in args.items()))
        if key not in self.values:
            self._keep(key, compute())
        return self.values[key]


def compute_form(value):
    """Floats are computed in float32; everything else keeps its dtype."""
    if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.dtype != np.float32:
        return value.astype(np.float32)
    if isinstance(value, (np.floating, float)) and not isinstance(value, np.float32):
        return np.float32(value)
    return value


def round_to_fp16(v) -> np.ndarray:
    """float32 values rounded to the nearest fp16 value (ties to even), kept as float32.

    Bit-exact with `v.astype(float16).astype(float32)`, and 1.5-5x faster (numpy's fp16 cast is slow, worst on
    the tiny values softmax produces), which matters because this runs after every op in fp16 mode:
    - normals, zeros, infinities: round the float32 mantissa to fp16's 10 bits with integer arithmetic;
    - fp16 subnormals (|x| < 2**-14, spacing 2**-24): x + 0.75 lands in [0.5, 1), where float32 spacing is
      2**-24, so the addition itself rounds (ties to even) and subtracting 0.75 is exact;
    - overflow past 65504 and NaN (rare): numpy's cast."""
    x = np.asarray(v, dtype=np.float32)
    if x.size < 4096:  # below this numpy's cast pair costs fewer calls than it saves
        with np.errstate(over="ignore", invalid="ignore"):
            return x.astype(np.float16).astype(np.float32)
    u = x.view(np.uint32)
    r = u >> np.uint32(13)
    r &= np.uint32(1)
    r += np.uint32(0x0FFF)
    r += u
    r &= np.uint32(0xFFFFE000)
    out = r.view(np.float32).reshape(x.shape)
    mag = u & np.uint32(0x7FFFFFFF)
    tiny = (mag - np.uint32(1)) < np.uint32(0x387FFFFF)
    with np.errstate(over="ignore", invalid="ignore"):
        if tiny.any():
            sub = x + np.float32(0.75)
            sub -= np.float32(0.75)
            np.copysign(sub, x, out=sub)  # a negative value rounding to zero gives -0, as in fp16
            np.copyto(out, sub, where=tiny.reshape(x.shape))
        rare = np.flatnonzero((mag >= np.uint32(0x477FF000)) & (mag != np.uint32(0x7F800000)))
        if rare.size:
            out.reshape(-1)[rare] = x.reshape(-1)[rare].astype(np.float16).astype(np.float32)
    return out


def _coercer(t, round_fp16: bool):
    if not isinstance(t, ir.TensorType):
        return None
    if t.dtype == "fp16":
        if round_fp16:
            return round_to_fp16
        return lambda v: np.asarray(v, dtype=np.float32)
    if t.dtype in ("fp32", "fp64", "bf16"):
        return lambda v: np.asarray(v, dtype=np.float32)
    np_dtype = ir.NUMPY_DTYPES.get(t.dtype)
    if np_dtype is None:
        return None

    def to_dtype(v):
        a = np.asarray(v)
        if a.dtype == np_dtype:
            return a
        with np.errstate(invalid="ignore", over="ignore"):
            if a.dtype.kind == "f" and np.dtype(np_dtype).kind in "iu":  # float -> int truncates, then wraps
                return np.trunc(a).astype(np.int64).astype(np_dtype)
            return a.astype(np_dtype)
    return to_dtype


class Plan:
    def __init__(self, fn: ir.Function, precision: str, consts: ConstStore, model_name: str = ""):
        if precision not in ("fp16", "fp32"):
            raise ValueError(f"precision must be 'fp16' or 'fp32', got {precision!r}")
        self.name = f"{model_name}:{fn.name}" if model_name else fn.name
        self.round_fp16 = precision == "fp16"
        self.outputs = list(fn.block.outputs)
        self.state_inputs = [n for n, t in fn.inputs if isinstance(t, ir.StateType)]
        self._check_supported(fn)
        self.known: dict = {}  # values known at load time
        self.steps: list = []
        self.types = {n: t.dtype for n, t in fn.inputs if isinstance(t, ir.TensorType)}
        for o in fn.block.operations:
            self.types.update({n: t.dtype for n, t in o.outputs if isinstance(t, ir.TensorType)})
        for o in fn.block.operations:
            self._prepare(o, consts)
        self._plan_in_place()
        self._plan_frees()
        self.known = {k: v for k, v in self.known.items() if k in self._needed_known()}

    @staticmethod
    def _check_supported(fn: ir.Function) -> None:
        missing = Counter(o.type for o in fn.block.operations if o.type not in KERNELS)
        if missing:
            listing = ", ".join(f"{t} ×{n}" for t, n in sorted(missing.items()))
            raise UnsupportedOpsError(f"function {fn.name!r} uses ops the portable runtime does not implement: "
                                      f"{listing}")

    def _arg_value(self, arg: ir.Arg, consts: ConstStore):
        if arg.name is not None:
            return self.known.get(arg.name, _Var(arg.name))
        v = arg.value
        return consts.blob(v) if isinstance(v, ir.BlobRef) else compute_form(v)

    def _prepare(self, o: ir.Op, consts: ConstStore) -> None:
        if o.blocks:
            raise UnsupportedOpsError(f"op {o.type} with nested blocks (control flow) is not supported")
        args = {}
        for key, bindings in o.inputs.items():
            vals = [self._arg_value(a, consts) for a in bindings]
            args[key] = vals if key in VARIADIC or len(vals) > 1 else vals[0]
        if o.type == "const":
            v = o.attributes.get("val")
            self.known[o.outputs[0][0]] = consts.blob(v) if isinstance(v, ir.BlobRef) else compute_form(v)
            return
        # attributes other than the op's name are extra constant arguments (rare outside `const`)
        for key, v in o.attributes.items():
            if key != "name" and key not in args:
                args[key] = consts.blob(v) if isinstance(v, ir.BlobRef) else compute_form(v)
        exact = o.type in VIEW_OPS or (o.type in SELECTING_OPS and self._same_dtype(o, args))
        coercers = [None if exact else _coercer(t, self.round_fp16) for _, t in o.outputs]
        for key in SHAPE_ARGS.intersection(args):  # constant shape-like arguments: plain tuples, converted once
            v = args[key]
            if isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype.kind in "iub" and v.size <= 16:
                args[key] = tuple(v.tolist())
        names = [n for n, _ in o.outputs]
        dynamic = any(isinstance(v, _Var) or (isinstance(v, list) and any(isinstance(x, _Var) for x in v))
                      for v in args.values())
        if not dynamic and o.type not in STATE_OPS:
            fold = lambda: self._run_op(o.type, KERNELS[o.type], args, names, coercers)  # noqa: E731
            results = consts.fold((o.type, self.round_fp16), args, fold) if o.type in CONSTEXPR else fold()
            for n, r in zip(names, results):
                self.known[n] = r
            return
        self.steps.append(_Step(o.type, KERNELS[o.type], args, names, coercers))

    def _same_dtype(self, o: ir.Op, args: dict) -> bool:
        """True when an op only selects or rearranges input values and its output dtype is its input's: values
        already rounded to that dtype stay exact, so the output needs no rounding pass."""
        out_types = {t.dtype for _, t in o.outputs if isinstance(t, ir.TensorType)}
        in_types = set()
        for key in ("x", "values", "a", "b"):
            for arg in o.inputs.get(key, []):
                t = self.types.get(arg.name) if arg.name else None
                if t is None:
                    return False
                in_types.add(t)
        return len(out_types) == 1 and in_types == out_types

    def _run_op(self, op_type, kernel, kwargs, names, coercers):
        try:
            out = kernel(**kwargs)
        except OpError as e:
            raise ExecutionError(f"{self.name}: op {op_type} ({names[0]}): {e}") from None
        except (ValueError, IndexError, TypeError) as e:
            raise ExecutionError(f"{self.name}: op {op_type} ({names[0]}) failed: {e}") from None
        results = out if isinstance(out, tuple) else (out,)
        return [c(r) if c is not None and r is not None else r for c, r in zip(coercers, results)]

    def _needed_known(self) -> set:
        needed = set(self.outputs)
        for s in self.steps:
            for v in s.args.values():
                for x in (v if isinstance(v, list) else [v]):
                    if isinstance(x, _Var):
                        needed.add(x.name)
        return needed

    def _plan_frees(self) -> None:
        """Drop each intermediate from the environment after its last use: a prefill of a large model would
        otherwise keep every layer's activations alive until the function returns."""
        last: dict[str, int] = {}
        for j, s in enumerate(self.steps):
            for name in s.input_names():
                last[name] = j
            for name in s.names:
                last.setdefault(name, j)  # produced and never read: free right away
        keep = set(self.outputs) | set(self.state_inputs)
        for name, j in last.items():
            if name not in keep:
                self.steps[j].free.append(name)

    def _plan_in_place(self) -> None:
        """Mark slice_updates that may write straight into their state's buffer.

        A state value is a reference: read_state yields the live buffer and readers see its contents when they
        run (converted programs rely on this: after graph passes every slice_update and slice of a chunk reads the
        one read_state). A slice_update of the live buffer may therefore be done in place when its result only
        feeds write_state of the same state and nothing reads that state between the two."""
        root: dict[str, str] = {n: n for n in self.state_inputs}  # value name -> the state it references
        users: dict[str, list[int]] = {}
        for j, s in enumerate(self.steps):
            for name in s.input_names():
                users.setdefault(name, []).append(j)
            if s.type in ("read_state", "coreml_update_state"):
                root[s.names[0]] = s.state_name()
            elif s.type in VIEW_OPS and s.type != "slice_update" and s.first_input_name() in root:
                root[s.names[0]] = root[s.first_input_name()]
        for j, s in enumerate(self.steps):
            if s.type != "slice_update" or s.first_input_name() not in root:
                continue
            state = root[s.first_input_name()]
            uses = users.get(s.names[0], [])
            if s.names[0] in self.outputs or len(uses) != 1:
                continue
            k = uses[0]
            writer = self.steps[k]
            if writer.type != "write_state" or writer.state_name() != state:
                continue
            between = any(root.get(name) == state for i in range(j + 1, k) for name in self.steps[i].input_names())
            s.in_place = not between

    def run(self, env: dict) -> dict:
        """env: input name -> compute-form array, state name -> StateBuffer. Returns the block outputs."""
        for s in self.steps:
            kwargs = dict(s.fixed)
            for key, name in s.refs:
                kwargs[key] = env[name]
            for key, items in s.lists:
                kwargs[key] = [env[x.name] if isinstance(x, _Var) else x for x in items]
            results = self._run_op(s.type, s.kernel, kwargs, s.names, s.coercers)
            for n, r in zip(s.names, results):
                env[n] = r
            for n in s.free:
                env.pop(n, None)
        return {n: env[n] if n in env else self.known[n] for n in self.outputs}


class _Var:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"%{self.name}"


class _Step:
    """One op to run: constant arguments bound at load time, references resolved from the environment."""
    __slots__ = ("type", "kernel", "args", "names", "coercers", "fixed", "refs", "lists", "free")

    def __init__(self, type_, kernel, args, names, coercers):
        self.type, self.kernel, self.args, self.names, self.coercers = type_, kernel, args, names, coercers
        self.fixed = {k: v for k, v in args.items() if not isinstance(v, (_Var, list))}
        self.refs = [(k, v.name) for k, v in args.items() if isinstance(v, _Var)]
        self.lists = [(k, v) for k, v in args.items() if isinstance(v, list)]
        self.free: list[str] = []  # environment entries whose last use is this step

    @property
    def in_place(self) -> bool:
        return bool(self.fixed.get("_in_place"))

    @in_place.setter
    def in_place(self, value: bool) -> None:
        if value:
            self.fixed["_in_place"] = True
        else:
            self.fixed.pop("_in_place", None)

    def input_names(self):
        for v in self.args.values():
            for x in (v if isinstance(v, list) else [v]):
                if isinstance(x, _Var):
                    yield x.name

    def state_name(self):
        for key in ("input", "state"):
            v = self.args.get(key)
            if isinstance(v, _Var):
                return v.name
        return None

    def first_input_name(self):
        for key in ("x", "input", "value", "state"):
            v = self.args.get(key)
            if isinstance(v, _Var):
                return v.name
        return None
