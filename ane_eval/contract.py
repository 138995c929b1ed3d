"""The ANEMLL tensor contract: what each part declares, cross-checks between the parts, meta.yaml and metadata,
and the per-call input check that replaces CoreML's "value type not convertible" with a readable message.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .mil import ir
from .protocol import read_protocol

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


def describe(path: Path) -> Part | None:
    """The interface of an .mlpackage; None for a compiled .mlmodelc (only CoreML can read those)."""
    from .mil import proto

    if path.suffix != ".mlpackage":
        return None
    functions, metadata, default = proto.describe(path)
    return Part(path, functions, metadata, default)


def part_paths(bundle) -> dict:
    """role -> file of a bundle's parts, in pipeline order: embeddings, chunk01 .. chunkNN, lm_head."""
    paths = {"embeddings": bundle.embeddings}
    paths.update({f"chunk{i:02d}": p for i, p in enumerate(bundle.chunks, start=1)})
    paths.update({f"chunk{i:02d}_rot": p for i, p in enumerate(getattr(bundle, "rotate_chunks", []), start=1)})
    paths["lm_head"] = bundle.lm_head
    return paths


def describe_parts(bundle) -> dict:
    """role -> Part (None for compiled .mlmodelc parts), keyed as `part_paths`."""
    return {role: describe(path) for role, path in part_paths(bundle).items()}


def chunks_of(parts: dict) -> list:
    return [p for role, p in parts.items() if role.startswith("chunk") and not role.endswith("_rot")]


def rotate_chunks_of(parts: dict) -> list:
    """The split-rotate companions, in chunk order ([] unless the model is split_rotate)."""
    return [p for role, p in parts.items() if role.startswith("chunk") and role.endswith("_rot")]


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
    """What the model's own declarations say, after cross-checking."""
    context_length: int
    batch_size: int
    hidden_size: int
    state_shape: tuple
    logits_widths: list
    states: dict = None  # state name -> shape, as every chunk function declares them
    mask_width: int = 0  # the causal mask's last dim: attention_size (0.3.5), the context before


def expected_rotate_functions(meta: dict, context: int | None) -> tuple:
    """0.3.5 chunks carry infer_rotate / prefill_rotate when the context exceeds meta.yaml's sliding_window and the
    cache is split (gemma3_converter.py refuses rotate parts with single_cache)."""
    proto = read_protocol(meta)
    if proto.sliding_window and context and context > proto.sliding_window and not proto.single_cache:
        return ("infer_rotate", "prefill_rotate")
    return ()


