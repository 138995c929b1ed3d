"""Backends run one model part (one function of one file) behind the same small interface:
`load(path, function_name) -> predictor` with `predict(inputs, state) -> dict` and `make_state()`, plus `boundary`,
how the backend hands fp16 tensors across its Python boundary (contract.Boundary).

`coreml` is Apple's framework (macOS 15+), `mil` the portable runtime; `auto` picks CoreML on Apple silicon Macs.
"""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

NAMES = ("auto", "coreml", "mil")


class BackendError(RuntimeError):
    pass


def macos_version() -> str:
    """The macOS version as `sw_vers -productVersion` reports it, which is what coremltools checks
    (coremltools/models/utils.py `_macos_version`). `platform.mac_ver()` can disagree: a Python built against an
    older SDK reports 10.16 on macOS 11 and later (SYSTEM_VERSION_COMPAT); it is only the fallback."""
    try:
        out = subprocess.run(["sw_vers", "-productVersion"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or platform.mac_ver()[0]


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


def coreml_available() -> tuple[bool, str]:
    """(can CoreML run stateful models here, why not)."""
    if platform.system() != "Darwin":
        return False, f"CoreML runs only on macOS (this is {platform.system()})"
    version = macos_version()
    if _major(version) < 15:
        return False, f"stateful CoreML models need macOS 15 or later (this is {version or 'an unknown version'})"
    try:
        import coremltools.libcoremlpython  # noqa: F401
    except ImportError as e:
        return False, f"coremltools cannot reach the CoreML framework ({e})"
    return True, ""


def has_neural_engine() -> bool:
    """Apple silicon: an Intel Mac runs CoreML on its CPU/GPU only."""
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def auto_backend() -> tuple[str, str]:
    """(backend `auto` resolves to, why)."""
    ok, why = coreml_available()
    if ok and not has_neural_engine():
        ok, why = False, f"this Mac has no Neural Engine ({platform.machine()})"
    return ("coreml", "CoreML on the Neural Engine") if ok else ("mil", why)


def chip_name() -> str:
    """The CPU/SoC name for benchmark reports (e.g. "Apple M3 Max")."""
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.machine()
        except (OSError, subprocess.SubprocessError):
            return platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def os_name() -> str:
    """"macOS 15.5" on a Mac (not the Darwin kernel version), else the system and release."""
    if platform.system() == "Darwin":
        return f"macOS {macos_version()}"
    return f"{platform.system()} {platform.release()}"


def resolve(name: str) -> str:
    """The backend a name stands for (`auto` resolved), without loading it."""
    if name not in NAMES:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    return auto_backend()[0] if name == "auto" else name


def select(name: str = "auto", precision: str = "fp16", compute_units: str = "CPU_AND_NE"):
    """The backend called `name`; `auto` resolves to coreml on an Apple silicon Mac, else mil."""
    name = resolve(name)
    if name == "coreml":
        ok, why = coreml_available()
        if not ok:
            raise BackendError(f"backend 'coreml' is unavailable: {why}; use --backend mil (the portable runtime)")
        if compute_units == "CPU_AND_NE" and not has_neural_engine():
            raise BackendError(f"compute units CPU_AND_NE need the Neural Engine of an Apple silicon Mac (this one is "
                               f"{platform.machine()}); pass --compute-units CPU_ONLY or CPU_AND_GPU")
        from .coreml import CoreMLBackend
        return CoreMLBackend(compute_units=compute_units)
    from .mil import MILBackend
    return MILBackend(precision=precision)
