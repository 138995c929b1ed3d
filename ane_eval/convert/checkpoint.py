"""Read a Hugging Face Llama-family checkpoint directory (config.json + safetensors) into numpy, without torch.

Only safetensors are read: pickled `.bin` checkpoints can execute code when loaded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUPPORTED = ("llama", "qwen2", "qwen3", "gemma3_text")


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
    # Gemma 3 only (HF Gemma3TextConfig): the window of the sliding layers, each layer's kind, the local RoPE base
    sliding_window: int = 0
    layer_types: tuple = ()
    rope_local_theta: float = 10000.0
    query_pre_attn_scalar: float = 0.0

    @property
    def family(self) -> str:
        """ANEMLL's architecture name: Qwen models use a native softmax, a 16-way head split and biases/norms."""
        if self.model_type == "gemma3_text":
            return "gemma3"
        return "qwen" if self.model_type.startswith("qwen") else "llama"


def read_arch(checkpoint: Path) -> Arch:
    path = checkpoint / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{checkpoint}: no config.json; expected a Hugging Face checkpoint directory")
    cfg = json.loads(path.read_text())
    model_type = cfg.get("model_type", "")
    if model_type not in SUPPORTED:
        raise CheckpointError(f"{checkpoint}: model_type {model_type!r} is not supported; expected one of {SUPPORTED}")
    if model_type == "gemma3_text":
        return _gemma3_arch(checkpoint, cfg)
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


def _gemma3_arch(checkpoint: Path, cfg: dict) -> Arch:
    """Gemma3TextConfig (transformers 5 keeps the RoPE bases in rope_parameters per layer kind; older configs say
    rope_theta and rope_local_base_freq). What ANEMLL's Gemma 3 programs do not compute is refused."""
    problems = []
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            problems.append(f"{key}={cfg[key]} is not supported (ANEMLL's Gemma 3 programs apply no softcapping)")
    if cfg.get("use_bidirectional_attention"):
        problems.append("use_bidirectional_attention is not supported; only causal Gemma 3 text models convert")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        problems.append(f"hidden_activation {act!r} is not supported; expected gelu_pytorch_tanh")
    layers = cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or ["sliding_attention" if (i + 1) % int(cfg.get("sliding_window_pattern", 6))
                                       else "full_attention" for i in range(layers)]
    if len(types) != layers or set(types) - {"sliding_attention", "full_attention"}:
        problems.append(f"layer_types must name sliding_attention/full_attention for each of the {layers} layers")
    rope = cfg.get("rope_parameters") or {}
    thetas = {}
    for kind, legacy, default in (("full_attention", "rope_theta", 1_000_000.0),
                                  ("sliding_attention", "rope_local_base_freq", 10_000.0)):
        params = rope.get(kind) or {}
        if params.get("rope_type", "default") != "default" or (kind == "full_attention" and cfg.get("rope_scaling")):
            problems.append(f"{kind} rope scaling is not supported; only default RoPE")
        thetas[kind] = float(params.get("rope_theta", cfg.get(legacy, default)))
    if problems:
        raise CheckpointError(f"{checkpoint}: " + "; ".join(problems))
    heads = cfg["num_attention_heads"]
    return Arch(
        model_type="gemma3_text", hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_layers=layers, num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab_size=cfg["vocab_size"],
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=thetas["full_attention"],
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        sliding_window=int(cfg.get("sliding_window") or 4096), layer_types=tuple(types),
        rope_local_theta=thetas["sliding_attention"],
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)))


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
