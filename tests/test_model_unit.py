"""ANEModel's driving logic (prefill rules and batching, positions, rewind, reset, infer/next_token,
token_evaluations) on a stand-in backend, milliseconds per test; tests/test_model*.py run the same protocol on the
demo model (seconds).

The stand-in follows the backend protocol of ane_eval/backends/__init__.py (`load(path, function) -> predictor`,
`predict(inputs, state)`, `make_state()`, `boundary`, `name`, `describe()`), uses the real state object
(mil.MILState, the portable runtime's), and computes like the converted parts do (llama_converter): a chunk
writes its T rows into the cache at current_pos.. (slice_update; with an update_mask input, row i where the mask
column i is 1, as gemma3_converter) and each query row reads the cached keys its additive causal mask leaves at
0. Its toy "attention" sums the cached token ids, so the greedy next token after position p is
sum(tokens 0..p) mod V: exactly right only if every position the mask shows holds the caller's token.

With `sliding=True` the toy is a Gemma 3 model (0.3.5, split cache): each chunk runs a sliding-window layer over a
local cache of SW slots, then a full-attention layer over a global cache of C slots, and its rotate functions
shift the local cache as the converters build them (see `Predictor.gemma3`). Its answer is then right only if the
driver called each function at the positions it is built for.
"""
import gc
import re
import weakref
from pathlib import Path

import numpy as np
import pytest

from ane_eval import contract, memory, model as model_mod
from ane_eval.bundle import Bundle
from ane_eval.contract import COREML, NATIVE, ContractError, Part
from ane_eval.meta import Layout
from ane_eval.mil import MILState
from ane_eval.mil.ir import Feature, Signature
from ane_eval.model import ANEModel, ContextOverflowError, NoLogitsError, causal_mask, update_mask

C, B, H, V = 16, 4, 8, 32
STATE = (2, 1, C, 4)
HALF = V // 2
# Gemma 3: the batch divides the window and the context exceeds it (ane_eval/convert/__init__.py refuses otherwise);
# gemma3_converter GetTransformerStates: local [2·nLocal, Hkv, sliding_window, d], global [2·nGlobal, Hkv, S, d]
SW = 8
LOCAL, GLOBAL = "model_model_kv_cache_local", "model_model_kv_cache_global"
SPLIT_STATES = ((LOCAL, (2, 1, SW, 4)), (GLOBAL, (2, 1, C, 4)))


def F(name, dtype, shape, shapes=()):
    return Feature(name, dtype, tuple(shape), tuple(shapes))


def stateful_sig(T, token_input, outputs, extra=(), states=((contract.STATE_NAME, STATE),)):
    first = F("input_ids", "int32", (1, T)) if token_input == "input_ids" else F("hidden_states", "fp16", (1, T, H))
    return Signature(inputs=(first, F("position_ids", "int32", (T,)), F("causal_mask", "fp16", (1, 1, T, C)),
                             F("current_pos", "int32", (1,)), *extra),
                     outputs=tuple(outputs), states=tuple(F(n, "fp16", shape) for n, shape in states))


def head_outputs(argmax):
    if argmax:
        return (F("argmax_idx", "int32", (2,)), F("argmax_val", "fp16", (2,)))
    return (F("logits1", "fp16", (1, 1, HALF)), F("logits2", "fp16", (1, 1, HALF)))


def build(tmp_path, chunks=1, monolithic=False, argmax=False, with_update_mask=False, sliding=False, **layout):
    """(bundle, parts) of a consistent toy model; the Parts are what frontends.describe would return for it.
    `sliding`: Gemma 3 (0.3.5, sliding_window SW, local + global caches, prefill_dynamic_slice unless
    update_mask_prefill), with infer_rotate / prefill_rotate in each chunk file, or in `_rot` files with
    `split_rotate=True` (combine_models.py combine_chunks_split_rotate)."""
    root = tmp_path
    meta = {"context_length": C, "batch_size": B, "split_lm_head": 2}
    if sliding:
        layout = {"version": "0.3.5", "sliding_window": SW,
                  "prefill_dynamic_slice": not layout.get("update_mask_prefill"), **layout}
    lay = Layout(argmax_in_model=argmax, vocab_size=V, model_type="monolithic" if monolithic else "chunked", **layout)
    if monolithic:
        path = root / "toy_monolithic.mlpackage"
        fns = {"infer": stateful_sig(1, "input_ids", head_outputs(argmax)),
               "prefill": stateful_sig(B, "input_ids", head_outputs(False))}
        b = Bundle(root=root, embeddings=None, chunks=[], lm_head=None, tokenizer_dir=root, meta=meta, name="toy",
                   layout=lay, monolithic=path)
        return b, {contract.MONOLITHIC: Part(path, fns, {}, "infer")}
    paths = [root / f"toy_FFN_PF_chunk_{i:02d}of{chunks:02d}.mlpackage" for i in range(1, chunks + 1)]
    split_rotate = sliding and lay.split_rotate
    rot_paths = [p.with_name(p.stem + "_rot.mlpackage") for p in paths] if split_rotate else []
    b = Bundle(root=root, embeddings=root / "toy_embeddings.mlpackage", chunks=paths,
               lm_head=root / "toy_lm_head.mlpackage", tokenizer_dir=root, meta=meta, name="toy", layout=lay,
               rotate_chunks=rot_paths)
    um = (F("update_mask", "fp16", (1, 1, C, B)),) if with_update_mask else ()
    states = SPLIT_STATES if sliding else ((contract.STATE_NAME, STATE),)
    parts = {"embeddings": Part(b.embeddings, {"main": Signature(
        (F("input_ids", "int32", (1, 1), shapes=[(1, 1), (1, B)]),), (F("hidden_states", "fp16", ()),), ())},
        {}, "main")}
    for i, p in enumerate(paths, start=1):
        rows = 1 if i == chunks else B  # the last chunk's prefill returns row 0 only
        infer = stateful_sig(1, "hidden_states", (F("output_hidden_states", "fp16", (1, 1, H)),), states=states)
        fns = {"infer": infer, "prefill": stateful_sig(
            B, "hidden_states", (F("output_hidden_states", "fp16", (1, rows, H)),), um, states=states)}
        # gemma3_converter: the rotate functions have the same interface, but prefill_rotate never an update_mask
        rotate = {"infer_rotate": infer, "prefill_rotate": stateful_sig(
            B, "hidden_states", (F("output_hidden_states", "fp16", (1, rows, H)),), states=states)}
        if split_rotate:
            parts[f"chunk{i:02d}"] = Part(p, fns, {}, "infer")
            parts[f"chunk{i:02d}_rot"] = Part(rot_paths[i - 1], rotate, {}, "infer_rotate")
        else:
            parts[f"chunk{i:02d}"] = Part(p, {**fns, **(rotate if sliding else {})}, {}, "infer")
    parts["lm_head"] = Part(b.lm_head, {"main": Signature((F("hidden_states", "fp16", (1, 1, H)),),
                                                          head_outputs(argmax), ())}, {}, "main")
    return b, parts


