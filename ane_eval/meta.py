"""meta.yaml: every key of ANEMLL 0.3.4 and 0.3.5 read in one place, type- and bounds-checked.

Keys and defaults follow the public 0.3.5 sources (zkh2016/Anemll at 4e77d00e): the writer
`anemll/utils/generate_meta_yaml.py` (chunked and `generate_monolithic_meta`) and the reader `tests/chat.py`
(`parse_args`: `model_type` defaults to "chunked", `state_length` and `attention_size` to the context length,
`sliding_window`, `split_rotate` with `pf`, `update_mask_prefill`, `prefill_dynamic_slice`, `single_cache`,
`argmax_in_model`, `vocab_size`, `lm_head_chunk_sizes` as a list or "a,b,c" text). `state_length` and
`attention_size` are read there but the generator never writes them. Values are untrusted: a wrong type is one
line naming the file and the key, never a silent default.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODEL_TYPES = ("chunked", "monolithic")
BOOL_KEYS = ("argmax_in_model", "split_rotate", "update_mask_prefill", "prefill_dynamic_slice", "single_cache")
INT_KEYS = ("vocab_size", "split_lm_head", "sliding_window", "attention_size", "state_length")
PER_CHANNEL_KEYS = ("lut_bits_per_channel", "lut_per_channel", "lut_embeddings_per_channel",
                    "lut_ffn_per_channel", "lut_lmhead_per_channel")
MAX_INT = 1 << 24  # larger than any context, vocabulary or batch of a real model; bounds untrusted numbers


class MetaError(ValueError):
    pass


def _version(text) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in str(text).split(".")[:3])
    except ValueError:
        return ()


@dataclass(frozen=True)
class Layout:
    """What meta.yaml says about the directory's layout and how to drive it (absent keys: None / False)."""
    version: str | None = None
    model_type: str = "chunked"
    argmax_in_model: bool = False
    vocab_size: int | None = None
    lm_head_chunk_sizes: tuple[int, ...] | None = None
    split_lm_head: int | None = None
    monolithic_model: str | None = None
    functions: tuple[str, ...] | None = None
    # read for Gemma 3 (sliding-window caches and rotate functions; see the Gemma 3 driver)
    sliding_window: int | None = None
    attention_size: int | None = None
    state_length: int | None = None
    split_rotate: bool = False
    pf: str | None = None
    single_cache: bool = False
    update_mask_prefill: bool = False
    prefill_dynamic_slice: bool = False
    lut_per_channel: tuple[tuple[str, int], ...] = ()

    @property
    def monolithic(self) -> bool:
        return self.model_type == "monolithic"

    @property
    def at_least_035(self) -> bool:
        return _version(self.version) >= (0, 3, 5)

    @property
    def prefill_rule(self) -> str:
        """How a prompt goes into the cache.

        "padded": 0.3.4 — batches of the compiled size, the last one right-padded (ANEMLL-CONTRACT.md §4).
        "full_batches": 0.3.5 with `prefill_dynamic_slice` or `update_mask_prefill` — only full batches through
          `prefill`, the rest token by token through `infer`, no padded batch (chat.py `run_prefill`,
          "Process in full batches only" / "remaining tokens one-at-a-time using infer").
        "tokens": 0.3.5 with neither — every token through `infer` (chat.py `chat_loop`: "forcing single-token
          prefill for compatibility").
        chat.py's monolithic loop honours only `update_mask_prefill`; here both layouts follow the same rule,
        since the monolithic `prefill` is the same program as a chunk's (llama_converter.convert_monolithic).
        """
        if not self.at_least_035:
            return "padded"
        return "full_batches" if (self.prefill_dynamic_slice or self.update_mask_prefill) else "tokens"


def _bool(path, key, v) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    raise MetaError(f"{path}: {key} must be true or false, got {v!r}")


def integer(path, key, v, minimum: int = 1) -> int:
    """A bounded integer from untrusted YAML or metadata text."""
    what = "a positive integer" if minimum else "an integer >= 0"
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise MetaError(f"{path}: {key} must be {what}, got {v!r}")
    try:
        n = int(v)
    except ValueError:
        raise MetaError(f"{path}: {key} must be {what}, got {v!r}") from None
    if not minimum <= n <= MAX_INT:
        raise MetaError(f"{path}: {key} must be {what} up to {MAX_INT}, got {n}")
    return n


def int_list(path, key, v) -> tuple[int, ...]:
    """A list, or upstream's comma-separated text ("1,2,3" or "[1, 2, 3]", chat.py _parse_lm_head_chunk_sizes)."""
    items = v if isinstance(v, list) else str(v).strip().strip("[]").split(",") if isinstance(v, str) else None
    if not items or len(items) > 4096:
        raise MetaError(f"{path}: {key} must be a non-empty list of positive integers, got {v!r}")
    return tuple(integer(path, key, x.strip() if isinstance(x, str) else x) for x in items)


def _name(path, key, v) -> str:
    if not isinstance(v, str) or not v.strip():
        raise MetaError(f"{path}: {key} must be a file name, got {v!r}")
    return v.strip()


def parse(path: Path, info: dict, params: dict) -> Layout:
    """The layout from meta.yaml's `model_info` and its `parameters` (already safe-loaded mappings)."""
    kw: dict = {}
    model_type = info.get("model_type", "chunked")
    if model_type not in MODEL_TYPES:
        raise MetaError(f"{path}: model_info.model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    kw["model_type"] = model_type
    if info.get("version") is not None:
        kw["version"] = str(info["version"])
    for key in BOOL_KEYS:
        if params.get(key) is not None:
            kw[key] = _bool(path, key, params[key])
    for key in INT_KEYS:
        if params.get(key) is not None:
            kw[key] = integer(path, key, params[key])
    if params.get("lm_head_chunk_sizes") is not None:
        kw["lm_head_chunk_sizes"] = int_list(path, "lm_head_chunk_sizes", params["lm_head_chunk_sizes"])
    for key in ("monolithic_model", "pf"):
        if params.get(key) is not None:
            kw[key] = _name(path, key, params[key])
    if params.get("functions") is not None:
        fns = params["functions"]
        if not isinstance(fns, list) or not all(isinstance(f, str) for f in fns):
            raise MetaError(f"{path}: functions must be a list of function names, got {fns!r}")
        kw["functions"] = tuple(fns)
    # group size per LUT; 0 means per-tensor (llama_converter.parse_lut_arg "bits,0")
    kw["lut_per_channel"] = tuple((k, integer(path, k, params[k], minimum=0)) for k in PER_CHANNEL_KEYS
                                  if params.get(k) is not None)
    return Layout(**kw)
