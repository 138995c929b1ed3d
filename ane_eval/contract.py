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
    paths["lm_head"] = bundle.lm_head
    return paths


def describe_parts(bundle) -> dict:
    """role -> Part (None for compiled .mlmodelc parts), keyed as `part_paths`."""
    return {role: describe(path) for role, path in part_paths(bundle).items()}


def chunks_of(parts: dict) -> list:
    return [p for role, p in parts.items() if role.startswith("chunk")]


@dataclass(frozen=True)
class Boundary:
    """How a backend hands declared fp16 tensors across its Python boundary: which array dtypes stand for fp16,
    and whether a float32 standing for fp16 must hold fp16 values (else the backend would round it, and what ran
    would not be what was fed)."""
    fp16_dtypes: tuple = (np.float16,)
    exact: bool = True


NATIVE = Boundary()                                             # the portable runtime, fp16: float16 arrays
WIDE = Boundary((np.float16, np.float32), exact=False)          # its fp32 reference mode: never rounds to fp16
# CoreML: coremltools converts float16 inputs to float32 before the binding (models/model.py
# `_update_float16_multiarray_input_to_float32`) and returns fp16 outputs as float32 (coremlpython/
# CoreMLPythonUtils.mm `convertArrayValueToPython`); CoreML rounds float32 into the Float16 input itself.
COREML = Boundary((np.float32, np.float16), exact=True)


def check_inputs(where: str, signature: ir.Signature, inputs: dict, hints: dict | None = None,
                 boundary: Boundary = NATIVE) -> None:
    """Every declared input present with its declared shape and dtype, nothing undeclared. A declared fp16 input
    takes the dtypes of the backend's `boundary`; integer inputs take exactly their declared dtype."""
    declared = {f.name: f for f in signature.inputs}
    extra = sorted(set(inputs) - set(declared))
    missing = [n for n in declared if n not in inputs]
    if extra or missing:
        raise ContractError(f"{where}: inputs {sorted(inputs)} do not match the declared {list(declared)}"
                            + (f" (missing {missing})" if missing else "") + (f" (undeclared {extra})" if extra else ""))
    for name, f in declared.items():
        v = inputs[name]
        want = ir.NUMPY_DTYPES.get(f.dtype)
        allowed = boundary.fp16_dtypes if want is np.float16 else (want,)
        if not isinstance(v, np.ndarray) or (want is not None and v.dtype not in allowed) or not f.accepts(v.shape):
            got = f"{v.shape} {v.dtype}" if isinstance(v, np.ndarray) else type(v).__name__
            hint = (hints or {}).get(name)
            raise ContractError(f"{where} expects {name} {f.expected()}, got {got}" + (f"; {hint}" if hint else ""))
        if want is np.float16 and boundary.exact and v.dtype != np.float16 and not _holds_fp16(v):
            raise ContractError(f"{where}: {name} holds values that are not fp16; the model would round them, so "
                                "what runs is not what was fed: round to fp16 first (.astype(np.float16))")


def _holds_fp16(v: np.ndarray) -> bool:
    with np.errstate(over="ignore"):
        return bool(np.array_equal(v.astype(np.float16).astype(v.dtype), v, equal_nan=True))


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


def expected_interface(geometry: Geometry, num_chunks: int) -> dict:
    """(part, function, kind, name) -> (shape, dtype) that the ANEMLL contract requires, from the geometry the
    parts agree on. Shapes are tuples, or a tuple of alternatives for enumerated inputs; None = undeclared."""
    C, B, H = geometry.context_length, geometry.batch_size, geometry.hidden_size
    state = tuple(geometry.state_shape or ())
    exp = {("embeddings", "main", "inputs", "input_ids"): (((1, 1), (1, B)), "int32"),
           ("embeddings", "main", "outputs", "hidden_states"): (None, "fp16"),
           ("lm_head", "main", "inputs", "hidden_states"): ((1, 1, H), "fp16")}
    for k, width in enumerate(geometry.logits_widths, start=1):
        exp[("lm_head", "main", "outputs", f"logits{k}")] = ((1, 1, width), "fp16")
    for i in range(1, num_chunks + 1):
        part = f"chunk{i:02d}"
        for fn, T in (("infer", 1), ("prefill", B)):
            exp[(part, fn, "inputs", "hidden_states")] = ((1, T, H), "fp16")
            exp[(part, fn, "inputs", "position_ids")] = ((T,), "int32")
            exp[(part, fn, "inputs", "causal_mask")] = ((1, 1, T, C), "fp16")
            exp[(part, fn, "inputs", "current_pos")] = ((1,), "int32")
            rows = 1 if (fn == "infer" or i == num_chunks) else B  # the last chunk's prefill returns row 0 only
            exp[(part, fn, "outputs", "output_hidden_states")] = ((1, rows, H), "fp16")
            exp[(part, fn, "states", STATE_NAME)] = (state, "fp16")
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