class Predictor:
    """One function of one toy part."""

    def __init__(self, backend, part, function):
        self.backend, self.part, self.function = backend, part, function
        self.sig = part.signature(function)

    def make_state(self):
        return MILState(self.sig.states, str(self.part.path))

    def predict(self, inputs, state=None):
        self.backend.calls.append((self.part.name, self.function, {k: np.copy(v) for k, v in inputs.items()}))
        assert (state is None) == (not self.sig.states), "a stateful function is called with its state"
        # the runtimes refuse a missing or undeclared input, whatever the caller knows of the declarations
        # (mil/__init__.py MILModel._validate; CoreML checks its model description)
        assert sorted(inputs) == sorted(f.name for f in self.sig.inputs), f"{self.function}: inputs {sorted(inputs)}"
        names = [f.name for f in self.sig.outputs]
        if "hidden_states" in names:  # embeddings: the token id in feature 0
            ids = inputs["input_ids"]
            out = np.zeros((1, ids.shape[1], H), np.float16)
            out[0, :, 0] = ids[0]
            return {"hidden_states": out}
        if not self.sig.states:  # LM head
            return self.head(float(inputs["hidden_states"][0, 0, 0]))
        x = inputs["input_ids"][0].astype(np.float32) if "input_ids" in inputs else \
            inputs["hidden_states"][0, :, 0].astype(np.float32)
        # every chunk owns its layers' slice of the one unified cache (ANEMLL-CONTRACT.md): here column `layer`
        layer = int(self.part.name.split("_chunk_")[1][:2]) - 1 if "_chunk_" in self.part.name else 0
        visible = inputs["causal_mask"][0, 0] == 0  # (T, C): -inf hides a key
        if LOCAL in state.features:
            sums = self.gemma3(inputs, state, x, layer, visible)
        else:
            cache = state.read_state(contract.STATE_NAME)
            cache[0, 0, :, layer] = write(cache[0, 0, :, layer], x, inputs)
            state.write_state(contract.STATE_NAME, cache)
            sums = (visible * cache[0, 0, :, layer].astype(np.float32)).sum(axis=1)
        outs = {}
        if "output_hidden_states" in names:
            rows = self.sig.outputs[0].shape[1]
            h = np.zeros((1, rows, H), np.float16)
            h[0, :, 0] = sums[:rows]
            outs["output_hidden_states"] = h
        else:
            outs.update(self.head(float(sums[0])))
        return outs

    def gemma3(self, inputs, state, x, layer, visible):
        """One chunk of the Gemma 3 toy: a sliding-window layer, then a full-attention layer (each output mod V, so
        fp16 holds every sum exactly). Each layer stores its input and sums what it attends to. The local cache
        follows ane_eval/convert/gemma3.py `keys_values` (which the Gemma 3 tests prove against HF) and upstream's
        gemma3_model.py (zkh2016/Anemll@4e77d00):
        - infer / prefill fill slots at the absolute position (`_store_kv_local`, `_store_kv_local_prefill` with
          prefill_dynamic_slice; through update_mask rows 0..SW-1 with update_mask_prefill) and attend to the
          causal mask's first SW columns; a write past slot SW-1 fails, as a slice_update past the end does
          (mil/ops.py slice_update);
        - infer_rotate drops slot 0 and appends (`_update_kv_local`), then attends to every slot under the mask's
          first SW columns;
        - prefill_rotate drops the first B slots and appends the batch (`_update_kv_local_prefill`); row i attends
          to the old slots j > i and the batch's rows k <= i (gemma3.py's constant mask, the window HF computes);
        - the global layer writes at current_pos in every function and attends under the whole causal mask.
        A rotate function called before the window is full, or a fill function past it, leaves the wrong
        positions in the window: the answer is wrong."""
        fn, T = self.function, len(x)
        local = state.read_state(LOCAL)
        old = local[0, 0, :, layer].astype(np.float32)
        if fn == "infer_rotate":
            new = np.concatenate([old[1:], x])
            y = (visible[:, :SW] * new).sum(axis=1)
        elif fn == "prefill_rotate":
            new = np.concatenate([old[T:], x])
            y = np.array([old[i + 1:].sum() + x[:i + 1].sum() for i in range(T)])
        else:
            new = write(old, x, inputs)
            y = (visible[:, :SW] * new).sum(axis=1)
        local[0, 0, :, layer] = new
        state.write_state(LOCAL, local)
        glob = state.read_state(GLOBAL)
        glob[0, 0, :, layer] = write(glob[0, 0, :, layer].astype(np.float32), y % V, inputs)
        state.write_state(GLOBAL, glob)
        return (visible * glob[0, 0, :, layer].astype(np.float32)).sum(axis=1) % V

    def head(self, h):
        token = int(h) % V
        names = [f.name for f in self.sig.outputs]
        if "argmax_idx" in names:  # llama_converter.convert_lm_head(argmax_in_model): per chunk argmax + its logit
            idx = np.array([token % HALF if token // HALF == k else 0 for k in range(2)], np.int32)
            val = np.array([1.0 if token // HALF == k else 0.0 for k in range(2)], np.float16)
            return {"argmax_idx": idx, "argmax_val": val}
        logits = np.zeros(V, np.float16)
        logits[token] = 1
        return {"logits1": logits[None, None, :HALF], "logits2": logits[None, None, HALF:]}


def write(slots, values, inputs):
    """A chunk's KV write into one layer's slots: with an update_mask input, row i where its column i is 1 (over
    the first len(slots) rows, gemma3_converter / convert/gemma3.py write_masked); else slice_update at
    current_pos.. (CoreML and mil/ops.py slice_update refuse a slice past the end)."""
    slots, pos, T = slots.copy(), int(inputs["current_pos"][0]), len(values)
    if "update_mask" in inputs:
        for i in range(T):
            slots[np.flatnonzero(inputs["update_mask"][0, 0, :len(slots), i] == 1)] = values[i]
    else:
        assert pos + T <= len(slots), f"slice update at {pos}..{pos + T} past {len(slots)} cache slots"
        slots[pos:pos + T] = values
    return slots


class Backend:
    name = "stand-in"

    def __init__(self, parts, boundary=NATIVE):
        self.by_path = {p.path: p for p in parts.values()}
        self.boundary = boundary
        self.calls = []

    def describe(self):
        return "stand-in"

    def load(self, path, function_name=None):
        part = self.by_path[path]
        if function_name is not None and function_name not in part.functions:
            raise ValueError(f"{path.name}: no function {function_name!r}")
        return Predictor(self, part, function_name if function_name is not None else part.default_function)


def make(monkeypatch, tmp_path, boundary=NATIVE, compiled=(), built=None, precision="fp32", **kw):
    """The model over the stand-in; `compiled`: roles whose declarations are unreadable (contract gives None);
    `built`: (bundle, parts) instead of `build(tmp_path, **kw)`."""
    b, parts = built or build(tmp_path, **kw)
    backend = Backend(parts, boundary)
    asked = []

    def select(name, precision, compute_units):
        asked.append((name, precision, compute_units))
        return backend

    def discover(path, **kw):
        assert (path, kw) == (Path(str(tmp_path)), {"backend": backend.name})
        return b

    monkeypatch.setattr(model_mod, "select", select)
    monkeypatch.setattr(model_mod, "discover", discover)
    monkeypatch.setattr(model_mod, "load_tokenizer", lambda bundle: list(range(V)) if bundle is b else None)
    seen = {role: None if role in compiled else p for role, p in parts.items()}
    monkeypatch.setattr(contract, "describe_parts", lambda bundle: seen if bundle is b else None)
    m = ANEModel(str(tmp_path), backend="stand-in", precision=precision, compute_units="CPU_ONLY")
    assert asked == [("stand-in", precision, "CPU_ONLY")] and m.precision == precision
    m.construction_calls = list(backend.calls)
    backend.calls.clear()
    return m, backend


def want(seq, pos, chunks=1):
    """The stand-in's greedy token: each chunk replaces row p by the sum of its rows 0..p."""
    x = list(seq[:pos + 1])
    for _ in range(chunks):
        x = list(np.cumsum(x))
    return int(x[-1]) % V


PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]


def calls(backend, kind="chunk"):
    return [(fn, int(i["current_pos"][0]), i["position_ids"].tolist()) for name, fn, i in backend.calls
            if kind in name]


# --- the masks ---------------------------------------------------------------------------------------------------
def test_causal_mask_rows_and_dtype():
    m = causal_mask(5, first=2, rows=2)
    assert m.shape == (1, 1, 2, 5) and m.dtype == np.float16
    assert (m[0, 0] == 0).tolist() == [[True, True, True, False, False], [True, True, True, True, False]]
    assert np.isneginf(m[0, 0, 0, 3])
    full = causal_mask(3, dtype=np.float32)
    assert full.shape == (1, 1, 3, 3) and full.dtype == np.float32 and (full[0, 0] == 0).sum() == 6


def test_update_mask():
    m = update_mask(6, 3, 4)
    assert m.shape == (1, 1, 6, 4) and m.dtype == np.float16
    assert [tuple(x) for x in np.argwhere(m[0, 0] == 1)] == [(3, 0), (4, 1), (5, 2)]  # row 3 would be past the end
    assert m.sum() == 3 and update_mask(6, 0, 2, np.float32).dtype == np.float32


# --- construction ------------------------------------------------------------------------------------------------
def test_construction_reads_the_geometry(monkeypatch, tmp_path):
    m, backend = make(monkeypatch, tmp_path)
    assert (m.context_length, m.batch_size, m.mask_width, m.num_chunks, m.head, m.vocab_size) == (C, B, C, 1, "logits", V)
    assert (m.backend, m.name, m.monolithic, m.rotates, m.prefill_rule) == ("stand-in", "toy", False, False, "padded")
    assert m.history == [] and m.token_evaluations == 0 and m.geometry.hidden_size == H
    assert repr(m) == f"<ANEModel toy backend=stand-in context={C} batch={B} chunks=1 head=logits>"
    assert isinstance(m.state, MILState)


# --- prefill / infer ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"chunks": 2}, {"monolithic": True}, {"version": "0.3.5", "update_mask_prefill": True, "with_update_mask": True},
                                {"version": "0.3.5", "prefill_dynamic_slice": True}, {"version": "0.3.5"}])
def test_prefill_then_infer_sees_exactly_the_prompt(monkeypatch, tmp_path, kw):
    m, backend = make(monkeypatch, tmp_path, **kw)
    for n in (1, B - 1, B, B + 1, len(PROMPT)):
        m.reset()
        m.prefill(PROMPT[:n - 1])
        assert m.history == PROMPT[:n - 1]
        assert int(m.infer(PROMPT[n - 1], n - 1).argmax()) == want(PROMPT, n - 1, m.num_chunks or 1)
        assert m.history == PROMPT[:n]
    logits = m.infer(7, len(PROMPT))
    assert logits.shape == (V,) and logits.dtype == np.float32
    assert logits.argmax() == want(PROMPT + [7], len(PROMPT), m.num_chunks or 1)


def test_padded_rule_batches(monkeypatch, tmp_path):
    m, backend = make(monkeypatch, tmp_path)
    m.prefill(PROMPT)  # 10 tokens: batches at 0, 4, 8 (the last right-padded with 0)
    pre = calls(backend)
    assert pre == [("prefill", p, list(range(p, p + B))) for p in (0, 4, 8)]
    last = [i for n, fn, i in backend.calls if "chunk" in n][-1]
    assert last["hidden_states"][0, :, 0].tolist() == [5, 3, 0, 0]
    assert last["causal_mask"].shape == (1, 1, B, C) and (last["causal_mask"][0, 0] == 0).sum(axis=1).tolist() == [9, 10, 11, 12]
    assert m.token_evaluations == 3 * B
    emb = [i["input_ids"].tolist() for n, fn, i in backend.calls if "embeddings" in n]
    assert emb[0] == [PROMPT[:4]] and emb[2] == [[5, 3, 0, 0]]
    assert not [n for n, *_ in backend.calls if "lm_head" in n]  # prefill needs no LM head


def test_padded_batch_never_runs_past_the_context(monkeypatch, tmp_path):
    m, backend = make(monkeypatch, tmp_path)
    seq = list(range(1, C))  # 15 tokens: batches 0, 4, 8, then 12 (not 12..15 past 16: starts at C - B = 12)
    m.prefill(seq[:13])
    backend.calls.clear()
    m.prefill(seq[13:], start=13)  # one token at 13: its batch starts at C - B and re-feeds 12
    assert calls(backend) == [("prefill", C - B, list(range(C - B, C)))]
    assert int(m.infer(9, 15).argmax()) == want(seq + [9], 15)
    m.prefill([], start=15)
    with pytest.raises(ContextOverflowError, match=f"prefill of 2 tokens from position 15 ends at 17, past the "
                                                  f"context length {C}; truncate the input"):
        m.prefill([1, 2], start=15)
    m.prefill([1], start=15)


def test_full_batches_rule(monkeypatch, tmp_path):
    m, backend = make(monkeypatch, tmp_path, version="0.3.5", prefill_dynamic_slice=True)
    assert m.prefill_rule == "full_batches"
    m.prefill(PROMPT)  # full batches at 0 and 4, then 8 and 9 one at a time through infer
    assert calls(backend) == [("prefill", 0, [0, 1, 2, 3]), ("prefill", 4, [4, 5, 6, 7]), ("infer", 8, [8]),
                              ("infer", 9, [9])]
    assert m.token_evaluations == 2 * B + 2
    assert not [n for n, *_ in backend.calls if "lm_head" in n]
    backend.calls.clear()
    m.prefill(PROMPT[:B], start=2)  # from 2: one full batch 2..5
    assert calls(backend) == [("prefill", 2, [2, 3, 4, 5])]


def test_tokens_rule(monkeypatch, tmp_path):
    m, backend = make(monkeypatch, tmp_path, version="0.3.5")
    assert m.prefill_rule == "tokens"
    m.prefill(PROMPT[:5])
    assert calls(backend) == [("infer", p, [p]) for p in range(5)]
    assert m.token_evaluations == 5


def test_update_mask_is_passed_only_where_declared(monkeypatch, tmp_path):
    m, backend = make(monkeypatch, tmp_path, version="0.3.5", update_mask_prefill=True, with_update_mask=True)
    m.prefill(PROMPT[:6], start=0)
    (name, fn, inputs), = [c for c in backend.calls if c[1] == "prefill"]
    assert np.array_equal(inputs["update_mask"], update_mask(C, 0, B))
    assert all("update_mask" not in i for n, fn, i in backend.calls if fn == "infer")


def test_rewind_overwrites_without_a_state_copy(monkeypatch, tmp_path):
    m, backend = make(monkeypatch, tmp_path)
    m.prefill(PROMPT)
    other = [7, 7, 7]
    m.prefill(other, start=3)  # stale slots 6..9 stay in the cache, hidden by the mask
    assert m.history == PROMPT[:3] + other
    assert int(m.infer(2, 6).argmax()) == want(PROMPT[:3] + other + [2], 6)
    state = m.state
    m.prefill([], start=2)
    assert m.state is state and m.history == PROMPT[:2]
    assert int(m.infer(PROMPT[2], 2).argmax()) == want(PROMPT, 2)


def test_refusals(monkeypatch, tmp_path):
    m, backend = make(monkeypatch, tmp_path)
    m.prefill(PROMPT[:3])
    with pytest.raises(ValueError, match="^prefill start 4 is beyond the 3 tokens in the cache$"):
        m.prefill([1], start=4)
    with pytest.raises(ValueError, match="^prefill start -1 is beyond"):
        m.prefill([1], start=-1)
    with pytest.raises(ValueError, match=r"^infer at position 4 needs positions 0..3 in the cache, which holds 3$"):
        m.infer(1, 4)
    with pytest.raises(ValueError, match="^infer at position -1"):
        m.infer(1, -1)
    m.prefill(list(range(C)))
    with pytest.raises(ContextOverflowError, match=f"^position {C} is past the context length {C}; truncate"):
        m.infer(1, C)
    assert m.history == list(range(C))
    assert int(m.infer(1, C - 1).argmax()) == want(list(range(C - 1)) + [1], C - 1)


def test_reset_forgets_the_prompt(monkeypatch, tmp_path):
    m, backend = make(monkeypatch, tmp_path)
    m.prefill(PROMPT)
    old = m.state
    m.reset()
    assert m.history == [] and m.state is not old
    assert old.read_state(contract.STATE_NAME).any()  # the old one held the prompt
    assert not m.state.read_state(contract.STATE_NAME).any()
    assert int(m.infer(5, 0).argmax()) == 5


def test_token_evaluations_count_rows_and_tokens(monkeypatch, tmp_path):
    m, backend = make(monkeypatch, tmp_path)
    m.prefill(PROMPT[:5])
    m.infer(1, 5)
    m.next_token(2, 6)
    assert m.token_evaluations == 2 * B + 2


def test_each_call_is_checked_against_the_declaration(monkeypatch, tmp_path):
    m, backend = make(monkeypatch, tmp_path)
    m.prefill(PROMPT[:5])
    for name, fn, inputs in backend.calls:
        part = next(p for p in (m.parts.values()) if p.name == name)
        contract.check_inputs(name, part.signature(fn), inputs)  # what ran is what was declared
        if "chunk" in name:
            assert inputs["position_ids"].dtype == np.int32 and inputs["current_pos"].dtype == np.int32
    # a wrong input never reaches the backend
    with pytest.raises(ContractError, match=r"toy_lm_head.mlpackage expects hidden_states \(1, 1, 8\) fp16, got "
                                            r"\(1, 2, 8\) float16; pad to the compiled batch 4"):
        m._call(m._lm_head, m.parts["lm_head"], None, {"hidden_states": np.zeros((1, 2, H), np.float16)})


def test_coreml_boundary_sends_masks_as_float32(monkeypatch, tmp_path):
    m, backend = make(monkeypatch, tmp_path, boundary=COREML)
    m.prefill(PROMPT[:5])
    assert int(m.infer(2, 5).argmax()) == want(PROMPT[:5] + [2], 5)
    assert {i["causal_mask"].dtype for n, fn, i in backend.calls if "chunk" in n} == {np.dtype(np.float32)}
    m, backend = make(monkeypatch, tmp_path)
    m.prefill(PROMPT[:5])
    assert {i["causal_mask"].dtype for n, fn, i in backend.calls if "chunk" in n} == {np.dtype(np.float16)}


def test_monolithic_calls(monkeypatch, tmp_path):
    m, backend = make(monkeypatch, tmp_path, monolithic=True)
    assert m.monolithic and repr(m).endswith("monolithic head=logits>")
    m.prefill(PROMPT[:5])
    m.infer(1, 5)
    assert [(n, fn, i["input_ids"].tolist()) for n, fn, i in backend.calls] == [
        ("toy_monolithic.mlpackage", "prefill", [PROMPT[:4]]),
        ("toy_monolithic.mlpackage", "prefill", [[5, 0, 0, 0]]),
        ("toy_monolithic.mlpackage", "infer", [[1]])]


@pytest.mark.parametrize("monolithic", [False, True])
def test_argmax_head(monkeypatch, tmp_path, monolithic):
    m, backend = make(monkeypatch, tmp_path, argmax=True, monolithic=monolithic)
    assert m.head == "argmax" and m.vocab_size == V
    m.prefill(PROMPT[:5])
    with pytest.raises(NoLogitsError, match="^toy: the LM head returns only the argmax"):
        m.infer(1, 5)
    for tok in (1, 20):  # one token in each vocabulary chunk
        assert m.next_token(tok, 5) == want(PROMPT[:5] + [tok], 5)


def test_next_token_on_a_logits_head(monkeypatch, tmp_path):
    m, backend = make(monkeypatch, tmp_path)
    m.prefill(PROMPT[:5])
    assert m.next_token(20, 5) == want(PROMPT[:5] + [20], 5)


@pytest.mark.parametrize("idx, val, message", [
    ([1, 2, 3], [0, 1, 0], "the LM head returned 3 argmax pairs for 2 vocabulary chunks"),
    ([0, 1], [0, 1, 0], "the LM head returned 2 argmax pairs for 2 vocabulary chunks"),
    ([0, HALF], [0, 1], f"argmax_idx {HALF} of vocabulary chunk 1 is outside its {HALF} entries"),
    ([-1, 0], [1, 0], f"argmax_idx -1 of vocabulary chunk 0 is outside its {HALF} entries")])
def test_next_token_refuses_a_malformed_argmax(monkeypatch, tmp_path, idx, val, message):
    m, backend = make(monkeypatch, tmp_path, argmax=True)
    monkeypatch.setattr(Predictor, "head", lambda self, h: {"argmax_idx": np.array(idx, np.int32),
                                                           "argmax_val": np.array(val, np.float16)})
    with pytest.raises(ContractError, match=f"^toy: {message}$"):
        m.next_token(1, 0)


def test_argmax_ties_go_to_the_first_chunk(monkeypatch, tmp_path):
    m, backend = make(monkeypatch, tmp_path, argmax=True)
    monkeypatch.setattr(Predictor, "head", lambda self, h: {"argmax_idx": np.array([3, 4], np.int32),
                                                           "argmax_val": np.array([1, 1], np.float16)})
    assert m.next_token(1, 0) == 3
    monkeypatch.setattr(Predictor, "head", lambda self, h: {"argmax_idx": np.array([3, 4], np.int32),
                                                           "argmax_val": np.array([1, 2], np.float16)})
    assert m.next_token(1, 0) == HALF + 4


def test_resolve_model():
    assert model_mod.resolve_model("some/dir") == Path("some/dir")


# --- pinned down by mutation testing -----------------------------------------------------------------------------
def test_construction_learns_the_hidden_size_from_one_embedding(monkeypatch, tmp_path):
    m, backend = make(monkeypatch, tmp_path)
    (name, fn, inputs), = m.construction_calls
    assert name == "toy_embeddings.mlpackage" and inputs["input_ids"].dtype == np.int32
    assert inputs["input_ids"].shape == (1, 1)
    monkeypatch.setattr(contract, "cross_check", lambda *a, **k: (_ for _ in ()).throw(AssertionError(k)))
    with pytest.raises(AssertionError, match="'embeddings_width': 8"):
        make(monkeypatch, tmp_path)


def test_every_call_goes_through_the_input_check(monkeypatch, tmp_path):
    for kw in ({}, {"monolithic": True}, {"version": "0.3.5"}):
        m, backend = make(monkeypatch, tmp_path, **kw)
        checked, real = [], contract.check_inputs

        def check(where, signature, inputs, hints=None, boundary=NATIVE):
            checked.append((where, signature, boundary))
            return real(where, signature, inputs, hints, boundary)

        monkeypatch.setattr(contract, "check_inputs", check)
        m.prefill(PROMPT[:5])
        m.infer(1, 5)
        part = {p.name: p for p in m.parts.values()}
        assert [(w, s) for w, s, _ in checked] == [
            (f"{n} {fn}" if fn != "main" else n, part[n].signature(fn)) for n, fn, _ in backend.calls]
        assert {b for *_, b in checked} == {NATIVE}
        monkeypatch.setattr(contract, "check_inputs", real)


@pytest.mark.parametrize("boundary", [NATIVE, COREML])
def test_compiled_chunks_take_the_update_mask_meta_yaml_promises(monkeypatch, tmp_path, boundary):
    m, backend = make(monkeypatch, tmp_path, boundary, compiled=("chunk01",), version="0.3.5",
                      update_mask_prefill=True, with_update_mask=True)
    m.prefill(PROMPT[:6])
    chunk_calls = [(fn, i) for n, fn, i in backend.calls if "chunk" in n]
    assert [fn for fn, _ in chunk_calls] == ["prefill", "infer", "infer"]
    mask = chunk_calls[0][1]["update_mask"]
    assert mask.dtype == boundary.fp16_dtypes[0] and np.array_equal(mask, update_mask(C, 0, B))
    assert all("update_mask" not in i for fn, i in chunk_calls[1:])
    assert int(m.infer(2, 6).argmax()) == want(PROMPT[:6] + [2], 6)


def test_next_token_maps_local_index_zero(monkeypatch, tmp_path):
    m, backend = make(monkeypatch, tmp_path, argmax=True)
    monkeypatch.setattr(Predictor, "head", lambda self, h: {"argmax_idx": np.array([5, 0], np.int32),
                                                           "argmax_val": np.array([0, 1], np.float16)})
    assert m.next_token(1, 0) == HALF


def test_infer_on_an_argmax_head_says_what_to_use(monkeypatch, tmp_path):
    m, backend = make(monkeypatch, tmp_path, argmax=True)
    with pytest.raises(NoLogitsError) as e:
        m.infer(1, 0)
    assert str(e.value) == ("toy: the LM head returns only the argmax of each vocabulary chunk (argmax_in_model), no "
                            "logits; use next_token for greedy decoding")


def test_resolve_model_demo(monkeypatch):
    from ane_eval import demo
    monkeypatch.setattr(demo, "model_dir", lambda: Path("/built/demo"))
    assert model_mod.resolve_model("demo") == Path("/built/demo")
    assert model_mod.resolve_model(Path("demo")) == Path("/built/demo")


# --- Gemma 3: the sliding-window local cache and its rotate functions ------------------------------------------
LONG = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]  # C tokens, none 0 (a slot left empty changes the sum)


