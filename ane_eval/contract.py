"""The ANEMLL tensor contract: what each part declares, cross-checks between the parts, meta.yaml and metadata,
and the per-call input check that replaces CoreML's "value type not convertible" with a readable message.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .mil import ir

STATE_NAME = "model_model_kv_cache_0"


class ContractError(ValueError):
    pass


@dataclass
class Part:
    """One model file's declared interface, read from its spec (no weights)."""
    path: Path
    functions: dict  # function name -> ir.Signature
    metadata: dict
    default_function: str

    @property
    def name(self) -> str:
        return self.path.name

    def signature(self, function: str | None = None) -> ir.Signature:
        return self.functions[function or self.default_function]

    def feature(self, function: str | None, kind: str, name: str) -> ir.Feature | None:
        return next((f for f in getattr(self.signature(function), kind) if f.name == name), None)


def describe(path: Path) -> Part:
    """The interface of an .mlpackage (its model description) or of a compiled .mlmodelc (the function signatures
    of its model.mil, with metadata.json's enumerated shapes, default function and user metadata)."""
    from .mil import frontends

    functions, metadata, default = frontends.describe(path)
    return Part(path, functions, metadata, default)


def part_paths(bundle) -> dict:
    """role -> file of a bundle's parts, in pipeline order: embeddings, chunk01 .. chunkNN, lm_head."""
    paths = {"embeddings": bundle.embeddings}
    paths.update({f"chunk{i:02d}": p for i, p in enumerate(bundle.chunks, start=1)})
    paths["lm_head"] = bundle.lm_head
    return paths


def describe_parts(bundle) -> dict:
    """role -> Part, keyed as `part_paths`."""
    return {role: describe(path) for role, path in part_paths(bundle).items()}


def chunks_of(parts: dict) -> list:
    return [p for role, p in parts.items() if role.startswith("chunk")]


def check_inputs(where: str, signature: ir.Signature, inputs: dict, hints: dict | None = None,
                 widen_fp16: bool = False) -> None:
    """Every declared input present with its declared shape and dtype, nothing undeclared. `widen_fp16` lets
    float32 stand for fp16 (the portable runtime's fp32 reference mode, which never rounds to fp16)."""
    declared = {f.name: f for f in signature.inputs}
    extra = sorted(set(inputs) - set(declared))
    missing = [n for n in declared if n not in inputs]
    if extra or missing:
        raise ContractError(f"{where}: inputs {sorted(inputs)} do not match the declared {list(declared)}"
                            + (f" (missing {missing})" if missing else "") + (f" (undeclared {extra})" if extra else ""))
    for name, f in declared.items():
        v = inputs[name]
        want = ir.NUMPY_DTYPES.get(f.dtype)
        if widen_fp16 and want is np.float16 and isinstance(v, np.ndarray) and v.dtype == np.float32:
            want = np.float32
        if not isinstance(v, np.ndarray) or (want is not None and v.dtype != want) or not f.accepts(v.shape):
            got = f"{v.shape} {v.dtype}" if isinstance(v, np.ndarray) else type(v).__name__
            hint = (hints or {}).get(name)
            raise ContractError(f"{where} expects {name} {f.expected()}, got {got}" + (f"; {hint}" if hint else ""))


def _int(md: dict, key: str) -> int | None:
    try:
        return int(md[key]) if key in md else None
    except ValueError:
        return None


@dataclass
class Geometry:
    """A model's sizes: what its declarations say after cross-checking (`cross_check`), or what config.json and
    meta.yaml require (`expected_geometry`, None where they are silent)."""
    context_length: int | None
    batch_size: int | None
    hidden_size: int | None
    state_shape: tuple | None
    logits_widths: list | None


