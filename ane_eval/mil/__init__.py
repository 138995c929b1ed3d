"""Portable ML Program runtime: run CoreML `.mlpackage`, compiled `.mlmodelc` and ML Program `.mlmodel` files with
numpy, anywhere.

precision="fp16" (default) rounds every fp16 value as CoreML does. precision="fp32" is a reference mode that
skips all fp16 rounding: outputs declared fp16 come back as float32, and fp16 inputs also accept float32, so
chained parts pass full-precision tensors to each other.

    from ane_eval import mil
    p = mil.load("model.mlpackage", function_name="prefill", precision="fp16")
    state = p.make_state()
    out = p.predict({"hidden_states": x, ...}, state)

The API mirrors coremltools' `MLModel` (`predict(inputs, state)`, `make_state()`, descriptions,
`user_defined_metadata`) so the same driver code runs on both. Inputs are validated against the declared
description, and every error names the model, the function, the input, and what was expected.
"""
from __future__ import annotations

import threading
import weakref
from pathlib import Path

import numpy as np

from . import frontends, ir
from .blob import BlobError
from .fp16 import widen
from .interpreter import ConstStore, ExecutionError, Plan, UnsupportedOpsError
from .ops import KERNELS, StateBuffer
from .ir import ModelFormatError

__all__ = ["load", "MILModel", "MILState", "InputError", "ModelFormatError", "BlobError", "UnsupportedOpsError",
           "ExecutionError", "KERNELS"]



class InputError(ValueError):
    """Inputs that do not match the declared description (the readable form of CoreML's type errors)."""


class _Package:
    """A parsed package and its weights, shared by every function loaded from it."""

    def __init__(self, path: Path):
        self.path = path
        program = frontends.load(path, only="")  # names and descriptions only
        self.default_function = program.default_function
        self.function_names = sorted(program.functions)
        self.description = program.description
        self.metadata = dict(program.metadata)
        self.consts = ConstStore()
        self.lock = threading.Lock()

    def function(self, name: str) -> ir.Function:
        """One function's IR, parsed for the plan being built and not kept: a plan holds what it needs, and the
        IR of a small model is larger than its weights."""
        return frontends.load(self.path, only=name).functions[name]


_packages: "weakref.WeakValueDictionary[tuple, _Package]" = weakref.WeakValueDictionary()


def _package(path: Path) -> _Package:
    key = (str(path.resolve()), frontends.program_file(path).stat().st_mtime_ns)
    pkg = _packages.get(key)
    if pkg is None:
        pkg = _Package(path)
        _packages[key] = pkg
    return pkg


def load(path, function_name: str | None = None, precision: str = "fp16") -> "MILModel":
    return MILModel(path, function_name=function_name, precision=precision)


def _storage(dtype: str, precision: str):
    return np.float16 if dtype == "fp16" and precision == "fp16" else np.float32


class MILState:
    """The state object of one model (CoreML's MLState): one buffer per declared state, zero-initialised.

    In fp16 mode an fp16 state is stored as float16: it only ever holds fp16 values, so writes of rounded values are
    exact, and a long KV cache takes half the memory. Kernels that compute convert their inputs to float32; kernels
    that only select (slices, repeats) pass the float16 values on unchanged."""

    def __init__(self, features: tuple, owner: str, precision: str = "fp16"):
        self.features = {f.name: f for f in features}
        self.owner = owner
        self.buffers = {f.name: StateBuffer(np.zeros(f.shape, dtype=_storage(f.dtype, precision))) for f in features}

    def read_state(self, name: str) -> np.ndarray:
        f = self.features[name]
        return self.buffers[name].value.astype(ir.NUMPY_DTYPES.get(f.dtype, np.float32))

    def write_state(self, name: str, value: np.ndarray) -> None:
        f = self.features[name]
        value = np.asarray(value)
        if value.shape != tuple(f.shape):
            raise InputError(f"state {name!r} is {tuple(f.shape)} {f.dtype}; got {value.shape}")
        self.buffers[name].value[...] = value.astype(np.float16 if f.dtype == "fp16" else np.float32)