def want_windowed(seq, pos, chunks=1):
    """The Gemma 3 toy's greedy token after position p, from the definition (HF's sliding-window mask: a key is
    visible iff it is within SW positions of the query), not from any cache: per chunk, the local layer sums the
    last SW inputs, the global layer all of the local outputs, each mod V."""
    x = [int(t) for t in seq[:pos + 1]]
    for _ in range(chunks):
        local = [sum(x[max(0, p - SW + 1):p + 1]) % V for p in range(len(x))]
        x = [int(v) % V for v in np.cumsum(local)]
    return x[-1]


def fns(backend, chunk="chunk_01"):
    """(function, current_pos) of each call to the first chunk (split-rotate companions included)."""
    return [(fn, int(i["current_pos"][0])) for name, fn, i in backend.calls if chunk in name]


GEMMA = [{}, {"chunks": 2}, {"split_rotate": True}, {"update_mask_prefill": True, "with_update_mask": True},
         {"prefill_dynamic_slice": False}]


@pytest.mark.parametrize("kw", GEMMA, ids=["dynamic_slice", "2_chunks", "split_rotate", "update_mask", "tokens"])
def test_gemma3_prefill_then_infer_sees_exactly_the_window(monkeypatch, tmp_path, kw):
    m, backend = make(monkeypatch, tmp_path, sliding=True, **kw)
    assert m.rotates
    for n in (1, B, SW - 1, SW, SW + 1, SW + B, SW + B + 1, C):
        m.reset()
        m.prefill(LONG[:n - 1])
        assert m.next_token(LONG[n - 1], n - 1) == want_windowed(LONG, n - 1, m.num_chunks), n
    m.reset()
    for p, tok in enumerate(LONG):  # token by token from an empty cache, every position through infer
        assert m.next_token(tok, p) == want_windowed(LONG, p, m.num_chunks)


