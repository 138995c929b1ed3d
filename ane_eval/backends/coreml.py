"""Apple CoreML as a backend (macOS 15+), written against coremltools' documented API.

`MLModel` loads `.mlpackage`, `CompiledMLModel` loads `.mlmodelc`; both take `function_name` for multifunction
programs and `compute_units`. The Neural Engine is shared between processes: a prediction that fails because the
device is busy is retried with backoff (same inputs, same state: the failed call did not run), then reported.
"""
from __future__ import annotations

import os
import time

RETRY_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class ANEBusyError(RuntimeError):
    pass


def set_environment() -> None:
    """Set before the first model loads (as upstream does): one CoreML engine per partition, no tokenizer threads."""
    os.environ.setdefault("COREML_PARTITION_LOADER_DISABLE_MULTI_ENGINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _is_busy(error: Exception) -> bool:
    text = str(error)
    return "busy" in text.lower() or "-14" in text


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
            except Exception as e:  # CoreML raises plain RuntimeError with an NSError description
                if not _is_busy(e):
                    raise
                last = e
        raise ANEBusyError(f"{self.where}: the Neural Engine stayed busy after {len(RETRY_DELAYS)} retries ({last}); "
                           "another process is using it: evaluate one model at a time") from None


class CoreMLBackend:
    name = "coreml"
    extensions = ("mlmodelc", "mlpackage")

    def __init__(self, compute_units: str = "CPU_AND_NE", sleep=time.sleep):
        import coremltools as ct

        if not hasattr(ct.ComputeUnit, compute_units):
            raise ValueError(f"compute units {compute_units!r} unknown; choose one of "
                             f"{', '.join(u.name for u in ct.ComputeUnit)}")
        self.compute_units = compute_units
        self.sleep = sleep
        set_environment()

    def describe(self) -> str:
        return f"coreml ({self.compute_units})"

    def load(self, path, function_name: str | None = None):
        import coremltools as ct

        units = getattr(ct.ComputeUnit, self.compute_units)
        kwargs = {"compute_units": units}
        if function_name:
            kwargs["function_name"] = function_name
        path = str(path)
        model = (ct.models.CompiledMLModel(path, **kwargs) if path.endswith(".mlmodelc")
                 else ct.models.MLModel(path, **kwargs))
        return _Predictor(model, f"{os.path.basename(path)}:{function_name or 'main'}", self.sleep)