def cross_check(bundle, parts: dict, tokenizer_size: int, embeddings_width: int | None = None) -> Geometry:
    """meta.yaml vs com.anemll.* metadata vs declared shapes (`parts` from describe_parts); every disagreement
    in one error."""
    embeddings, chunks, lm_head = parts["embeddings"], chunks_of(parts), parts["lm_head"]
    problems = []
    meta_c, meta_b = bundle.meta_int("context_length"), bundle.meta_int("batch_size")
    declared_c, declared_b, hidden, states = set(), set(), set(), {}
    proto = read_protocol(bundle.meta)
    rotate = rotate_chunks_of(parts)
    for i, part in enumerate(chunks, start=1):
        if part is None:
            continue
        files = [part] + ([rotate[i - 1]] if len(rotate) == len(chunks) and rotate[i - 1] is not None else [])
        located = {fn: f for f in reversed(files) for fn in f.functions}
        required = {"infer", "prefill"} | set(expected_rotate_functions(bundle.meta, meta_c))
        missing_fns = required - set(located)
        if missing_fns:
            problems.append(f"{part.name} lacks function(s) {sorted(missing_fns)}; FFN chunks must declare "
                            f"{', '.join(sorted(required))}")
            continue
        for fn, owner in sorted(located.items()):
            sig = owner.signature(fn)
            mask = owner.feature(fn, "inputs", "causal_mask")
            hs = owner.feature(fn, "inputs", "hidden_states")
            if mask is None or hs is None or not sig.states:
                problems.append(f"{owner.name} {fn} lacks causal_mask, hidden_states or a KV-cache state")
                continue
            declared_c.add(mask.shape[-1])
            hidden.add(hs.shape[-1])
            states[f"{owner.name}:{fn}"] = tuple((f.name, tuple(f.shape)) for f in sig.states)
            if fn.startswith("prefill"):
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
    A = next(iter(declared_c), proto.attention_size or meta_c)  # the mask width: attention_size (0.3.5)
    B = next(iter(declared_b), meta_b)
    C = meta_c if proto.attention_size is not None and meta_c is not None else A
    want_a, what = (proto.attention_size, "attention_size") if proto.attention_size else (meta_c, "context_length")
    if want_a is not None and A is not None and want_a != A:
        problems.append(f"meta.yaml {what} is {want_a} but the model was compiled for {A} "
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
    declared_states = dict(next(iter(states.values()), ()))
    return Geometry(context_length=C, batch_size=B, hidden_size=next(iter(hidden), 0),
                    state_shape=next(iter(declared_states.values()), None), logits_widths=widths,
                    states=declared_states, mask_width=A)


def expected_states(geometry: Geometry, meta: dict) -> dict:
    """State name -> shape. 0.3.5 Gemma 3 (meta.yaml sliding_window): `model_model_kv_cache_local` with the
    window's slots and `model_model_kv_cache_global` with the context's, or the unified `model_model_kv_cache_0`
    with single_cache; the layer counts, KV heads and head dim (not in meta.yaml) as declared."""
    proto = read_protocol(meta or {})
    declared = geometry.states or {}
    if not proto.sliding_window or proto.single_cache:
        shape = declared.get(STATE_NAME, geometry.state_shape)
        return {STATE_NAME: tuple(shape or ())}
    out = {}
    for name, slots in (("model_model_kv_cache_local", proto.sliding_window),
                        ("model_model_kv_cache_global", geometry.context_length)):
        have = declared.get(name)
        out[name] = (have[0], have[1], slots, have[3]) if have and len(have) == 4 else None
    return out


def expected_interface(geometry: Geometry, num_chunks: int, meta: dict | None = None) -> dict:
    """(part, function, kind, name) -> (shape, dtype) that the ANEMLL contract requires, from meta.yaml and the
    geometry the parts agree on. Shapes are tuples, or a tuple of alternatives for enumerated inputs; None =
    undeclared. Split-rotate companions count as part of their chunk (declared_interface merges them)."""
    meta = meta or {}
    proto = read_protocol(meta)
    B, H = geometry.batch_size, geometry.hidden_size
    C = proto.attention_size or geometry.context_length  # the causal mask is attention_size wide (0.3.5)
    states = expected_states(geometry, meta)
    functions = [("infer", 1), ("prefill", B)] + [(fn, 1 if fn.startswith("infer") else B)
                                                  for fn in expected_rotate_functions(meta, geometry.context_length)]
    exp = {("embeddings", "main", "inputs", "input_ids"): (((1, 1), (1, B)), "int32"),
           ("embeddings", "main", "outputs", "hidden_states"): (None, "fp16"),
           ("lm_head", "main", "inputs", "hidden_states"): ((1, 1, H), "fp16")}
    for k, width in enumerate(geometry.logits_widths, start=1):
        exp[("lm_head", "main", "outputs", f"logits{k}")] = ((1, 1, width), "fp16")
    for i in range(1, num_chunks + 1):
        part = f"chunk{i:02d}"
        for fn, T in functions:
            exp[(part, fn, "inputs", "hidden_states")] = ((1, T, H), "fp16")
            exp[(part, fn, "inputs", "position_ids")] = ((T,), "int32")
            exp[(part, fn, "inputs", "causal_mask")] = ((1, 1, T, C), "fp16")
            exp[(part, fn, "inputs", "current_pos")] = ((1,), "int32")
            rows = 1 if (T == 1 or i == num_chunks) else B  # the last chunk's prefill returns row 0 only
            exp[(part, fn, "outputs", "output_hidden_states")] = ((1, rows, H), "fp16")
            for name, shape in states.items():
                exp[(part, fn, "states", name)] = (shape, "fp16")
            if fn == "prefill" and proto.update_mask_prefill:  # gemma3_converter.py: not on prefill_rotate
                exp[(part, fn, "inputs", "update_mask")] = ((1, 1, C, B), "fp16")
    return exp


def declared_interface(parts: dict) -> dict:
    """The same keys, from what each part declares (`parts` from describe_parts)."""
    out = {}
    for role, part in parts.items():
        if part is None:
            continue
        for fn, sig in part.functions.items():
            fn_key = "main" if role in ("embeddings", "lm_head") else fn
            chunk_role = role.removesuffix("_rot")  # a split-rotate file's functions belong to its chunk
            for kind in ("inputs", "outputs", "states"):
                for f in getattr(sig, kind):
                    shape = f.shapes if f.shapes else (tuple(f.shape) if f.shape else None)
                    out[(chunk_role, fn_key, kind, f.name)] = (shape, f.dtype)
    return out