def test_gemma3_functions_chosen_by_position(monkeypatch, tmp_path):
    """chat.py run_monolithic_prefill_with_rotation: fill batches while batch_pos + batch_size <= sliding_window,
    rotating batches from the window on, the rest token by token through infer_rotate; infer before the window,
    infer_rotate from it (its single_token_mode: `batch_pos >= sliding_window`)."""
    m, backend = make(monkeypatch, tmp_path, sliding=True)
    m.prefill(LONG[:15])  # the fill batch 4..7 ends exactly at the window, the rotating one 8..11 starts at it
    assert fns(backend) == [("prefill", 0), ("prefill", 4), ("prefill_rotate", 8), ("infer_rotate", 12),
                            ("infer_rotate", 13), ("infer_rotate", 14)]
    assert m.token_evaluations == 3 * B + 3
    backend.calls.clear()
    assert m.next_token(LONG[15], 15) == want_windowed(LONG, 15)
    assert fns(backend) == [("infer_rotate", 15)]
    m.reset()
    backend.calls.clear()
    m.prefill(LONG[:2])
    # 6..9 would straddle the window: 6 and 7 by infer, then a rotating batch (the tokens fed by infer once cut the
    # prompt short in `history`, and the prefill stopped at 12 with "needs positions 0..11")
    m.prefill(LONG[2:14], start=2)
    assert fns(backend) == [("infer", 0), ("infer", 1), ("prefill", 2), ("infer", 6), ("infer", 7),
                            ("prefill_rotate", 8), ("infer_rotate", 12), ("infer_rotate", 13)]
    assert m.next_token(LONG[14], 14) == want_windowed(LONG, 14)
    m.reset()
    backend.calls.clear()
    for p in range(SW + 1):  # token by token: infer up to the window, infer_rotate from it
        m.next_token(LONG[p], p)
    assert fns(backend) == [("infer", p) for p in range(SW)] + [("infer_rotate", SW)]


