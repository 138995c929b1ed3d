"""Read a Hugging Face Llama-family checkpoint directory (config.json + safetensors) into numpy, without torch.

Only safetensors are read: pickled `.bin` checkpoints can execute code when loaded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUPPORTED = ("llama", "qwen2", "qwen3")


class CheckpointError(ValueError):
    pass


@dataclass(frozen=True)
class Arch:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool

    @property
    def family(self) -> str:
        """ANEMLL's architecture name: Qwen models use a native softmax, a 16-way head split and biases/norms."""
        return "qwen" if self.model_type.startswith("qwen") else "llama"


def read_arch(checkpoint: Path) -> Arch:
    path = checkpoint / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{checkpoint}: no config.json; expected a Hugging Face checkpoint directory")
    cfg = json.loads(path.read_text())
    model_type = cfg.get("model_type", "")
    if model_type not in SUPPORTED:
        raise CheckpointError(f"{checkpoint}: model_type {model_type!r} is not supported; expected one of {SUPPORTED}")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise CheckpointError(f"{checkpoint}: rope scaling {rope.get('rope_type')!r} is not supported; only default RoPE")
    heads = cfg["num_attention_heads"]
    return Arch(
        model_type=model_type,
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab_size=cfg["vocab_size"],
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def _safetensors_files(checkpoint: Path) -> list[Path]:
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [checkpoint / n for n in names]
    else:
        files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{checkpoint}: no *.safetensors weights (pickled .bin checkpoints are not read; "
                              "convert them with transformers' save_pretrained(safe_serialization=True))")
    for f in files:
        if f.resolve().parent != checkpoint.resolve() or not f.is_file():
            raise CheckpointError(f"{checkpoint}: weight file {f.name} is missing or outside the checkpoint")
    return files


def read_weights(checkpoint: Path) -> dict[str, np.ndarray]:
    """All tensors as float32 numpy arrays (bf16 widened exactly)."""
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    for f in _safetensors_files(checkpoint):
        with safe_open(f, framework="numpy") as st:
            for name in st.keys():
                try:
                    out[name] = st.get_tensor(name).astype(np.float32)
                except TypeError:  # bf16 has no numpy dtype: read the raw bits and widen
                    out[name] = _bf16(f, name)
    return out


def _bf16(path: Path, name: str) -> np.ndarray:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        begin, end = header[name]["data_offsets"]
        fh.seek(8 + n + begin)
        raw = np.frombuffer(fh.read(end - begin), dtype=np.uint16)
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(header[name]["shape"])
