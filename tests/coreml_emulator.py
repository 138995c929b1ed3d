"""EMULATION of coremltools' Mac boundary, for testing the CoreML path on Linux. Not CoreML, not a Mac.

What it replaces is only what coremltools reaches through its native binding, `coremltools.libcoremlpython`
(`_MLModelProxy`, its state), plus the platform facts a Mac reports. coremltools' own Python code runs unchanged on
top of it: `MLModel.predict`'s input-name check (`_verify_input_name_exists`, KeyError) and its float16 -> float32
conversion (`_update_float16_multiarray_input_to_float32`, rdar://92239209), `CompiledMLModel`, `compile_model`,
`_get_proxy_and_spec`'s RuntimeWarning on a failed load, `make_state`'s checks, `MLState`. The emulated binding
runs each function with the portable runtime (`ane_eval.mil`, fp16), so its numbers are the portable runtime's,
not the Neural Engine's. Each behaviour below names the source it reproduces (coremltools 9.0,
github.com/apple/coremltools `coremlpython/`).

In-process: `emulator = activate(monkeypatch)` (tests/test_coreml.py). Whole processes, explicitly and only from the
tests: `python -m pytest -p tests.coreml_emulator evals ...` (this module is then a pytest plugin that activates in
`pytest_configure`) and `python -m tests.coreml_emulator run ...` (the `ane-eval` command line on an emulated Mac).
Nothing in `ane_eval` imports it.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import types
import weakref
from pathlib import Path

import numpy as np

MACOS_VERSION = "15.5"          # what `sw_vers -productVersion` prints on the emulated Mac
DARWIN_RELEASE = "24.5.0"       # platform.release(): the kernel of macOS 15.5, not the macOS version
# platform.mac_ver() of a Python built against an older SDK on macOS 11+ (SYSTEM_VERSION_COMPAT): "10.16". It
# disagrees with sw_vers, which coremltools uses (coremltools/models/utils.py `_macos_version`).
MAC_VER = ("10.16", ("", "", ""), "arm64")
CHIP = "Apple M3 (emulated)"
SPEC_VERSION = 9                # MLMODEL_SPECIFICATION_VERSION_NEWEST of macOS 15 (iOS 18 programs are version 9)
SOURCE_MARKER = "ane-eval-emulator-source.txt"
# The ANE framework's transient failure of a request (AppleNeuralEngine `_ANEProgramForEvaluation
# programInferenceOtherErrorForMessage:`, status 15), as the binding formats an NSError (`Utils::handleError`:
# the userInfo dictionary's description).
BUSY_TEXT = ('{\n    NSLocalizedDescription = "processRequest:model:qos:qIndex:modelStringID:options:returnValue:error::'
             ' ANEProgramProcessRequestDirect() Failed with status=0xf : statusType=0x9: Program Inference timeout";\n}')
# A deterministic load failure as CoreML reports it (apple/coremltools#2325, finnvoor/CoreMLPipelines#4).
LOAD_FAILURE = "Failed to build the model execution plan using a model architecture file '{mil}' with error code: -14."


def user_info(description: str) -> str:
    """`Utils::handleError` (CoreMLPythonUtils.mm): `[NSString stringWithFormat:@"%@", [error userInfo]]`."""
    return '{\n    NSLocalizedDescription = "' + description.replace('"', '\\"') + '";\n}'


class Emulator:
    """What the emulated Mac did, and failures to inject."""

    def __init__(self):
        self.compiles: list[str] = []            # package paths compiled (MLModel compiles at every load)
        self.loads: list[tuple[str, str]] = []   # (compiled model name, function) of every model loaded
        self.busy = 0                            # the next N predictions fail with the ANE's transient error
        self.load_failures: dict[str, str] = {}  # part name -> CoreML's reason for refusing to load it

    def compile(self, package: str) -> str:
        """`[MLModel compileModelAtURL:]`: a `.mlmodelc` directory in a temporary location. Its content here is the
        emulator's own (a marker naming the package); a real compiled model is read by the portable runtime directly
        (the seam: `_program_of`)."""
        self.compiles.append(str(package))
        out = Path(tempfile.mkdtemp(prefix="emulated-coreml-")) / (Path(package).stem + ".mlmodelc")
        out.mkdir()
        (out / SOURCE_MARKER).write_text(str(Path(package).resolve()))
        return str(out)


STATE = Emulator()


def _program_of(compiled: str) -> Path:
    """The file the portable runtime runs for a compiled model: the package an emulated compile came from, or the
    `.mlmodelc` itself (real compiled models: ane_eval.mil reads them once it loads .mlmodelc)."""
    marker = Path(compiled) / SOURCE_MARKER
    return Path(marker.read_text()) if marker.is_file() else Path(compiled)


def _to_python(value: np.ndarray) -> np.ndarray:
    """`Utils::convertArrayValueToPython`: a Float16 MultiArray is cast to float32 ("py::array doesn't support
    fp16"); Int32, Float32 and Float64 arrays come back as they are."""
    value = np.asarray(value)
    return value.astype(np.float32) if value.dtype == np.float16 else value.copy()


def _to_multiarray(value):
    """`Utils::convertValueToObjC` + `PybindCompatibleArray dataTypeOf:` (CoreMLPythonArray.mm): an array becomes a
    MultiArray only as int32, float32 or float64 (int8 needs the macOS 26 SDK); anything else falls through every
    branch to "value type not convertible"."""
    if isinstance(value, np.ndarray) and value.dtype in (np.int32, np.float32, np.float64) and value.shape:
        return value
    raise RuntimeError("value type not convertible")


def _coreml_input(feature, value: np.ndarray) -> np.ndarray:
    """CoreML's check of a MultiArray against the declared input: the declared (or one of the enumerated) shapes,
    and the data type converted into the declared one (float32/float64 into Float16 rounds to nearest, as CoreML
    does). The wording of CoreML's refusal is not reproduced (no source of it here); ane_eval's own contract check
    runs before every call and names the problem itself."""
    if not feature.accepts(value.shape):
        raise RuntimeError(user_info(f"MultiArray shape {value.shape} does not match the shape "
                                     f"{feature.expected()} of input '{feature.name}' (emulated wording)"))
    if feature.dtype == "fp16" and value.dtype.kind == "f":
        return value.astype(np.float16)
    if feature.dtype == "int32" and value.dtype == np.int32:
        return value
    raise NotImplementedError(f"emulator: CoreML's conversion of {value.dtype} into a {feature.dtype} input is not "
                              "established from a source; not emulated")


class _State:
    """`State` (CoreMLPython.mm): the MLState of one model."""

    def __init__(self, mil_state):
        self.impl = mil_state

    def read_state(self, name: str):
        # `State::readState` -> `convertArrayValueToPython`: fp16 state comes back as float32
        return _to_python(self.impl.read_state(name))

    def write_state(self, name: str, value) -> None:
        # `State::writeState`: `convertValueToObjC` then `transferToMultiArray` (converts to the state's type)
        self.impl.write_state(name, _to_multiarray(value))


class _MLModelProxy:
    """`Model` (CoreMLPython.mm), the object coremltools calls `_MLModelProxy`."""

    def __init__(self, url: str, compute_units: str, function_name: str, optimization_hints=None, asset=None):
        from ane_eval import mil

        self.compute_units = compute_units
        # `Utils::isCompiledModelPath`: a path ending in .mlmodelc is loaded as it is; anything else is compiled first
        # (`compileModelAtURL`) into a temporary copy deleted with the model (`m_deleteCompiledModelOnExit`)
        if url.rstrip("/").endswith(".mlmodelc"):
            self.compiled = url
        else:
            self.compiled = STATE.compile(url)
            weakref.finalize(self, shutil.rmtree, str(Path(self.compiled).parent), True)
        program = _program_of(self.compiled)
        reason = STATE.load_failures.get(program.name) or STATE.load_failures.get(Path(self.compiled).name)
        if reason:  # `modelWithContentsOfURL:` failed: `Utils::handleError` raises the userInfo text
            raise RuntimeError(user_info(reason.format(mil=f"{self.compiled}/model.mil")))
        try:
            self.model = mil.load(program, function_name=function_name or None, precision="fp16")
        except (ValueError, OSError, NotImplementedError) as e:
            raise RuntimeError(user_info(str(e).splitlines()[0])) from None
        STATE.loads.append((Path(self.compiled).name, self.model.function_name))

    @staticmethod
    def maximum_supported_specification_version() -> int:
        return SPEC_VERSION

    @staticmethod
    def compileModel(url: str) -> str:
        return STATE.compile(url)

    def get_compiled_model_path(self) -> str:
        return self.compiled

    def newState(self) -> _State:
        return _State(self.model.make_state())

    def predict(self, data: dict, state: _State | None = None) -> dict:
        # `Utils::dictToFeatures`: every value converted (or refused) before CoreML sees it
        features = {k: _to_multiarray(v) for k, v in data.items()}
        declared = {f.name: f for f in self.model.input_description}
        missing = [n for n in declared if n not in features]
        if missing:  # CoreML refuses a prediction without a declared feature; extra features are not read
            raise RuntimeError(user_info(f"Feature {missing[0]} is required but not specified. (emulated wording)"))
        inputs = {n: _coreml_input(f, features[n]) for n, f in declared.items()}
        if STATE.busy:
            STATE.busy -= 1
            raise RuntimeError(BUSY_TEXT)
        out = self.model.predict(inputs, state.impl if state is not None else None)
        return {k: _to_python(v) for k, v in out.items()}  # `Utils::featuresToDict`


def _fake_bin() -> str:
    """`sw_vers` and `sysctl` as a Mac answers them, on PATH."""
    d = Path(tempfile.mkdtemp(prefix="emulated-mac-bin-"))
    (d / "sw_vers").write_text(f"#!/bin/sh\n[ \"$1\" = -productVersion ] && echo {MACOS_VERSION} && exit 0\n"
                               f"echo ProductName: macOS; echo ProductVersion: {MACOS_VERSION}\n")
    (d / "sysctl").write_text(f"#!/bin/sh\necho '{CHIP}'\n")
    for f in d.iterdir():
        f.chmod(0o755)
    return str(d)


def activate(monkeypatch) -> Emulator:
    """Make this process an emulated Apple silicon Mac with macOS 15.5 and CoreML (undone with `monkeypatch`)."""
    import os
    import platform

    import coremltools.models._compiled_model as compiled_model
    import coremltools.models.model as model
    import coremltools.models.utils as utils

    global STATE
    STATE = Emulator()
    binding = types.ModuleType("coremltools.libcoremlpython")
    binding.__doc__ = "EMULATED binding (tests/coreml_emulator.py)"
    binding._MLModelProxy = _MLModelProxy
    monkeypatch.setitem(sys.modules, "coremltools.libcoremlpython", binding)
    for module in (model, compiled_model):
        monkeypatch.setattr(module, "_MLModelProxy", _MLModelProxy)
    # coremltools' own platform checks (`_is_macos`: sys.platform == "darwin"; `_macos_version`: sw_vers), imported
    # by name into the modules that use them
    for module in (utils, model, compiled_model):
        if hasattr(module, "_is_macos"):
            monkeypatch.setattr(module, "_is_macos", lambda: True)
        monkeypatch.setattr(module, "_macos_version", lambda: tuple(int(v) for v in MACOS_VERSION.split(".")))
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    monkeypatch.setattr(platform, "release", lambda: DARWIN_RELEASE)
    monkeypatch.setattr(platform, "mac_ver", lambda *a: MAC_VER)
    monkeypatch.setenv("PATH", _fake_bin() + os.pathsep + os.environ.get("PATH", ""))
    return STATE


# --- activation for whole processes (test-only entry points) ---------------------------------------------------
def pytest_configure(config):
    """`-p tests.coreml_emulator`: the pytest session runs on an emulated Mac."""
    import pytest

    activate(pytest.MonkeyPatch())


if __name__ == "__main__":
    import pytest

    from ane_eval.cli import main

    activate(pytest.MonkeyPatch())
    sys.exit(main(sys.argv[1:]))