def test_gemma3_no_replay_while_the_cache_has_not_rotated_or_when_continuing(monkeypatch, tmp_path):
    m, backend = make(monkeypatch, tmp_path, sliding=True)
    m.prefill(LONG[:SW])  # slots 0..7 hold positions 0..7: full, but not rotated
    state = m.state
    backend.calls.clear()
    m.prefill([7, 7], start=3)  # a rewind inside an unrotated cache only overwrites
    assert fns(backend) == [("infer", 3), ("infer", 4)] and m.state is state
    seq = LONG[:3] + [7, 7]
    assert m.next_token(2, 5) == want_windowed(seq + [2], 5)
    m.reset()
    m.prefill(LONG[:SW + B])  # rotated once, ends at 12
    backend.calls.clear()
    for p in range(SW + B, C):  # continuing after rotation: one call per token, no replay
        assert m.next_token(LONG[p], p) == want_windowed(LONG, p)
    assert fns(backend) == [("infer_rotate", p) for p in range(SW + B, C)]


def test_gemma3_rewind_after_rotation_replays_the_prefix(monkeypatch, tmp_path):
    """A rotated local cache holds only the last SW positions before the end: a rewind cannot overwrite in place, so
    the prefix is replayed from a fresh state."""
    m, backend = make(monkeypatch, tmp_path, sliding=True)
    m.prefill(LONG[:SW + 1])  # 0..3, 4..7 by prefill, 8 by infer_rotate: rotated once
    rotated = m.state
    backend.calls.clear()
    other = [7, 2, 7]
    m.prefill(other, start=5)  # replay 0..4 (one batch, then 4 by infer), then 5..7 by infer
    assert fns(backend) == [("prefill", 0), ("infer", 4), ("infer", 5), ("infer", 6), ("infer", 7)]
    assert m.state is not rotated and m.history == LONG[:5] + other
    seq = LONG[:5] + other + LONG[8:]
    for p in range(SW, C):
        assert m.next_token(seq[p], p) == want_windowed(seq, p)
    # prefill of all C positions (rotating batches at 8 and 12), then back to 8, inside the rotated region
    m.prefill(LONG)
    assert fns(backend)[-2:] == [("prefill_rotate", 8), ("prefill_rotate", 12)]
    backend.calls.clear()
    assert m.next_token(4, 8) == want_windowed(LONG[:8] + [4], 8)
    assert fns(backend) == [("prefill", 0), ("prefill", 4), ("infer_rotate", 8)]
    # back to position 2, before one batch: the replay goes token by token
    backend.calls.clear()
    assert m.next_token(6, 2) == want_windowed(LONG[:2] + [6], 2)
    assert fns(backend) == [("infer", 0), ("infer", 1), ("infer", 2)]
    m.prefill([], start=1)  # an empty prefill rewinds too; the next token is then correct
    assert m.next_token(5, 1) == want_windowed(LONG[:1] + [5], 1) and m.history == LONG[:1] + [5]


