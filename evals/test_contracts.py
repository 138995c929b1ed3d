"""The model directory's tensor contract (one test per part, function and tensor) and its behavioural contract
(prefill + infer equals token-by-token infer, state isolation, determinism, finite logits, vocabulary coverage)."""
from __future__ import annotations

import numpy as np

from ane_eval import contract

PROMPT = ("The model under test reads this sentence, then a second one, and predicts what comes next. "
          "Question: is the state clean between prompts?\nAnswer:")


def test_tensor(tensor_key, contract_view):
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


def test_metadata_consistency(model):
    """meta.yaml, com.anemll.* metadata and declared shapes agree (re-checked here to report it as a test)."""
    g = contract.cross_check(model.bundle, model.parts, len(model.tokenizer))
    assert (g.context_length, g.batch_size) == (model.context_length, model.batch_size)


def _prompt_ids(model, text=PROMPT):
    return model.tokenizer.encode(text)[: model.context_length]  # small-context models take a prefix


def _last_logits_prefill(model, ids):
    model.reset()
    model.prefill(ids[:-1])
    return model.infer(ids[-1], len(ids) - 1)


def test_prefill_then_infer_equals_token_by_token(model):
    ids = _prompt_ids(model)
    a = _last_logits_prefill(model, ids)
    model.reset()
    for p, t in enumerate(ids):
        b = model.infer(t, p)
    scale = float(np.abs(b).max())
    assert int(a.argmax()) == int(b.argmax())
    assert float(np.abs(a - b).max()) <= 1e-2 * scale + 1e-2, "prefill and infer paths disagree"


def test_state_isolation_after_reset(model):
    ids = _prompt_ids(model)
    other = _prompt_ids(model, "A different, longer prompt fills the cache first. " * 4)
    clean = _last_logits_prefill(model, ids)
    _last_logits_prefill(model, other)
    after = _last_logits_prefill(model, ids)
    np.testing.assert_array_equal(clean, after)


def test_determinism(model):
    ids = _prompt_ids(model)
    np.testing.assert_array_equal(_last_logits_prefill(model, ids), _last_logits_prefill(model, ids))


def test_logits_finite(model):
    logits = _last_logits_prefill(model, _prompt_ids(model))
    assert np.isfinite(logits).all(), f"{int((~np.isfinite(logits)).sum())} non-finite logits"


def test_logits_width_covers_tokenizer(model):
    assert model.vocab_size >= len(model.tokenizer), \
        f"the LM head scores {model.vocab_size} ids, the tokenizer has {len(model.tokenizer)}"
