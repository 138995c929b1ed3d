"""Apple CoreML as a backend (macOS 15+), written against coremltools 9's API and behaviour (models/model.py,
models/_compiled_model.py, models/utils.py, coremlpython/CoreMLPython.mm).

- Load cost: `MLModel(path.mlpackage)` compiles the package at every load, and an FFN chunk is loaded once per
  function. Each package is compiled once per process (`coremltools.models.utils.compile_model`, which compiles
  without loading) and every function is loaded from the compiled copy with `CompiledMLModel(path,
  function_name=...)`. `.mlmodelc` parts are loaded as they are.
- A part CoreML cannot load is one line naming the part and CoreML's reason (`BackendError`), never retried.
- The Neural Engine is shared between processes: a prediction that fails with the ANE framework's transient
  error (a request timeout) is retried with backoff (same inputs, same state: the failed call did not run),
  then reported.
"""
from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

from .. import contract
from . import BackendError

RETRY_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
# The transient failure of an ANE request: AppleNeuralEngine's `_ANEProgramForEvaluation
# programInferenceOtherErrorForMessage:` turns request status 15 into "...ANEProgramProcessRequestDirect() Failed
# with status=0xf : statusType=0x9: Program Inference timeout" (`_ANEErrors timeoutErrorForMethod:`); every other
# status is a "Program Inference error", which is deterministic. Matched on the words only: model paths and CoreML's
# load errors ("... with error code: -14.") must never look busy.
BUSY = re.compile(r"\bProgram Inference timeout\b")


class ANEBusyError(RuntimeError):
    pass


def set_environment() -> None:
    """Set before the first model loads (as upstream does): one CoreML engine per partition, no tokenizer threads."""
    os.environ.setdefault("COREML_PARTITION_LOADER_DISABLE_MULTI_ENGINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _is_busy(error: Exception) -> bool:
    return bool(BUSY.search(str(error)))


def coreml_reason(error: Exception) -> str:
    """CoreML's own sentence from a coremltools error: the binding formats an NSError's userInfo
    (`Utils::handleError`: `{\\n    NSLocalizedDescription = "...";\\n}`); keep the description, on one line."""
    text = str(error)
    m = re.search(r'NSLocalizedDescription\s*=\s*"((?:[^"\\]|\\.)*)"', text)
    reason = m.group(1) if m else text
    return " ".join(reason.split()) or error.__class__.__name__


class _Predictor:
    def __init__(self, model, where: str, sleep=time.sleep):
        self.model, self.where, self.sleep = model, where, sleep

    def make_state(self):
        return self.model.make_state()

    def predict(self, inputs: dict, state=None) -> dict:
        for delay in (0.0,) + RETRY_DELAYS:
            if delay:
                self.sleep(delay)
            try:
                if state is None:
                    return self.model.predict(inputs)
                return self.model.predict(inputs, state)
            except RuntimeError as e:  # the binding raises RuntimeError with the NSError's description
                if not _is_busy(e):
                    raise BackendError(f"{self.where}: CoreML prediction failed: {coreml_reason(e)}") from None
                last = e
        raise ANEBusyError(f"{self.where}: the Neural Engine still timed out after {len(RETRY_DELAYS)} retries "
                           f"({coreml_reason(last)}); another process is probably using it: evaluate one model at "
                           "a time") from None


class CoreMLBackend:
    name = "coreml"
    extensions = ("mlmodelc", "mlpackage")
    boundary = contract.COREML

    def __init__(self, compute_units: str = "CPU_AND_NE", sleep=time.sleep):
        import coremltools as ct

        if not hasattr(ct.ComputeUnit, compute_units):
            raise ValueError(f"compute units {compute_units!r} unknown; choose one of "
                             f"{', '.join(u.name for u in ct.ComputeUnit)}")
        self.compute_units = compute_units
        self.sleep = sleep
        self._compiled: dict[Path, str] = {}
        self._workdir: tempfile.TemporaryDirectory | None = None
        set_environment()

    def describe(self) -> str:
        return f"coreml ({self.compute_units})"

    def compiled_path(self, path: Path) -> str:
        """The compiled copy of a part: `.mlmodelc` as it is, a package compiled once per process into a
        directory removed with the backend."""
        from coremltools.models.utils import compile_model

        if path.suffix == ".mlmodelc":
            return str(path)
        key = path.resolve()
        if key not in self._compiled:
            if self._workdir is None:
                self._workdir = tempfile.TemporaryDirectory(prefix="ane-eval-coreml-")
            target = Path(self._workdir.name) / f"{len(self._compiled):02d}-{path.stem}.mlmodelc"
            try:
                self._compiled[key] = compile_model(str(path), destination_path=str(target))
            except Exception as e:  # coremltools raises RuntimeError (binding) or Exception (its own checks)
                raise BackendError(f"{path.name}: CoreML could not compile it: {coreml_reason(e)}") from None
        return self._compiled[key]

    def load(self, path, function_name: str | None = None):
        import coremltools as ct

        path = Path(path)
        where = f"{path.name}:{function_name or 'main'}"
        compiled = self.compiled_path(path)
        try:
            model = ct.models.CompiledMLModel(compiled, getattr(ct.ComputeUnit, self.compute_units),
                                              function_name=function_name)
        except Exception as e:  # a load failure is deterministic: report it, never retry it
            raise BackendError(f"{where}: CoreML could not load it: {coreml_reason(e)}") from None
        return _Predictor(model, where, self.sleep)