def test_gemma3_reset_after_rotation(monkeypatch, tmp_path):
    m, backend = make(monkeypatch, tmp_path, sliding=True, prefill_dynamic_slice=False)
    for p in range(C - 1):
        m.next_token(LONG[p], p)
    old = m.state
    m.reset()
    assert m.state is not old and m.history == []
    assert not m.state.read_state(LOCAL).any() and not m.state.read_state(GLOBAL).any()
    backend.calls.clear()
    assert m.next_token(5, 0) == 5
    assert fns(backend) == [("infer", 0)]


def test_gemma3_split_rotate_functions_come_from_the_rot_files(monkeypatch, tmp_path):
    m, backend = make(monkeypatch, tmp_path, sliding=True, chunks=2, split_rotate=True)
    checked, real = [], contract.check_inputs

    def check(where, signature, inputs, hints=None, boundary=NATIVE):
        checked.append((where, signature))
        return real(where, signature, inputs, hints, boundary)

    monkeypatch.setattr(contract, "check_inputs", check)
    m.prefill(LONG[:13])
    assert m.next_token(LONG[13], 13) == want_windowed(LONG, 13, 2)
    ran = [(n, fn) for n, fn, _ in backend.calls if "chunk" in n]
    assert ran == [(f"toy_FFN_PF_chunk_{k:02d}of02{rot}.mlpackage", fn) for fn, rot in
                   [("prefill", ""), ("prefill", ""), ("prefill_rotate", "_rot"), ("infer_rotate", "_rot"),
                    ("infer_rotate", "_rot")] for k in (1, 2)]
    # every call is checked against the declaration of the file that holds its function
    part = {p.name: p for p in m.parts.values()}
    assert checked == [(f"{n} {fn}" if fn != "main" else n, part[n].signature(fn)) for n, fn, _ in backend.calls]