class MILModel:
    def __init__(self, path, function_name: str | None = None, precision: str = "fp16"):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such model")
        self._package = package = _package(self.path)
        self.function_name = function_name or package.default_function
        if self.function_name not in package.function_names:
            raise ModelFormatError(f"{self.path.name}: no function {self.function_name!r}; it has "
                                   f"{package.function_names}")
        self.precision = precision
        self.user_defined_metadata = dict(package.metadata)
        with package.lock:
            fn = package.function(self.function_name)
            self.signature: ir.Signature = package.description.get(self.function_name) or _from_ir(fn)
            self._plan = Plan(fn, precision, package.consts, model_name=self.path.name)
        # fp32 mode skips every fp16 rounding, the outputs' included
        self._output_dtypes = [(f.name, np.float32 if precision == "fp32" and f.dtype == "fp16"
                                else ir.NUMPY_DTYPES.get(f.dtype, np.float32)) for f in self.signature.outputs]

    # --- descriptions ----------------------------------------------------------------------------------------
    @property
    def input_description(self) -> tuple:
        return self.signature.inputs

    @property
    def output_description(self) -> tuple:
        return self.signature.outputs

    @property
    def state_description(self) -> tuple:
        return self.signature.states

    @property
    def functions(self) -> list[str]:
        return self._package.function_names

    def __repr__(self) -> str:
        return f"<mil.MILModel {self.path.name}:{self.function_name} {self.precision}>"

    # --- running ---------------------------------------------------------------------------------------------
    def make_state(self) -> MILState:
        if not self.signature.states:
            raise InputError(f"{self._where()} declares no state; call predict without one")
        return MILState(self.signature.states, str(self.path), self.precision)

    def _where(self) -> str:
        return f"{self.path.name} function {self.function_name!r}"

    def predict(self, inputs: dict, state: MILState | None = None) -> dict:
        env = self._validate(inputs, state)
        out = self._plan.run(env)
        result = {}
        with np.errstate(over="ignore"):
            for name, dtype in self._output_dtypes:
                value = out.get(name)
                if value is None:
                    raise ExecutionError(f"{self._where()}: output {name!r} was not produced")
                result[name] = np.array(value, dtype=dtype)  # a copy: never hand out a state buffer
        return result

    def _validate(self, inputs: dict, state) -> dict:
        if not isinstance(inputs, dict):
            raise InputError(f"{self._where()}: inputs must be a dict of name -> numpy array")
        declared = {f.name: f for f in self.signature.inputs}
        unknown = sorted(set(inputs) - set(declared))
        missing = [n for n in declared if n not in inputs]
        if unknown or missing:
            parts = []
            if missing:
                parts.append(f"missing input(s) {missing}")
            if unknown:
                parts.append(f"undeclared input(s) {unknown}")
            raise InputError(f"{self._where()}: {'; '.join(parts)}; it declares {list(declared)}")
        env = {}
        for name, f in declared.items():
            value = inputs[name]
            if not isinstance(value, np.ndarray):
                raise InputError(f"{self._where()}: input {name!r} must be a numpy array of {f.expected()}, "
                                 f"got {type(value).__name__}")
            want = ir.NUMPY_DTYPES.get(f.dtype)
            widened = self.precision == "fp32" and want == np.float16 and value.dtype == np.float32
            if want is not None and value.dtype != want and not widened:
                raise InputError(f"{self._where()}: input {name!r} expects {f.expected()}, got {value.shape} "
                                 f"{value.dtype}; convert with .astype(np.{np.dtype(want).name})")
            if not f.accepts(value.shape):
                raise InputError(f"{self._where()}: input {name!r} expects {f.expected()}, got {value.shape} "
                                 f"{value.dtype}")
            env[name] = widen(value) if value.dtype.kind == "f" else value
        if self.signature.states:
            if not isinstance(state, MILState):
                raise InputError(f"{self._where()} declares state(s) {[s.name for s in self.signature.states]}: "
                                 "pass state=model.make_state()")
            for f in self.signature.states:
                have = state.features.get(f.name)
                if have is None or tuple(have.shape) != tuple(f.shape):
                    raise InputError(f"{self._where()}: state {f.name!r} must be {f.expected()}; the state given "
                                     f"was made by a model with {have.expected() if have else 'no such state'}")
                env[f.name] = state.buffers[f.name]
        elif state is not None:
            raise InputError(f"{self._where()} declares no state, but one was passed")
        return env


def _from_ir(fn: ir.Function) -> ir.Signature:
    """A signature from the program itself, for `.mlmodel` files without a function description."""
    inputs = tuple(ir.Feature(n, t.dtype, tuple(t.shape)) for n, t in fn.inputs if isinstance(t, ir.TensorType))
    states = tuple(ir.Feature(n, t.wrapped.dtype, tuple(t.wrapped.shape)) for n, t in fn.inputs
                   if isinstance(t, ir.StateType))
    outputs = tuple(ir.Feature(n, "fp32", ()) for n in fn.block.outputs)
    return ir.Signature(inputs, outputs, states)
