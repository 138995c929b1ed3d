"""The model directory's tensor contract (one test per part, function and tensor) and its behavioural contract
(prefill + infer equals token-by-token infer, state isolation, determinism, finite logits, vocabulary coverage).
An argmax LM head (ANEMLL 0.3.5) gives greedy tokens, not logits: the behavioural tests compare those."""
from __future__ import annotations

import numpy as np
import pytest

from ane_eval import contract

PROMPT = ("The model under test reads this sentence, then a second one, and predicts what comes next. "
          "Question: is the state clean between prompts?\nAnswer:")


def test_tensor(tensor_key, contract_view):
    """Each tensor as the part declares it against the shape config.json and meta.yaml require."""
    expected, declared = contract_view
    assert tensor_key in declared, f"{'/'.join(tensor_key)} is required by the contract but not declared"
    assert tensor_key in expected, f"{'/'.join(tensor_key)} is declared but not part of the contract"
    (want_shape, want_dtype), (shape, dtype) = expected[tensor_key], declared[tensor_key]
    assert dtype == want_dtype, f"{'/'.join(tensor_key)}: dtype {dtype}, the contract requires {want_dtype}"
    if want_shape is not None:
        assert shape == want_shape, f"{'/'.join(tensor_key)}: shape {shape}, the contract requires {want_shape}"


def test_no_undeclared_tensors(contract_view):
    expected, declared = contract_view
    extra = sorted(set(declared) - set(expected))
    assert not extra, f"tensors outside the contract: {extra}"


def test_contract_expectations_are_derivable(contract_view, ane_session):
    """config.json and meta.yaml give every size the contract needs; what they omit is listed (and unchecked)."""
    if ane_session.contract_unknown:
        pytest.skip("shapes not checked: the model directory does not give " + ", ".join(ane_session.contract_unknown))


def test_metadata_consistency(model, contract_view):
    """meta.yaml against what each part declares and its com.anemll.* metadata, read from the files directly (not
    through contract.cross_check, which set the model's geometry)."""
    _, declared = contract_view
    b, chunks = model.bundle, model.chunk_parts
    problems = []

    def agree(what, meta_value, values):
        if meta_value is not None:
            problems.extend(f"{what}: meta.yaml {meta_value}, {src} {v}" for src, v in values if v != meta_value)

    masks = [(f"{role}/{fn} causal_mask", shape[-1]) for (role, fn, kind, name), (shape, _) in declared.items()
             if name == "causal_mask" and shape]
    batches = [(f"{role}/prefill hidden_states", shape[1]) for (role, fn, kind, name), (shape, _) in declared.items()
               if fn == "prefill" and kind == "inputs" and name in ("hidden_states", "input_ids") and shape]
    assert masks and batches, "no FFN chunk declares causal_mask / prefill hidden_states"
    for key, declared_values in (("context_length", masks), ("batch_size", batches)):
        meta = b.meta_int(key)
        metadata = [(f"{p.name} com.anemll.{key}", int(p.metadata[f"com.anemll.{key}"]))
                    for p in model.parts.values() if p is not None and f"com.anemll.{key}" in p.metadata]
        agree(key, meta, declared_values + metadata)
        assert len({v for _, v in declared_values}) == 1, f"parts declare different {key}s: {declared_values}"
    agree("num_chunks", b.meta_int("num_chunks"), [("chunk files", len(chunks))])
    for i, part in enumerate(chunks, start=1):
        for key, want in (("chunk_no", i), ("num_chunks", len(chunks))):
            if f"com.anemll.{key}" in part.metadata:
                if int(part.metadata[f"com.anemll.{key}"]) != want:
                    problems.append(f"{part.name} com.anemll.{key}={part.metadata[f'com.anemll.{key}']}, "
                                    f"file {i} of {len(chunks)}")
    # the head's vocabulary chunks: logits1..K outputs, or an argmax head's [K] pair (the LM head part, or a
    # monolithic model's infer)
    head_role = "lm_head" if "lm_head" in {k[0] for k in declared} else contract.MONOLITHIC
    outs = {k[3]: shape for k, (shape, _) in declared.items()
            if k[0] == head_role and k[1] in ("main", "infer") and k[2] == "outputs"}
    split = outs["argmax_idx"][0] if "argmax_idx" in outs else len([n for n in outs if n.startswith("logits")])
    agree("split_lm_head", b.meta_int("split_lm_head"), [(f"{head_role} vocabulary chunks", split)])
    agree("runtime context_length", b.meta_int("context_length"), [("ANEModel", model.context_length)])
    agree("runtime batch_size", b.meta_int("batch_size"), [("ANEModel", model.batch_size)])
    assert not problems, "; ".join(problems)