@pytest.mark.parametrize("kw", [{}, {"split_rotate": True}])
def test_gemma3_without_rotate_functions_is_refused(monkeypatch, tmp_path, kw):
    b, parts = build(tmp_path, sliding=True, **kw)
    role = "chunk01_rot" if kw else "chunk01"
    parts[role] = Part(parts[role].path, {fn: s for fn, s in parts[role].functions.items()
                                          if fn != "prefill_rotate"}, {}, parts[role].default_function)
    name = parts[role].path.name
    with pytest.raises(ContractError) as e:
        make(monkeypatch, tmp_path, built=(b, parts))
    assert str(e.value) == (f"{name}: meta.yaml sliding_window {SW} is shorter than the context, but the "
                            f"prefill_rotate function cannot be loaded ({name}: no function 'prefill_rotate'); "
                            "re-convert with rotate functions")


@pytest.mark.parametrize("compiled", [(), ("chunk01",)])
def test_gemma3_update_mask_goes_to_prefill_only(monkeypatch, tmp_path, compiled):
    """gemma3_converter: prefill takes the update_mask, prefill_rotate never (the stand-in, like the runtimes,
    refuses an undeclared input)."""
    m, backend = make(monkeypatch, tmp_path, compiled=compiled, sliding=True, update_mask_prefill=True,
                      with_update_mask=True)
    m.prefill(LONG[:C - 1])
    assert [(fn, "update_mask" in i) for n, fn, i in backend.calls if "chunk" in n][:3] == [
        ("prefill", True), ("prefill", True), ("prefill_rotate", False)]
    assert m.next_token(LONG[C - 1], C - 1) == want_windowed(LONG, C - 1)