def cross_check(bundle, parts: dict, tokenizer_size: int, embeddings_width: int | None = None) -> Geometry:
    """meta.yaml vs com.anemll.* metadata vs declared shapes (`parts` from describe_parts); every disagreement
    in one error."""
    embeddings, chunks, lm_head = parts["embeddings"], chunks_of(parts), parts["lm_head"]
    problems = []
    meta_c, meta_b = bundle.meta_int("context_length"), bundle.meta_int("batch_size")
    declared_c, declared_b, hidden, states = set(), set(), set(), {}
    for i, part in enumerate(chunks, start=1):
        if part is None:
            continue
        missing_fns = {"infer", "prefill"} - set(part.functions)
        if missing_fns:
            problems.append(f"{part.name} lacks function(s) {sorted(missing_fns)}; FFN chunks must declare infer "
                            "and prefill")
            continue
        for fn in ("infer", "prefill"):
            mask = part.feature(fn, "inputs", "causal_mask")
            hs = part.feature(fn, "inputs", "hidden_states")
            st = part.feature(fn, "states", STATE_NAME)
            if mask is None or hs is None or st is None:
                problems.append(f"{part.name} {fn} lacks causal_mask, hidden_states or the {STATE_NAME} state")
                continue
            declared_c.add(mask.shape[-1])
            hidden.add(hs.shape[-1])
            states[f"{part.name}:{fn}"] = tuple(st.shape)
            if fn == "prefill":
                declared_b.add(hs.shape[1])
        md = part.metadata
        for key, want in (("com.anemll.chunk_no", i), ("com.anemll.num_chunks", len(chunks))):
            have = _int(md, key)
            if have is not None and have != want:
                problems.append(f"{part.name}: metadata {key}={have}, but it is file {i} of {len(chunks)}")
        for key, want in (("com.anemll.context_length", declared_c), ("com.anemll.batch_size", declared_b)):
            have = _int(md, key)
            if have is not None and want and have not in want:
                problems.append(f"{part.name}: metadata {key}={have} disagrees with its declared shapes {sorted(want)}")
    if len(declared_c) > 1:
        problems.append(f"chunks declare different context lengths (causal_mask last dim): {sorted(declared_c)}")
    if len(declared_b) > 1:
        problems.append(f"chunks declare different prefill batches (hidden_states dim 1): {sorted(declared_b)}")
    if len(set(states.values())) > 1:
        problems.append("chunks declare different KV-cache states: " +
                        ", ".join(f"{k} {v}" for k, v in states.items()))
    C = next(iter(declared_c), meta_c)
    B = next(iter(declared_b), meta_b)
    if meta_c is not None and C is not None and meta_c != C:
        problems.append(f"meta.yaml context_length is {meta_c} but the model was compiled for {C} "
                        f"(causal_mask last dim); fix meta.yaml or re-convert")
    if meta_b is not None and B is not None and meta_b != B:
        problems.append(f"meta.yaml batch_size is {meta_b} but the model was compiled with prefill batch {B}; "
                        "fix meta.yaml or re-convert")
    if embeddings is not None:
        shapes = embeddings.feature(None, "inputs", "input_ids")
        batches = {s[1] for s in shapes.shapes} - {1} if shapes is not None and shapes.shapes else set()
        if B is not None and batches and B not in batches:
            problems.append(f"{embeddings.name} accepts input_ids of {shapes.expected()}, not the prefill batch "
                            f"(1, {B})")
        for key, want in (("com.anemll.context_length", C),):
            have = _int(embeddings.metadata, key)
            if have is not None and want is not None and have != want:
                problems.append(f"{embeddings.name}: metadata {key}={have}, chunks say {want}")
    widths: list[int] = []
    if lm_head is not None:
        sig = lm_head.signature()
        outs = [f for f in sig.outputs if f.name.startswith("logits")]
        widths = [int(f.shape[-1]) if f.shape else 0 for f in outs]
        split = bundle.split_lm_head
        if split is not None and len(outs) != split:
            problems.append(f"meta.yaml split_lm_head is {split} but {lm_head.name} has {len(outs)} logits outputs")
        if [f.name for f in outs] != [f"logits{i}" for i in range(1, len(outs) + 1)]:
            problems.append(f"{lm_head.name} outputs {[f.name for f in sig.outputs]}; expected logits1..logitsK")
        hs = lm_head.feature(None, "inputs", "hidden_states")
        if hs is not None:
            hidden.add(hs.shape[-1])
        if widths and sum(widths) < tokenizer_size:
            problems.append(f"the LM head covers {sum(widths)} token ids but the tokenizer has {tokenizer_size}; "
                            "some tokens could never be scored")
    if embeddings_width is not None:
        hidden.add(embeddings_width)
    if len(hidden) > 1:
        problems.append(f"parts disagree on the hidden size: {sorted(hidden)}")
    if problems:
        raise ContractError(f"{bundle.root}: inconsistent model: " + "; ".join(problems))
    if C is None or B is None:
        raise ContractError(f"{bundle.root}: cannot tell the context length and prefill batch (no meta.yaml values "
                            "and no readable declarations); add them to meta.yaml")
    state = next(iter(states.values()), None)
    return Geometry(context_length=C, batch_size=B, hidden_size=next(iter(hidden), 0), state_shape=state,
                    logits_widths=widths)


MAX_CONFIG_BYTES = 1 << 20  # a model directory's config.json is a few hundred bytes; refuse to parse more


def model_config(bundle) -> dict:
    """The model directory's config.json (the original checkpoint's geometry, Hugging Face key names); {} when
    there is none. Untrusted input: size-bounded, JSON only, a readable error naming the file."""
    import json

    path = Path(bundle.root) / "config.json"
    if not path.is_file():
        return {}
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ContractError(f"{path}: {path.stat().st_size} bytes, not a config.json (expected a small JSON object)")
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ContractError(f"{path}: not valid JSON ({e}); fix or remove it") from None
    if not isinstance(doc, dict):
        raise ContractError(f"{path}: expected a JSON object of model settings")
    return doc


