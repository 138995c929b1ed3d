"""Front ends: each reads one stored form of an ML Program into the one IR (`ir.Program`) the interpreter runs.

`proto` reads `.mlpackage` directories and `.mlmodel` files (protobuf), `text` reads compiled `.mlmodelc`
directories (`model.mil` text and `metadata.json`). Callers pick neither: `load`, `describe` and `program_file`
choose by the path.
"""
from __future__ import annotations

from pathlib import Path

from .. import ir
from . import proto, text


def _frontend(path: Path):
    return text if Path(path).suffix == ".mlmodelc" else proto


def load(path, only: str | None = None) -> ir.Program:
    """The program at `path`; with `only`, the IR of that one function (the others listed by name, with None)."""
    return _frontend(path).load(Path(path), only)


def describe(path) -> tuple[dict, dict, str]:
    """({function: Signature}, user metadata, default function), without reading weights."""
    return _frontend(path).describe(Path(path))


def program_file(path) -> Path:
    """The file holding the program (its modification time tells a changed model)."""
    path = Path(path)
    return text.locate(path) if _frontend(path) is text else proto.locate(path)[0]
