"""Executes one ir.Function: prepared once (patterns fused, constants read and folded, identities aliased, the
steps compiled to one straight-line Python function), then run per call.

Numerics: every op computes in float32 and its output is rounded to the declared dtype; with precision "fp16"
(the default, closest to CoreML) fp16 outputs are rounded to fp16 after every op, with "fp32" they are not.

State updates: a converted model updates its KV cache as read_state -> slice_update -> write_state. Done literally
that copies the whole cache for every layer and token. When alias analysis proves that no older version of the
state is read afterwards, slice_update writes into the state buffer in place; otherwise it copies.
"""
from __future__ import annotations

import keyword
import math
from collections import Counter

import numpy as np

from . import gemm, ir
from .blob import BlobFile
from .fp16 import SMALL, round_in_place, round_to_fp16, widen
from .fuse import FUSED_OPS, fuse
from .ops import CONSTEXPR, FRESH_OPS, KERNELS, VIEW_OPS, OpError

VARIADIC = {"values"}  # inputs that are always a list (concat, stack, einsum)
SHAPE_ARGS = {"axes", "perm", "shape", "reps", "begin", "end", "stride", "begin_mask", "end_mask", "squeeze_mask",
              "size", "split_sizes", "strides", "dilations", "pad"}
# ops whose outputs are input values moved around: exact in the input's dtype, no rounding pass needed
SELECTING_OPS = {"slice_by_index", "slice_by_size", "concat", "stack", "split", "gather", "gather_along_axis", "tile",
                 "select", "reduce_max", "reduce_min", "maximum", "minimum", "relu", "abs", "band_part"}
STATE_OPS = {"read_state", "write_state", "coreml_update_state"}
SCALAR_ARGS = {"axis", "groups", "pad_type", "keep_dims", "transpose_x", "transpose_y", "interleave", "num_splits",
               "batch_dims", "validate_indices", "mode", "lower", "upper", "ascending", "k"}
SEGMENT = 32  # steps per generated function (see Plan._compile)
MULTI_OUTPUT_OPS = {"split", "topk"}  # kernels returning a tuple


class UnsupportedOpsError(NotImplementedError):
    pass


class ExecutionError(RuntimeError):
    pass


class ConstStore:
    """Weights of one model package, read once and shared by all its functions (infer and prefill share
    weights). Values are held in their compute form, float32 for floats, except those asked for as stored."""

    def __init__(self):
        self.files: dict = {}
        self.values: dict = {}

    @staticmethod
    def source(v) -> tuple | None:
        """What identifies a stored constant across functions (None for inline values)."""
        if isinstance(v, ir.StackedBlobs):
            return ("stacked",) + tuple((str(r.path), r.offset) for r in v.parts)
        if isinstance(v, ir.BlobRef):
            return ("blob", str(v.path), v.offset)
        return None

    def value(self, v, stored: bool = False, keep: bool = True, mapped: bool = False, packed: bool = False):
        """A constant in compute form: inline values converted, stored ones read (once per package). With
        `stored`, a stored constant as the file holds it (fp16 tables only gathered from, fp16 weights: the
        interpreter's _fp16_resident). Without `keep`, read and not held (the inputs of a decompression, whose
        result is what is held). With `mapped` (a table only gathered from), a stored constant held is the weight
        file's own pages (blob.BlobFile.view): resident only where rows are gathered. Projection weights are read
        into memory of their own instead, in huge pages where the system has them: streaming a file mapping's
        4 KB pages, a 64-row prefill product ran 20-30 % slower. With `packed` (a LUT's indices), sub-byte values
        not held come back as stored (blob.PackedBits)."""
        source = self.source(v)
        if source is None:
            return compute_form(v)
        key = source + (stored,)
        if key in self.values:
            return self.values[key]
        if isinstance(v, ir.StackedBlobs):  # part by part into one array, each read straight into its rows
            value, row = np.empty(v.type.shape, np.float16 if stored and v.type.dtype == "fp16" else np.float32), 0
            for ref in v.parts:
                self._file(ref).read_into(ref.offset, ref.type.dtype, value[row:row + ref.type.shape[0]])
                row += ref.type.shape[0]  # fp16 into float32 rows: widened, exactly
        elif stored and keep and mapped:
            value = self._file(v).view(v.offset, v.type.dtype, v.type.shape)
        else:
            value = self._file(v).read(v.offset, v.type.dtype, v.type.shape, packed=packed and not keep)
            value = value if stored else compute_form(value)
        if keep:
            self.values[key] = value
        return value

    def _file(self, ref: ir.BlobRef) -> BlobFile:
        if ref.path not in self.files:
            self.files[ref.path] = BlobFile(ref.path)
        return self.files[ref.path]

    def fold(self, key: tuple | None, compute):
        """Decompress once per package: infer and prefill share the dequantized weights when their inputs are
        the same stored blobs (`key`: the interpreter's _fold_key; None: not shareable, computed)."""
        if key is None:
            return compute()
        if key not in self.values:
            self.values[key] = compute()
        return self.values[key]