@pytest.mark.parametrize("compiled", [(), ("chunk01",)])
def test_update_mask_follows_the_declaration_not_meta_yaml(monkeypatch, tmp_path, compiled):
    """A readable chunk is trusted over meta.yaml: meta.yaml's update_mask_prefill without an update_mask input
    sends none. A compiled chunk has only meta.yaml to go by: no update_mask_prefill, no update_mask."""
    meta = {"update_mask_prefill": True} if not compiled else {"prefill_dynamic_slice": True}
    m, backend = make(monkeypatch, tmp_path, compiled=compiled, version="0.3.5", **meta)
    m.prefill(PROMPT[:6])
    assert [(fn, "update_mask" in i) for n, fn, i in backend.calls if "chunk" in n] == [
        ("prefill", False), ("infer", False), ("infer", False)]
    assert int(m.infer(2, 6).argmax()) == want(PROMPT[:6] + [2], 6)


def test_defaults_and_load_model(monkeypatch, tmp_path):
    make(monkeypatch, tmp_path)  # the stand-in in place
    asked, stand_in = [], model_mod.select

    def select(name, precision, compute_units):
        asked.append((name, precision, compute_units))
        return stand_in("stand-in", precision, compute_units)

    monkeypatch.setattr(model_mod, "select", select)
    assert ANEModel(str(tmp_path)).precision == "fp16"
    m = model_mod.load_model(str(tmp_path))
    assert isinstance(m, ANEModel) and m.name == "toy"
    model_mod.load_model(str(tmp_path), backend="mine", precision="fp32", compute_units="CPU_ONLY")
    assert asked == [("auto", "fp16", "CPU_AND_NE")] * 2 + [("mine", "fp32", "CPU_ONLY")]


def test_input_errors_name_the_fix(monkeypatch, tmp_path):
    m, backend = make(monkeypatch, tmp_path)
    infer, part = m._chunks[0]["infer"]
    good = {"hidden_states": np.zeros((1, 1, H), np.float16), "position_ids": np.zeros(1, np.int32),
            "causal_mask": causal_mask(C, 0, 1), "current_pos": np.zeros(1, np.int32)}
    for name, hint in [("position_ids", "position_ids are int32"), ("current_pos", "current_pos is int32 (1,)"),
                       ("causal_mask", f"the mask is fp16 (1, 1, rows, {C})")]:
        bad = {**good, name: good[name].astype(np.int64 if name != "causal_mask" else np.float32)}
        with pytest.raises(ContractError, match=rf"^toy_FFN_PF_chunk_01of01\.mlpackage infer expects {name} .*; "
                                                rf"{re.escape(hint)}$"):
            m._call(infer, part, "infer", bad)
    with pytest.raises(ContractError, match=r"^toy_embeddings.mlpackage expects input_ids .*; input_ids are int32 "
                                            rf"of shape \(1, 1\) or \(1, {B}\)$"):
        m._call(m._embeddings, m.parts["embeddings"], None, {"input_ids": np.zeros((1, 1), np.int64)})


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_the_portable_runtime_refuses_a_model_that_cannot_fit(monkeypatch, tmp_path, precision):
    """On the portable runtime ("mil") the model is sized before anything runs (memory.py, with its own tests in
    tests/test_memory.py): the toy's parts have no weight files, so it holds its one state."""
    monkeypatch.setattr(Backend, "name", "mil")
    state = 2 * 1 * C * 4 * (2 if precision == "fp16" else 4)
    monkeypatch.setattr(memory, "available_bytes", lambda: state)
    m, backend = make(monkeypatch, tmp_path, precision=precision)
    assert m.resident_bytes == {"embeddings": 0, "chunk01": 0, "lm_head": 0, "state": state, "total": state}
    monkeypatch.setattr(memory, "available_bytes", lambda: state - 1)
    what = re.escape(f"{tmp_path} ({precision}, portable runtime) needs ")
    with pytest.raises(memory.InsufficientMemoryError, match=f"^{what}"):
        make(monkeypatch, tmp_path, precision=precision)


def test_each_part_keeps_its_last_inputs_alive(monkeypatch, tmp_path):
    """CoreML releases the buffers it was given later, on its own queue (ANEModel._call): each part's inputs stay
    referenced until that part is called again, and are released then."""
    m, backend = make(monkeypatch, tmp_path, chunks=2)
    refs, predict = [], Predictor.predict

    def recording(self, inputs, state=None):
        refs.append((id(self), {k: weakref.ref(v) for k, v in inputs.items()}))
        return predict(self, inputs, state)

    monkeypatch.setattr(Predictor, "predict", recording)
    m.prefill(PROMPT[:9])
    m.infer(1, 9)
    gc.collect()
    last = {p: i for i, (p, _) in enumerate(refs)}
    assert len(last) == 6  # embeddings, each chunk's prefill and infer, the head
    for i, (p, r) in enumerate(refs):
        alive = [w() is not None for w in r.values()]
        assert alive == [last[p] == i] * len(alive), (i, alive)


def test_the_mask_is_attention_size_wide(monkeypatch, tmp_path):
    """0.3.5's attention_size: the causal mask's width, which may exceed the context length (chat.py parse_args
    reads both)."""
    b, parts = build(tmp_path, version="0.3.5", prefill_dynamic_slice=True, attention_size=C)
    b.meta["context_length"] = C - B
    m, backend = make(monkeypatch, tmp_path, built=(b, parts))
    assert (m.context_length, m.mask_width) == (C - B, C)
    m.prefill(PROMPT[:6])
    assert int(m.infer(2, 6).argmax()) == want(PROMPT[:6] + [2], 6)
    assert {i["causal_mask"].shape[-1] for n, fn, i in backend.calls if "chunk" in n} == {C}
    m.prefill(LONG[6:C - B - 1], start=6)
    m.infer(1, C - B - 1)
    with pytest.raises(ContextOverflowError, match=f"^position {C - B} is past the context length {C - B}"):
        m.infer(1, C - B)