def _positive(doc: dict, key: str) -> int | None:
    v = doc.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def expected_geometry(bundle) -> tuple[Geometry, list[str]]:
    """The geometry the ANEMLL contract requires, from config.json and meta.yaml alone — never from what the parts
    declare, so a part that declares a wrong shape is caught — and the names of the values neither file gives
    (their shapes stay unchecked). New layouts extend the contract here and in `expected_interface`."""
    cfg = model_config(bundle)
    C, B = bundle.meta_int("context_length"), bundle.meta_int("batch_size")
    H, V = _positive(cfg, "hidden_size"), _positive(cfg, "vocab_size")
    L, heads = _positive(cfg, "num_hidden_layers"), _positive(cfg, "num_attention_heads")
    kv = _positive(cfg, "num_key_value_heads") or heads  # Hugging Face's default: no grouping
    d = _positive(cfg, "head_dim") or (H // heads if H and heads and H % heads == 0 else None)
    S = max(bundle.meta_int("state_length") or 0, C) if C else None  # S = max(state_length, C) (contract §2)
    K = bundle.split_lm_head
    known = {"meta.yaml context_length": C, "meta.yaml batch_size": B, "config.json hidden_size": H,
             "config.json vocab_size": V, "config.json num_hidden_layers": L,
             "config.json num_key_value_heads": kv, "config.json head_dim": d, "meta.yaml split_lm_head": K}
    unknown = [k for k, v in known.items() if v is None]
    state = (2 * L, kv, S, d) if None not in (L, kv, S, d) else None
    # the head splits the vocabulary evenly; an unknown width leaves its shape unchecked, the output still expected
    widths = [V // K if V and V % K == 0 else None] * K if K else None
    if V and K and V % K:
        unknown.append(f"logits widths (config.json vocab_size {V} is not divisible by split_lm_head {K})")
    return Geometry(context_length=C, batch_size=B, hidden_size=H, state_shape=state, logits_widths=widths), unknown


def _shape(*dims):
    return None if None in dims else tuple(dims)


def expected_interface(geometry: Geometry, num_chunks: int) -> dict:
    """(part, function, kind, name) -> (shape, dtype) that the ANEMLL contract requires, from `expected_geometry`.
    Shapes are tuples, or a tuple of alternatives for enumerated inputs; None = not checked (undeclared by the
    contract, or a value config.json/meta.yaml does not give)."""
    C, B, H = geometry.context_length, geometry.batch_size, geometry.hidden_size
    exp = {("embeddings", "main", "inputs", "input_ids"): (None if B is None else ((1, 1), (1, B)), "int32"),
           ("embeddings", "main", "outputs", "hidden_states"): (None, "fp16"),
           ("lm_head", "main", "inputs", "hidden_states"): (_shape(1, 1, H), "fp16")}
    for k, width in enumerate(geometry.logits_widths or [], start=1):
        exp[("lm_head", "main", "outputs", f"logits{k}")] = (_shape(1, 1, width), "fp16")
    for i in range(1, num_chunks + 1):
        part = f"chunk{i:02d}"
        for fn, T in (("infer", 1), ("prefill", B)):
            exp[(part, fn, "inputs", "hidden_states")] = (_shape(1, T, H), "fp16")
            exp[(part, fn, "inputs", "position_ids")] = (_shape(T), "int32")
            exp[(part, fn, "inputs", "causal_mask")] = (_shape(1, 1, T, C), "fp16")
            exp[(part, fn, "inputs", "current_pos")] = ((1,), "int32")
            rows = 1 if (fn == "infer" or i == num_chunks) else B  # the last chunk's prefill returns row 0 only
            exp[(part, fn, "outputs", "output_hidden_states")] = (_shape(1, rows, H), "fp16")
            exp[(part, fn, "states", STATE_NAME)] = (geometry.state_shape, "fp16")
    return exp


def declared_interface(parts: dict) -> dict:
    """The same keys, from what each part declares (`parts` from describe_parts)."""
    out = {}
    for role, part in parts.items():
        if part is None:
            continue
        for fn, sig in part.functions.items():
            fn_key = "main" if role in ("embeddings", "lm_head") else fn
            for kind in ("inputs", "outputs", "states"):
                for f in getattr(sig, kind):
                    shape = f.shapes if f.shapes else (tuple(f.shape) if f.shape else None)
                    out[(role, fn_key, kind, f.name)] = (shape, f.dtype)
    return out
