"""Resident memory: what the portable runtime holds for a model, and what this machine has available for it.

The runtime holds every weight once per package (its functions share them) in fp16 mode as fp16 — stored fp16
weights as they are, palettized and quantized ones decompressed to fp16 — and in fp32 mode as float32; plus the
KV-cache state (fp16 or float32). So the resident size follows from the weight files' blob records alone (element
counts, no data read), or, for a model not built yet, from its shapes (`estimate`). It is an upper bound in fp16
mode: a table only gathered from (the embeddings) is the weight file's mapped pages (blob.BlobFile.view), its rows
resident only as tokens gather them (the 1B benchmark's 128k-row table: a few MB, not its 0.5 GB).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from . import contract
from .mil.blob import BlobFile

GiB = 2**30


class InsufficientMemoryError(MemoryError):
    """A model that cannot fit the memory this machine has available."""


def available_bytes() -> int | None:
    """Memory available to a new allocation without swapping: Linux's MemAvailable, else free physical pages
    (os.sysconf), else None (unknown: nothing is checked). The load check reads it through this one function:
    tests fake a small machine by replacing it."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def weight_bytes(weight_file: Path, precision: str = "fp16") -> int:
    """Bytes the runtime holds for one part's weight file: each blob's elements at 2 bytes (fp16 mode: fp16 and
    decompressed weights) or 4 (fp32 mode, and float32 blobs in either)."""
    total = 0
    for dtype, count in BlobFile(weight_file).records():
        total += count * (4 if precision == "fp32" or dtype == "fp32" else 2)
    return total


def weight_file(part: Path) -> Path | None:
    """The weight file of a `.mlpackage` or `.mlmodelc` part (None: a part without stored weights)."""
    for candidate in (part / "Data" / "com.apple.CoreML" / "weights" / "weight.bin", part / "weights" / "weight.bin"):
        if candidate.is_file():
            return candidate
    return None


def state_bytes(shapes, precision: str = "fp16") -> int:
    """The KV-cache states (made once, shared by every chunk)."""
    return sum(math.prod(s) for s in shapes) * (2 if precision == "fp16" else 4)


def resident_bytes(parts: dict, state_shapes, precision: str = "fp16") -> dict:
    """{part role: bytes, ..., "state": bytes, "total": bytes} for parts {role: path}."""
    out = {}
    for role, path in parts.items():
        w = weight_file(Path(path))
        out[role] = weight_bytes(w, precision) if w is not None else 0
    out["state"] = state_bytes(state_shapes, precision)
    out["total"] = sum(out.values())
    return out


def model_resident_bytes(bundle, parts: dict, precision: str = "fp16") -> dict:
    """resident_bytes of a bundle whose parts are described (contract.describe_parts): every declared state once."""
    states = {f.name: tuple(f.shape) for part in parts.values() for sig in part.functions.values()
              for f in sig.states}
    return resident_bytes(contract.part_paths(bundle), states.values(), precision)


def estimate(config: dict, context_length: int, num_chunks: int = 1, precision: str = "fp16") -> dict:
    """The resident size of a Llama/Qwen-shaped model converted to the ANEMLL layout, from its HF config's shapes
    alone: embeddings and LM head are separate parts, each holding the vocabulary table (tied or not); the layers'
    projections and norms, and each chunk's RoPE cos/sin tables; the KV cache of `context_length` slots. LUT
    weights are held decompressed, so the estimate is the same for them. {"embeddings", "layers", "lm_head",
    "state", "total"} in bytes."""
    h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads, inter = config["num_attention_heads"], config["intermediate_size"]
    kv = config.get("num_key_value_heads", heads)
    d = config.get("head_dim") or h // heads
    size = 2 if precision == "fp16" else 4
    per_layer = h * heads * d * 2 + h * kv * d * 2 + 3 * h * inter + 2 * h
    rope = num_chunks * 2 * context_length * d
    out = {"embeddings": vocab * h * size, "layers": (layers * per_layer + h + rope) * size,
           "lm_head": vocab * h * size,
           "state": state_bytes([(2 * layers, kv, context_length, d)], precision)}
    out["total"] = sum(out.values())
    return out


def check_fits(needed: int, what: str) -> None:
    """Refuse at once, in one line, a model that cannot fit: better than swapping for an hour or being killed."""
    available = available_bytes()
    if available is not None and needed > available:
        raise InsufficientMemoryError(f"{what} needs {needed / GiB:.1f} GiB resident but this machine has "
                                      f"{available / GiB:.1f} GiB available; free memory, use a smaller or palettized "
                                      "model, or run it on a machine with more memory")
