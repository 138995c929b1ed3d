"""The portable runtime as a backend."""
from __future__ import annotations

from .. import contract, mil


class MILBackend:
    name = "mil"
    extensions = ("mlpackage", "mlmodelc")

    def __init__(self, precision: str = "fp16"):
        if precision not in ("fp16", "fp32"):
            raise ValueError(f"precision must be fp16 or fp32, got {precision!r}")
        self.precision = precision
        self.boundary = contract.NATIVE if precision == "fp16" else contract.WIDE

    def describe(self) -> str:
        return f"mil (portable runtime, {self.precision})"

    def load(self, path, function_name: str | None = None):
        return mil.load(path, function_name=function_name, precision=self.precision)