def _step(model, token, pos):
    """Logits, or for an argmax head the greedy token (as an array, so both compare the same way)."""
    return model.infer(token, pos) if model.head == "logits" else np.array([model.next_token(token, pos)])


def _prompt_ids(model, text=PROMPT):
    return model.tokenizer.encode(text)[: model.context_length]  # small-context models take a prefix


def _last_logits_prefill(model, ids):
    model.reset()
    model.prefill(ids[:-1])
    return _step(model, ids[-1], len(ids) - 1)


def test_prefill_then_infer_equals_token_by_token(model):
    ids = _prompt_ids(model)
    a = _last_logits_prefill(model, ids)
    model.reset()
    for p, t in enumerate(ids):
        b = _step(model, t, p)
    if model.head != "logits":
        assert int(a[0]) == int(b[0]), f"prefill and infer paths pick different tokens ({a[0]} and {b[0]})"
        return
    scale = float(np.abs(b).max())
    assert int(a.argmax()) == int(b.argmax())
    # demo, fp16 portable runtime: max |a - b| measured 0.0 (scale 24.3); fp16 logits of that size are 1/64 apart,
    # so 2e-3 * scale allows ~3 ulps of path-dependent rounding (a real ANE's prefill and infer kernels differ)
    assert float(np.abs(a - b).max()) <= 2e-3 * scale, "prefill and infer paths disagree"


def test_state_isolation_after_reset(model):
    ids = _prompt_ids(model)
    other = _prompt_ids(model, "A different, longer prompt fills the cache first. " * 4)
    clean = _last_logits_prefill(model, ids)
    _last_logits_prefill(model, other)
    after = _last_logits_prefill(model, ids)
    np.testing.assert_array_equal(clean, after)


def test_reset_clears_a_poisoned_state(model):
    """NaN left in the cache must not survive reset(): on CoreML the mask gives stale slots weight 0, but 0 * NaN is
    NaN, so only a zeroed state makes the next prompt safe. (The portable runtime's fused attention reads only the
    visible slots, so its logits would not show the leak: the state itself is checked.)"""
    ids = _prompt_ids(model)
    clean = _last_logits_prefill(model, ids)
    if not hasattr(model.state, "write_state"):
        pytest.skip(f"the {model.backend} state object cannot be written from Python")
    names = list(model.geometry.states or {contract.STATE_NAME: None})  # Gemma 3: the local and global caches
    for name in names:
        shape = model.state.read_state(name).shape
        # float32: what crosses coremltools' boundary (CoreML converts it into the Float16 state; an fp16 array is
        # "value type not convertible" there); the portable runtime stores it as fp16 the same way
        model.state.write_state(name, np.full(shape, np.nan, dtype=np.float32))
        assert np.isnan(model.state.read_state(name)).all()
    model.reset()
    for name in names:
        after = model.state.read_state(name)
        assert not np.any(after), f"{name}: {int(np.isnan(after).sum())} NaN and " \
            f"{int(np.count_nonzero(np.nan_to_num(after)))} other non-zero values survive reset()"
    np.testing.assert_array_equal(_last_logits_prefill(model, ids), clean)


def test_determinism(model):
    ids = _prompt_ids(model)
    np.testing.assert_array_equal(_last_logits_prefill(model, ids), _last_logits_prefill(model, ids))


def test_logits_finite(model):
    if model.head != "logits":
        pytest.skip("an argmax LM head returns no logits")
    logits = _last_logits_prefill(model, _prompt_ids(model))
    assert np.isfinite(logits).all(), f"{int((~np.isfinite(logits)).sum())} non-finite logits"


def test_logits_width_covers_tokenizer(model):
    """The logits an infer returns (not a declared or fallback size) score every token id the tokenizer can
    produce, and as many as config.json's vocabulary."""
    if model.head != "logits":
        pytest.skip("an argmax LM head returns no logits")
    width = _last_logits_prefill(model, _prompt_ids(model)).shape[-1]
    assert width >= len(model.tokenizer), f"the LM head scores {width} ids, the tokenizer has {len(model.tokenizer)}"
    vocab = contract.model_config(model.bundle).get("vocab_size")
    if vocab is not None:
        assert width == vocab, f"the LM head scores {width} ids, config.json vocab_size is {vocab}"
    assert width == model.vocab_size