def compute_form(value):
    """Floats are computed in float32; everything else keeps its dtype."""
    if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.dtype != np.float32:
        return value.astype(np.float32)
    if isinstance(value, (np.floating, float)) and not isinstance(value, np.float32):
        return np.float32(value)
    return value


def _round_small(v) -> np.ndarray:
    """round_to_fp16 for outputs declared small (the compiled function inlines this cast pair)."""
    return v.astype(np.float16).astype(np.float32)


def _small_static(t) -> bool:
    return bool(t.shape) and all(isinstance(d, int) for d in t.shape) and math.prod(t.shape) < SMALL


# where an fp16 value may stay fp16 in fp16 mode: gather's table (gathered rows are widened, exactly) and the weight
# of a projection (conv, linear: gemm.py reads the fp16 weight)
FP16_RESIDENT_USES = {("gather", "x"), ("conv", "weight"), ("linear", "weight")}


def _fp16_resident(operations: list[ir.Op], outputs) -> set[str]:
    """Constants held in fp16, half the memory of the compute form: stored fp16 constants and decompressed fp16
    weights (LUT and friends) read only where FP16_RESIDENT_USES allows. fp16 mode only: fp32 mode widens
    everything at load, so its products are float32 weights times float32 activations."""
    return _read_only_by(operations, outputs, {o.outputs[0][0] for o in operations if _fp16_constant(o)},
                         lambda op_type, key: (op_type, key) in FP16_RESIDENT_USES)


def _decompression_inputs(operations: list[ir.Op], outputs) -> set[str]:
    """Stored constants read only by decompressions (a LUT's indices and table): read for it, not held after."""
    stored = {o.outputs[0][0] for o in operations if o.type == "const" and ConstStore.source(o.attributes.get("val"))}
    return _read_only_by(operations, outputs, stored, lambda op_type, key: op_type in CONSTEXPR)


def _read_only_by(operations: list[ir.Op], outputs, names: set[str], allowed) -> set[str]:
    """The values among `names` that every reader reads through an allowed (op type, input) and no block output
    returns."""
    names = set(names) - set(outputs)
    for o in operations:
        for key, bindings in o.inputs.items():
            for a in bindings:
                if a.name in names and not allowed(o.type, key):
                    names.discard(a.name)
    return names


