"""The ANEMLL tensor contract: what each part declares, cross-checks between the parts, meta.yaml and metadata,
and the per-call input check that replaces CoreML's "value type not convertible" with a readable message.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .meta import MetaError, int_list, integer
from .mil import ir

STATE_NAME = "model_model_kv_cache_0"
MONOLITHIC = "monolithic"  # the role of a monolithic model's one file (embeddings + layers + LM head)
ARGMAX_OUTPUTS = ("argmax_idx", "argmax_val")


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
    """role -> file of a bundle's parts, in pipeline order: embeddings, chunk01 .. chunkNN, lm_head (or the one
    monolithic file)."""
    if bundle.monolithic is not None:
        return {MONOLITHIC: bundle.monolithic}
    paths = {"embeddings": bundle.embeddings}
    paths.update({f"chunk{i:02d}": p for i, p in enumerate(bundle.chunks, start=1)})
    paths.update({f"chunk{i:02d}_rot": p for i, p in enumerate(bundle.rotate_chunks, start=1)})
    paths["lm_head"] = bundle.lm_head
    return paths


def describe_parts(bundle) -> dict:
    """role -> Part, keyed as `part_paths`."""
    return {role: describe(path) for role, path in part_paths(bundle).items()}


def chunks_of(parts: dict) -> list:
    return [p for role, p in parts.items() if role.startswith("chunk") and not role.endswith("_rot")]


def rotate_chunks_of(parts: dict) -> list:
    """The split-rotate companions, in chunk order ([] unless the model is split_rotate)."""
    return [p for role, p in parts.items() if role.startswith("chunk") and role.endswith("_rot")]


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
    """A model's sizes: what its declarations say after cross-checking (`cross_check`), or what config.json and
    meta.yaml require (`expected_geometry`, None where they are silent)."""
    context_length: int | None
    batch_size: int | None
    hidden_size: int | None
    state_shape: tuple | None  # the unified cache `model_model_kv_cache_0` (or the first declared state)
    logits_widths: list | None  # vocabulary chunk widths, in order (an argmax head's chunks too)
    head: str = "logits"  # "logits": logits1..K; "argmax": argmax_idx/argmax_val per vocabulary chunk (0.3.5)
    monolithic: bool = False
    # state name -> shape (None: not known); Gemma 3's split cache has a local and a global state
    states: dict | None = None
    mask_width: int | None = None  # the causal mask's last dim: attention_size (0.3.5), the context before
    functions: tuple = ("infer", "prefill")  # a chunk's functions (Gemma 3 adds infer_rotate / prefill_rotate)
    update_mask: bool = False  # prefill takes an update_mask input (0.3.5 update_mask_prefill)

    @property
    def chunk_offsets(self) -> list[int]:
        """First token id of each vocabulary chunk (cumulative widths)."""
        return [sum(self.logits_widths[:k]) for k in range(len(self.logits_widths))]


def expected_rotate_functions(layout, context: int | None) -> tuple:
    """0.3.5 chunks carry infer_rotate / prefill_rotate when the context exceeds meta.yaml's sliding_window and the
    cache is split (gemma3_converter.py refuses rotate parts with single_cache)."""
    sw = layout.sliding_window
    if sw and context and context > sw and not layout.single_cache:
        return ("infer_rotate", "prefill_rotate")
    return ()


def even_split(vocab: int, parts: int) -> list[int]:
    """V // K per chunk, the first V % K one larger (the converters' split; chat.py _resolve_argmax_chunk_layout)."""
    base, extra = divmod(vocab, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _argmax_chunk_sizes(bundle, metadata: dict, n: int, where: str, problems: list) -> list[int]:
    """Vocabulary chunk widths of an argmax head, as upstream's driver maps local indices to token ids (chat.py
    `_resolve_argmax_chunk_layout`): exact `lm_head_chunk_sizes`, else an even split of `vocab_size` (meta.yaml
    first, then the head's com.anemll.* metadata). Its last fallbacks — a vocabulary guessed from the architecture
    family, widths guessed from the indices seen — would map tokens wrongly without a sign: refused instead."""
    layout = bundle.layout
    sizes, vocab = layout.lm_head_chunk_sizes, layout.vocab_size
    if n < 1:
        problems.append(f"{where} is an argmax head with no vocabulary chunks (split_lm_head missing or 0)")
        return []
    try:
        if sizes is None and metadata.get("com.anemll.lm_head_chunk_sizes"):
            sizes = int_list(where, "com.anemll.lm_head_chunk_sizes", metadata["com.anemll.lm_head_chunk_sizes"])
        if vocab is None and metadata.get("com.anemll.vocab_size"):
            vocab = integer(where, "com.anemll.vocab_size", metadata["com.anemll.vocab_size"])
    except MetaError as e:
        problems.append(str(e))
        return []
    if sizes is not None:
        if len(sizes) != n:
            problems.append(f"lm_head_chunk_sizes has {len(sizes)} entries but {where} returns {n} argmax pairs")
            return []
        if vocab is not None and sum(sizes) != vocab:
            problems.append(f"lm_head_chunk_sizes sum to {sum(sizes)} but vocab_size is {vocab}")
        return list(sizes)
    if vocab is not None:
        return even_split(vocab, n)
    problems.append(f"{where} is an argmax head but neither meta.yaml nor its metadata gives lm_head_chunk_sizes or "
                    "vocab_size, so its indices cannot be mapped to token ids; add vocab_size to meta.yaml")
    return []


def _check_head(bundle, part, function, problems: list) -> tuple[str, list[int]]:
    """(head kind, vocabulary chunk widths) of the part that ends in the LM head, from its declared outputs
    (trust the program, not meta.yaml; disagreements are problems)."""
    layout = bundle.layout
    split = bundle.split_lm_head
    if part is None:  # a compiled part: only meta.yaml can say
        if layout.argmax_in_model:
            return "argmax", _argmax_chunk_sizes(bundle, {}, split or 0, "the LM head", problems)
        return "logits", list(layout.lm_head_chunk_sizes or [])
    where = f"{part.name}" + (f" {function}" if function else "")
    sig = part.signature(function)
    names = [f.name for f in sig.outputs]
    if set(ARGMAX_OUTPUTS) & set(names):
        # llama_converter.convert_lm_head(argmax_in_model=True): per chunk torch.argmax -> int32 and the gathered
        # logit, concatenated and squeezed to [N]
        idx, val = (part.feature(function, "outputs", n) for n in ARGMAX_OUTPUTS)
        if idx is None or val is None or len(names) != 2:
            problems.append(f"{where} outputs {names}; an argmax head returns exactly argmax_idx and argmax_val")
            return "argmax", []
        n = int(idx.shape[0]) if len(idx.shape) == 1 else 0
        if (idx.dtype, val.dtype) != ("int32", "fp16") or len(idx.shape) != 1 or tuple(val.shape) != tuple(idx.shape):
            problems.append(f"{where} returns argmax_idx {idx.expected()} and argmax_val {val.expected()}; expected "
                            "int32 [N] and fp16 [N], one per vocabulary chunk")
            return "argmax", []
        if split is not None and n != split:
            problems.append(f"meta.yaml split_lm_head is {split} but {where} returns {n} argmax pairs")
        return "argmax", _argmax_chunk_sizes(bundle, part.metadata, n, where, problems)
    if layout.argmax_in_model:
        problems.append(f"meta.yaml says argmax_in_model but {where} returns {names}, not argmax_idx/argmax_val")
    outs = [f for f in sig.outputs if f.name.startswith("logits")]
    widths = [int(f.shape[-1]) if f.shape else 0 for f in outs]
    if split is not None and len(outs) != split:
        problems.append(f"meta.yaml split_lm_head is {split} but {where} has {len(outs)} logits outputs")
    if [f.name for f in outs] != [f"logits{i}" for i in range(1, len(outs) + 1)]:
        problems.append(f"{where} outputs {names}; expected logits1..logitsK")
    if layout.lm_head_chunk_sizes is not None and tuple(widths) != layout.lm_head_chunk_sizes:
        problems.append(f"meta.yaml lm_head_chunk_sizes is {list(layout.lm_head_chunk_sizes)} but {where} returns "
                        f"logits of widths {widths}")
    if layout.vocab_size is not None and widths and sum(widths) != layout.vocab_size:
        problems.append(f"meta.yaml vocab_size is {layout.vocab_size} but {where} returns {sum(widths)} logits")
    return "logits", widths


def cross_check(bundle, parts: dict, tokenizer_size: int, embeddings_width: int | None = None) -> Geometry:
    """meta.yaml vs com.anemll.* metadata vs declared shapes (`parts` from describe_parts); every disagreement
    in one error."""
    monolithic = MONOLITHIC in parts
    embeddings, lm_head = parts.get("embeddings"), parts.get("lm_head")
    chunks = [parts[MONOLITHIC]] if monolithic else chunks_of(parts)
    token_input = "input_ids" if monolithic else "hidden_states"  # what the stateful functions take
    problems = []
    meta_c, meta_b = bundle.meta_int("context_length"), bundle.meta_int("batch_size")
    declared_c, declared_b, hidden, states = set(), set(), set(), {}
    layout = bundle.layout
    located_fns, update_mask = set(), False
    rotate = rotate_chunks_of(parts)
    for i, part in enumerate(chunks, start=1):
        if part is None:
            continue
        files = [part] + ([rotate[i - 1]] if len(rotate) == len(chunks) and rotate[i - 1] is not None else [])
        located = {fn: f for f in reversed(files) for fn in f.functions}
        required = {"infer", "prefill"} | set(expected_rotate_functions(layout, meta_c))
        missing_fns = required - set(located)
        if missing_fns:
            problems.append(f"{part.name} lacks function(s) {sorted(missing_fns)}; "
                            f"{'a monolithic model' if monolithic else 'FFN chunks'} must declare "
                            f"{', '.join(sorted(required))}")
            continue
        located_fns |= set(located) & (required | {"infer_rotate", "prefill_rotate"})
        for fn, owner in sorted(located.items()):
            sig = owner.signature(fn)
            update_mask |= fn == "prefill" and owner.feature(fn, "inputs", "update_mask") is not None
            mask = owner.feature(fn, "inputs", "causal_mask")
            hs = owner.feature(fn, "inputs", token_input)
            if mask is None or hs is None or not sig.states:
                problems.append(f"{owner.name} {fn} lacks causal_mask, {token_input} or a KV-cache state")
                continue
            declared_c.add(mask.shape[-1])
            if not monolithic:
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
    A = next(iter(declared_c), layout.attention_size or meta_c)  # the mask width: attention_size (0.3.5)
    B = next(iter(declared_b), meta_b)
    C = meta_c if layout.attention_size is not None and meta_c is not None else A
    want_a, what = (layout.attention_size, "attention_size") if layout.attention_size else (meta_c, "context_length")
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
    head_part = chunks[0] if monolithic else lm_head
    head, widths = _check_head(bundle, head_part, "infer" if monolithic else None, problems)
    if lm_head is not None:
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
    state = declared_states.get(STATE_NAME, next(iter(declared_states.values()), None))
    return Geometry(context_length=C, batch_size=B, hidden_size=next(iter(hidden), 0), state_shape=state,
                    logits_widths=widths, head=head, monolithic=monolithic, states=declared_states, mask_width=A,
                    functions=tuple(sorted(located_fns)) or Geometry.functions, update_mask=update_mask)


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


def sliding_layers(cfg: dict, layers: int | None) -> int | None:
    """How many layers use the sliding-window cache, from config.json: `layer_types` (HF Gemma3TextConfig), else
    `sliding_window_pattern` (every pattern-th layer global, as convert/checkpoint.read_arch); None if neither."""
    types = cfg.get("layer_types")
    if layers and isinstance(types, list) and len(types) == layers \
            and set(types) <= {"sliding_attention", "full_attention"}:
        return sum(t == "sliding_attention" for t in types)
    pattern = _positive(cfg, "sliding_window_pattern")
    if layers and pattern:
        return sum((i + 1) % pattern != 0 for i in range(layers))
    return None


def expected_geometry(bundle) -> tuple[Geometry, list[str]]:
    """The geometry the ANEMLL contract requires, from config.json and meta.yaml alone — never from what the parts
    declare, so a part that declares a wrong shape is caught — and the names of the values neither file gives
    (their shapes stay unchecked). New layouts extend the contract here and in `expected_interface`."""
    cfg = model_config(bundle)
    layout = bundle.layout
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
    sw = layout.sliding_window
    split_cache = bool(sw) and not layout.single_cache
    n_local = sliding_layers(cfg, L) if split_cache else None
    if split_cache:
        known["config.json layer_types"] = n_local
    unknown = [k for k, v in known.items() if v is None]
    state = (2 * L, kv, S, d) if None not in (L, kv, S, d) else None
    if split_cache:
        # gemma3_converter GetTransformerStates: local [2·nLocal, Hkv, sliding_window, d] for the sliding layers,
        # global [2·nGlobal, Hkv, state_length, d] for the full-attention ones
        n_global = None if n_local is None else L - n_local
        states = {"model_model_kv_cache_local": _shape(2 * n_local if n_local is not None else None, kv, sw, d),
                  "model_model_kv_cache_global": _shape(2 * n_global if n_global is not None else None, kv, S, d)}
        state = None
    else:
        states = {STATE_NAME: state}
    V = V or layout.vocab_size
    # the head's vocabulary chunks: meta.yaml's lm_head_chunk_sizes (0.3.5), else the converters' even split
    # (V // K, the first V % K one larger); an unknown width leaves its shape unchecked, the output still expected
    if layout.lm_head_chunk_sizes is not None:
        widths = list(layout.lm_head_chunk_sizes)
    else:
        widths = (even_split(V, K) if V else [None] * K) if K else None
    head = "argmax" if layout.argmax_in_model else "logits"
    return Geometry(context_length=C, batch_size=B, hidden_size=H, state_shape=state, logits_widths=widths,
                    head=head, monolithic=layout.monolithic, states=states, mask_width=layout.attention_size or C,
                    functions=("infer", "prefill") + expected_rotate_functions(layout, C),
                    update_mask=layout.update_mask_prefill), unknown


def _shape(*dims):
    return None if None in dims else tuple(dims)


def _batch(fn: str, B):
    return 1 if fn.startswith("infer") else B


def expected_interface(geometry: Geometry, num_chunks: int) -> dict:
    """(part, function, kind, name) -> (shape, dtype) that the ANEMLL contract requires, from `expected_geometry`.
    Shapes are tuples, or a tuple of alternatives for enumerated inputs; None = not checked (undeclared by the
    contract, or a value config.json/meta.yaml does not give). Split-rotate companions count as part of their
    chunk (declared_interface merges them)."""
    C, B, H = geometry.context_length, geometry.batch_size, geometry.hidden_size
    A = geometry.mask_width or C  # the causal mask is attention_size wide (0.3.5)
    states = geometry.states if geometry.states is not None else {STATE_NAME: geometry.state_shape}
    if geometry.monolithic:
        # llama_converter.convert_monolithic: input_ids -> embeddings -> all layers -> LM head; the prefill function
        # never has the argmax ("argmax_in_model and not is_prefill") and returns row 0's logits
        exp = {}
        for fn, T in (("infer", 1), ("prefill", B)):
            exp[(MONOLITHIC, fn, "inputs", "input_ids")] = (_shape(1, T), "int32")
            exp[(MONOLITHIC, fn, "inputs", "position_ids")] = (_shape(T), "int32")
            exp[(MONOLITHIC, fn, "inputs", "causal_mask")] = (_shape(1, 1, T, A), "fp16")
            exp[(MONOLITHIC, fn, "inputs", "current_pos")] = ((1,), "int32")
            for name, shape in states.items():
                exp[(MONOLITHIC, fn, "states", name)] = (shape, "fp16")
            exp.update(_head_interface(geometry, MONOLITHIC, fn, argmax=fn == "infer"))
        return exp
    exp = {("embeddings", "main", "inputs", "input_ids"): (None if B is None else ((1, 1), (1, B)), "int32"),
           ("embeddings", "main", "outputs", "hidden_states"): (None, "fp16"),
           ("lm_head", "main", "inputs", "hidden_states"): (_shape(1, 1, H), "fp16")}
    exp.update(_head_interface(geometry, "lm_head", "main", argmax=True))
    for i in range(1, num_chunks + 1):
        part = f"chunk{i:02d}"
        for fn in geometry.functions:
            T = _batch(fn, B)
            exp[(part, fn, "inputs", "hidden_states")] = (_shape(1, T, H), "fp16")
            exp[(part, fn, "inputs", "position_ids")] = (_shape(T), "int32")
            exp[(part, fn, "inputs", "causal_mask")] = (_shape(1, 1, T, A), "fp16")
            exp[(part, fn, "inputs", "current_pos")] = ((1,), "int32")
            rows = 1 if (T == 1 or i == num_chunks) else B  # the last chunk's prefill returns row 0 only
            exp[(part, fn, "outputs", "output_hidden_states")] = (_shape(1, rows, H), "fp16")
            for name, shape in states.items():
                exp[(part, fn, "states", name)] = (shape, "fp16")
            if fn == "prefill" and geometry.update_mask:  # gemma3_converter.py: not on prefill_rotate
                exp[(part, fn, "inputs", "update_mask")] = (_shape(1, 1, A, B), "fp16")
    return exp


def _head_interface(geometry: Geometry, part: str, fn: str, argmax: bool) -> dict:
    """The LM head's outputs: logits1..K (1, 1, width) fp16, or for an argmax head argmax_idx int32 [K] and
    argmax_val fp16 [K] (llama_converter.convert_lm_head with argmax_in_model)."""
    if argmax and geometry.head == "argmax":
        k = (len(geometry.logits_widths),)
        return {(part, fn, "outputs", "argmax_idx"): (k, "int32"), (part, fn, "outputs", "argmax_val"): (k, "fp16")}
    return {(part, fn, "outputs", f"logits{k}"): (_shape(1, 1, width), "fp16")
            for k, width in enumerate(geometry.logits_widths or [], start=1)}


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
