"""The 0.3.5 meta.yaml keys that decide how a model is driven (sliding window, rotate functions, prefill rule).

MERGE NOTE: i16a's meta.yaml parser owns these keys (issue 16); this helper reads only the few the Gemma 3 driver
needs and is meant to be folded into that parser. Keys and meanings from zkh2016/Anemll@4e77d00
`tests/chat.py` (parse_args / load_metadata) and `anemll/utils/generate_meta_yaml.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

KEYS_035 = ("sliding_window", "split_rotate", "attention_size", "state_length", "update_mask_prefill",
            "prefill_dynamic_slice", "single_cache")


@dataclass(frozen=True)
class Protocol:
    sliding_window: int | None  # None: no sliding-window cache (nothing rotates)
    attention_size: int | None  # the causal mask's width; chat.py: meta attention_size, else the context
    update_mask_prefill: bool
    prefill_dynamic_slice: bool
    single_cache: bool
    split_rotate: bool
    is_035: bool  # any 0.3.5 key present: full batches through prefill, the rest token by token

    @property
    def batch_prefill(self) -> bool:
        """chat.py chat_loop: without update_mask_prefill or prefill_dynamic_slice a 0.3.5 model is prefilled one
        token at a time ("forcing single-token prefill for compatibility"); 0.3.4 models keep batch prefill."""
        return not self.is_035 or self.update_mask_prefill or self.prefill_dynamic_slice


def _bool(v) -> bool:
    return v is True or str(v).strip().lower() in ("true", "1", "yes")


def _positive(meta: dict, key: str) -> int | None:
    v = meta.get(key)
    try:
        n = int(v) if v is not None and not isinstance(v, bool) else None
    except (TypeError, ValueError):
        n = None
    if v is not None and (n is None or n <= 0):
        raise ValueError(f"meta.yaml {key} is {v!r}; expected a positive integer")
    return n


def read_protocol(meta: dict) -> Protocol:
    """`meta` is model_info.parameters (Bundle.meta); bad values are a one-line ValueError naming the key."""
    return Protocol(sliding_window=_positive(meta, "sliding_window"),
                    attention_size=_positive(meta, "attention_size"),
                    update_mask_prefill=_bool(meta.get("update_mask_prefill")),
                    prefill_dynamic_slice=_bool(meta.get("prefill_dynamic_slice")),
                    single_cache=_bool(meta.get("single_cache")), split_rotate=_bool(meta.get("split_rotate")),
                    is_035=any(k in meta for k in KEYS_035))