def _fp16_constant(o: ir.Op) -> bool:
    if not o.outputs or not isinstance(o.outputs[0][1], ir.TensorType) or o.outputs[0][1].dtype != "fp16":
        return False
    if o.type == "const":
        return isinstance(o.attributes.get("val"), (ir.BlobRef, ir.StackedBlobs))
    return o.type in CONSTEXPR


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
        self.alias: dict = {}  # value name -> the _Var or constant it is identical to
        self.steps: list = []
        operations = fuse(fn.block.operations, fn.block.outputs)
        self.types = {n: t.dtype for n, t in fn.inputs if isinstance(t, ir.TensorType)}
        for o in operations:
            self.types.update({n: t.dtype for n, t in o.outputs if isinstance(t, ir.TensorType)})
        self.fp16_resident = _fp16_resident(operations, self.outputs) if self.round_fp16 else set()
        self._fp16_weights = bool(self.fp16_resident)  # products with weights held in fp16 (gemm.py)
        self.gathered = _read_only_by(operations, self.outputs, self.fp16_resident,
                                      lambda op_type, key: (op_type, key) == ("gather", "x"))
        self.transient = _decompression_inputs(operations, self.outputs)
        self.sources: dict[str, tuple] = {}  # const value name -> the stored constant it was read from
        with np.errstate(all="ignore"):  # constant folding runs kernels too (see run)
            for o in operations:
                self._prepare(o, consts)
        # the block's outputs, aliases resolved: a _Var (computed or an input) or a constant
        self.results = {n: self.alias.get(n, self.known.get(n, _Var(n))) for n in self.outputs}
        self.result_names = {v.name for v in self.results.values() if isinstance(v, _Var)}
        self._plan_in_place()
        last_use = self._last_uses()
        self._plan_frees(last_use)
        self._segments = self._compile(last_use)
        del self.known, self.alias, self.types, self.steps, self.fp16_resident, self.gathered, self.transient, self.sources  # planning only: the code holds the rest

    @staticmethod
    def _check_supported(fn: ir.Function) -> None:
        missing = Counter(o.type for o in fn.block.operations if o.type not in KERNELS)
        if missing:
            listing = ", ".join(f"{t} ×{n}" for t, n in sorted(missing.items()))
            raise UnsupportedOpsError(f"function {fn.name!r} uses ops the portable runtime does not implement: "
                                      f"{listing}")

    def _arg_value(self, arg: ir.Arg, consts: ConstStore, keep: bool = True, packed: bool = False):
        if arg.name is not None:
            if arg.name in self.alias:
                return self.alias[arg.name]
            return self.known.get(arg.name, _Var(arg.name))
        return consts.value(arg.value, keep=keep, packed=packed)

    def _prepare(self, o: ir.Op, consts: ConstStore) -> None:
        if o.blocks:
            raise UnsupportedOpsError(f"op {o.type} with nested blocks (control flow) is not supported")
        args = {}
        for key, bindings in o.inputs.items():
            # a LUT's stored indices reach its kernel still packed (ConstStore.value)
            vals = [self._arg_value(a, consts, keep=o.type not in CONSTEXPR,  # see transient
                                    packed=(o.type, key) == ("constexpr_lut_to_dense", "indices")) for a in bindings]
            args[key] = vals if key in VARIADIC or len(vals) > 1 else vals[0]
        if o.type == "const":
            v = o.attributes.get("val")
            name = o.outputs[0][0]
            self.known[name] = consts.value(v, name in self.fp16_resident, keep=name not in self.transient,
                                            mapped=name in self.gathered)
            if ConstStore.source(v) is not None:
                self.sources[name] = ConstStore.source(v)
            return
        # attributes other than the op's name are extra constant arguments (rare outside `const`)
        for key, v in o.attributes.items():
            if key != "name" and key not in args:
                args[key] = consts.value(v)
        if o.type == "identity" or (o.type == "cast" and self._same_dtype(o, args)):
            self.alias[o.outputs[0][0]] = args["x"]  # passes its input through unchanged: no step at all
            return
        if o.type in FUSED_OPS and self.round_fp16 and self.types.get(o.outputs[0][0]) == "fp16":
            # its intermediates are fp16 values too (fuse checks the dtypes); it rounds only arrays it made
            args["_round"] = round_in_place
        exact = o.type in VIEW_OPS or (o.type in SELECTING_OPS and self._same_dtype(o, args))
        coercers = [None if exact else _coercer(t, self.round_fp16) for _, t in o.outputs]
        if o.type == "gather" and o.input_name("x") in self.fp16_resident:
            coercers = [widen]  # rows of an fp16 table: exact in float32
        if o.type in FRESH_OPS or o.type in FUSED_OPS:  # a kernel's own new array: rounded where it lies
            coercers = [round_in_place if c is round_to_fp16 else c for c in coercers]
        coercers = [_round_small if c in (round_to_fp16, round_in_place) and _small_static(t) else c
                    for c, (_, t) in zip(coercers, o.outputs)]
        if o.type == "mul" and self._negates(args) and self._same_dtype(o, args):
            coercers = [None]  # x * ±1 is exact
        for key in SHAPE_ARGS.intersection(args):  # constant shape-like arguments: plain tuples, converted once
            v = args[key]
            if isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype.kind in "iub" and v.size <= 16:
                args[key] = tuple(v.tolist())
        for key in SCALAR_ARGS.intersection(args):  # and scalar settings plain Python values
            v = args[key]
            if isinstance(v, np.ndarray) and v.ndim == 0 and v.dtype.kind in "iubU":
                args[key] = v.item()
        names = [n for n, _ in o.outputs]
        dynamic = any(isinstance(v, _Var) or (isinstance(v, list) and any(isinstance(x, _Var) for x in v))
                      for v in args.values())
        if o.type in ("conv", "linear") and self._fp16_product(o, args):
            args["_fp16_values"] = True
        if not dynamic and o.type not in STATE_OPS:
            resident = names[0] in self.fp16_resident  # a decompressed weight: its fp16 values kept as float16
            if resident and o.type == "constexpr_lut_to_dense":
                # looked up in the fp16 table itself (an fp16 output's table is fp16: narrowing its compute form
                # back is exact), written straight as fp16: no float32 weight, no rounding pass
                args = dict(args, lut=np.asarray(args["lut"], np.float32).astype(np.float16))
                coercers = [None]
            fold = lambda: [r.astype(np.float16, copy=False) if resident else r  # noqa: E731
                            for r in self._run_op(o.type, KERNELS[o.type], args, names, coercers)]
            results = consts.fold(self._fold_key(o, resident), fold) if o.type in CONSTEXPR else fold()
            for n, r in zip(names, results):
                self.known[n] = r
            return
        self.steps.append(_Step(o.type, KERNELS[o.type], args, names, coercers))

    def _fold_key(self, o: ir.Op, resident: bool) -> tuple | None:
        """What a decompression's result depends on: its stored inputs by source, small settings by value; None
        when an input is neither (a large inline or computed array: not shared)."""
        parts = []
        bindings = [(k, a) for k, args in o.inputs.items() for a in args]
        bindings += [(k, ir.Arg(value=v)) for k, v in o.attributes.items() if k != "name" and k not in o.inputs]
        for key, a in bindings:
            if a.name in self.sources:
                parts.append((key, self.sources[a.name]))
                continue
            v = ConstStore.source(a.value) or (a.value if a.name is None else self.known.get(a.name))
            if isinstance(v, tuple):
                parts.append((key, v))
            elif v is None or isinstance(v, _Var) or np.size(v) > 16:
                return None
            else:
                parts.append((key, repr(np.asarray(v).tolist())))
        return (o.type, self.round_fp16, resident) + tuple(sorted(parts, key=repr))

    def _fp16_product(self, o: ir.Op, args: dict) -> bool:
        """A projection by an fp16-resident weight of fp16 values whose output is rounded to fp16 (fp16 mode): what
        lets gemm.py compute it in fp16 arithmetic with float32 accumulation."""
        weight = args.get("weight")
        return (self.round_fp16 and isinstance(weight, np.ndarray) and weight.dtype == np.float16
                and self.types.get(o.input_name("x")) == "fp16" and self.types.get(o.outputs[0][0]) == "fp16")

    @staticmethod
    def _negates(args: dict) -> bool:
        """mul(x, c) with c a constant 1 or -1 (the rotate-half and norm idioms)."""
        consts = [v for k, v in args.items() if k in ("x", "y") and not isinstance(v, _Var)]
        return len(consts) == 1 and np.size(consts[0]) == 1 and abs(float(np.asarray(consts[0]).reshape(-1)[0])) == 1

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

    def _last_uses(self) -> dict[str, float]:
        """Value name -> the last step reading it; the block's results are read after the end (inf)."""
        last: dict[str, float] = {}
        for j, s in enumerate(self.steps):
            for name in s.input_names():
                last[name] = j
        last.update(dict.fromkeys(self.result_names, math.inf))
        return last

    def _plan_frees(self, last_use: dict) -> None:
        """Drop each intermediate from the environment after its last use: a prefill of a large model would
        otherwise keep every layer's activations alive until the function returns."""
        for s in self.steps:
            s.free += [name for name in s.names if name not in last_use]  # produced and never read
        keep = set(self.state_inputs)
        for name, j in last_use.items():
            if j != math.inf and name not in keep:
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
            if s.names[0] in self.result_names or len(uses) != 1:
                continue
            k = uses[0]
            writer = self.steps[k]
            if writer.type != "write_state" or writer.state_name() != state:
                continue
            between = any(root.get(name) == state for i in range(j + 1, k) for name in self.steps[i].input_names())
            if not between:
                s.args["_in_place"] = True

    def run(self, env: dict) -> dict:
        """env: input name -> compute-form array, state name -> StateBuffer (consumed). Returns the block
        outputs."""
        # fp16 emulation wants IEEE results (inf, nan), not warnings
        with np.errstate(all="ignore"), gemm.threads_for_products(self._fp16_weights):
            try:
                for segment in self._segments:
                    segment(env)
            except (OpError, ValueError, IndexError, TypeError) as e:
                step = self._failed_step(e.__traceback__)
                if step is None:
                    raise
                detail = f": {e}" if isinstance(e, OpError) else f" failed: {e}"
                raise ExecutionError(f"{self.name}: op {step[0]} ({step[1]}){detail}") from None
        return {n: env[v.name] if isinstance(v, _Var) else v for n, v in self.results.items()}

    def _compile(self, last_use: dict) -> list:
        """Straight-line Python for the steps: every value a local variable, every kernel, rounding function and
        constant argument bound by name. A decode step of a converted transformer is hundreds of tiny ops; an
        interpreter loop assembling argument dicts and an environment costs more than the ops themselves.

        The steps are cut into functions of SEGMENT steps that hand live values on through `env`: compiling
        Python costs about 11 KB of transient memory per line, more than a small model's weights for one
        function in one piece."""
        ns: dict = {"F16": np.float16, "F32": np.float32}

        def bind(value, label: str) -> str:
            ns[label] = value
            return label

        segment_of = {n: j // SEGMENT for j, s in enumerate(self.steps) for n in s.names}
        self._line_step: dict[tuple, tuple] = {}  # (segment file, line) -> (op type, first output)
        segments = []
        for k in range(0, max(len(self.steps), 1), SEGMENT):
            names: dict[str, str] = {}

            def local(name: str) -> str:
                return names.setdefault(name, f"v{len(names)}")

            steps = self.steps[k:k + SEGMENT]
            lines = ["def run(env):"]
            for name in dict.fromkeys(n for s in steps for n in s.input_names()):  # values from before
                if segment_of.get(name, -1) < k // SEGMENT:
                    fetch = "pop" if last_use[name] < k + SEGMENT else "__getitem__"
                    lines.append(f"    {local(name)} = env.{fetch}({name!r})")
            filename = f"<mil {self.name} steps {k}..>"
            for j, s in enumerate(steps, start=k):
                self._line_step[(filename, len(lines) + 1)] = (s.type, s.names[0] if s.names else "-")
                lines += self._step_lines(j, s, local, bind)
                dead = [names[n] for n in s.free if n in names]
                if dead:
                    lines.append(f"    del {', '.join(dead)}")
            for name in (n for s in steps for n in s.names):  # values for later segments, and the results
                if last_use.get(name, -1) >= k + SEGMENT:
                    lines.append(f"    env[{name!r}] = {local(name)}")
            exec(compile("\n".join(lines), filename, "exec"), ns)
            segments.append(ns.pop("run"))
        return segments

    @staticmethod
    def _step_lines(j: int, s: "_Step", local, bind) -> list[str]:
        exprs = {}
        for key, v in s.args.items():
            if isinstance(v, _Var):
                exprs[key] = local(v.name)
            elif isinstance(v, list):
                exprs[key] = "[" + ", ".join(local(x.name) if isinstance(x, _Var) else bind(x, f"c{j}_{key}_{i}")
                                             for i, x in enumerate(v)) + "]"
            else:
                exprs[key] = bind(v, f"c{j}_{key}")
        ufunc = getattr(s.kernel, "ufunc", None)
        if ufunc is not None and exprs.keys() == {"x", "y"}:  # elementwise: numpy's ufunc, no wrapper
            call = f"{bind(ufunc, f'k{j}')}({exprs['x']}, {exprs['y']})"
        else:
            args = ", ".join(f"{k}={e}" if k.isidentifier() and not keyword.iskeyword(k) else f"**{{{k!r}: {e}}}"
                             for k, e in exprs.items())
            call = f"{bind(s.kernel, f'k{j}')}({args})"
        outs = [local(n) for n in s.names]
        if len(outs) == 1 and s.type not in MULTI_OUTPUT_OPS:
            lines = [f"    {outs[0]} = {call}"]
        elif outs:
            lines = [f"    _r = {call}", f"    {', '.join(outs)}, = _r if isinstance(_r, tuple) else (_r,)"]
        else:
            lines = [f"    {call}"]
        for i, (out, c) in enumerate(zip(outs, s.coercers)):
            if c is _round_small:
                lines.append(f"    {out} = {out}.astype(F16).astype(F32)")
            elif c is not None:
                lines.append(f"    {out} = {bind(c, f'r{j}_{i}')}({out})")
        return lines

    def _failed_step(self, tb):
        """The step whose line raised, from the generated functions' frames in the traceback."""
        step = None
        while tb is not None:
            step = self._line_step.get((tb.tb_frame.f_code.co_filename, tb.tb_lineno), step)
            tb = tb.tb_next
        return step


class _Var:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"%{self.name}"


class _Step:
    """One op to run: constant arguments bound at load time, _Var arguments resolved when it runs."""
    __slots__ = ("type", "kernel", "args", "names", "coercers", "free")

    def __init__(self, type_, kernel, args, names, coercers):
        self.type, self.kernel, self.args, self.names, self.coercers = type_, kernel, args, names, coercers
        self.free: list[str] = []  # values whose last use is this step

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
