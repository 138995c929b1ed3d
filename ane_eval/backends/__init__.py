"""Backends run one model part (one function of one file) behind the same small interface:
`load(path, function_name) -> predictor` with `predict(inputs, state) -> dict` and `make_state()`.

`coreml` is Apple's framework (macOS 15+), `mil` the portable runtime; `auto` picks CoreML where it can run.
"""
from __future__ import annotations

import platform
from pathlib import Path

NAMES = ("auto", "coreml", "mil")


class BackendError(RuntimeError):
    pass


def coreml_available() -> tuple[bool, str]:
    """(can CoreML run models here, why not)."""
    if platform.system() != "Darwin":
        return False, f"CoreML runs only on macOS (this is {platform.system()})"
    major = int((platform.mac_ver()[0] or "0").split(".")[0])
    if major < 15:
        return False, f"stateful CoreML models need macOS 15 or later (this is {platform.mac_ver()[0]})"
    try:
        import coremltools.libcoremlpython  # noqa: F401
    except ImportError as e:
        return False, f"coremltools cannot reach the CoreML framework ({e})"
    return True, ""


def chip_name() -> str:
    """The CPU/SoC name for benchmark reports (e.g. "Apple M3 Max")."""
    if platform.system() == "Darwin":
        import subprocess

        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.machine()
        except OSError:
            return platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def select(name: str = "auto", precision: str = "fp16", compute_units: str = "CPU_AND_NE"):
    """The backend called `name`; `auto` resolves to coreml where available, else mil."""
    if name not in NAMES:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    if name == "auto":
        name = "coreml" if coreml_available()[0] else "mil"
    if name == "coreml":
        ok, why = coreml_available()
        if not ok:
            raise BackendError(f"backend 'coreml' is unavailable: {why}; use --backend mil (the portable runtime)")
        from .coreml import CoreMLBackend
        return CoreMLBackend(compute_units=compute_units)
    from .mil import MILBackend
    return MILBackend(precision=precision)
