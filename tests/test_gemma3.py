"""Gemma 3 in ANEMLL 0.3.5's layout: the builder's programs (local/global or unified KV cache, rotate functions,
split-rotate files, update_mask prefill) match HF transformers on prompts longer than the sliding window, and
ANEModel drives them by 0.3.5's protocol (zkh2016/Anemll@4e77d00 tests/chat.py). The same builds through
`pytest evals` (contract and demo tasks, portable runtime and emulated Mac): tests/test_layouts_evals.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

import ane_eval
from ane_eval.convert import BuildError, BuildOptions, build
from ane_eval.convert.checkpoint import CheckpointError

from .conftest import GEMMA_B, GEMMA_C, GEMMA_SW, GEMMA_VARIANTS, hf_logits, psnr, write_gemma3_checkpoint

SW, C, B, VARIANTS = GEMMA_SW, GEMMA_C, GEMMA_B, GEMMA_VARIANTS


@pytest.fixture(scope="session")
def hf_gemma(gemma_ckpt):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gemma_ckpt, dtype=torch.float32).eval()


def spec_functions(path):
    import coremltools as ct

    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    return spec.description.defaultFunctionName, {
        f.name: {s.name: tuple(s.type.stateType.arrayType.shape) for s in f.state} | {
            i.name: tuple(i.type.multiArrayType.shape) for i in f.input} for f in spec.description.functions}


def test_layout_follows_0_3_5(gemma_builds):
    split = gemma_builds["split"]
    default, fns = spec_functions(split / "gemma3_FFN_PF_chunk_01of02.mlpackage")
    assert default == "infer" and set(fns) == {"infer", "infer_rotate", "prefill", "prefill_rotate"}
    for fn in fns.values():  # 3 sliding layers, 1 full-attention layer, 2 KV heads, head dim 16
        assert fn["model_model_kv_cache_local"] == (6, 2, SW, 16)
        assert fn["model_model_kv_cache_global"] == (2, 2, C, 16)
    assert fns["prefill"]["causal_mask"] == (1, 1, B, C) and "update_mask" not in fns["prefill"]
    meta = yaml.safe_load((split / "meta.yaml").read_text())["model_info"]
    p = meta["parameters"]
    assert (meta["version"], meta["architecture"]) == ("0.3.5", "gemma3_text")
    assert {k: p[k] for k in ("split_lm_head", "vocab_size", "sliding_window", "prefill_dynamic_slice", "ffn")} == \
        {"split_lm_head": 16, "vocab_size": 1024, "sliding_window": SW, "prefill_dynamic_slice": True,
         "ffn": "gemma3_FFN_PF_chunk_01of02.mlmodelc"}
    assert p["lm_head_chunk_sizes"] == [64] * 16
    assert "# Conversion Parameters" in (split / "meta.yaml").read_text()
    assert json.loads((split / "config.json").read_text())["model_type"] == "llama"  # as 0.3.5's stub says

    _, fns = spec_functions(gemma_builds["unified"] / "gemma3_FFN_PF_chunk_01of01.mlpackage")
    assert set(fns) == {"infer", "prefill"} and fns["infer"]["model_model_kv_cache_0"] == (8, 2, C, 16)

    sr = gemma_builds["split_rotate"]
    p = yaml.safe_load((sr / "meta.yaml").read_text())["model_info"]["parameters"]
    assert p["split_rotate"] is True and p["pf"] == "gemma3_FFN_PF_chunk_01of01_rot.mlmodelc"
    assert p["update_mask_prefill"] is True and "prefill_dynamic_slice" not in p
    default, fns = spec_functions(sr / "gemma3_FFN_PF_chunk_01of01.mlpackage")
    assert (default, set(fns)) == ("infer", {"infer", "prefill"})
    assert fns["prefill"]["update_mask"] == (1, 1, C, B)
    default, fns = spec_functions(sr / "gemma3_FFN_PF_chunk_01of01_rot.mlpackage")
    assert (default, set(fns)) == ("infer_rotate", {"infer_rotate", "prefill_rotate"})
    assert "update_mask" not in fns["prefill_rotate"]  # gemma3_converter.py: not on the rotate prefill
    from ane_eval.card import model_card

    roles = [p["role"] for p in model_card(sr)["parts"]]
    assert roles == ["embeddings", "chunk 1", "chunk 1 (rotate functions)", "lm_head"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_transformers_past_the_sliding_window(gemma_builds, hf_gemma, variant):
    """fp32-mode logits after prefill (fill batches, a rotating batch, the rest token by token) and infer well past
    the window: PSNR >= 50 dB against HF and identical argmax, as for the other architectures."""
    model = ane_eval.load_model(gemma_builds[variant], backend="mil", precision="fp32")
    assert model.rotates == (variant != "unified")
    ids = [int(t) for t in np.random.default_rng(1).integers(3, 1000, 50)]
    model.prefill(ids[:27])  # batches at 0 and 8 fill, 16 rotates; 24..26 go through infer_rotate
    got = np.stack([model.infer(t, p) for p, t in enumerate(ids) if p >= 27])
    ref = hf_logits(hf_gemma, ids)[27:]
    assert psnr(ref, got) >= 50
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_fp16_prefill_equals_token_by_token(gemma_builds):
    model = ane_eval.load_model(gemma_builds["split"], backend="mil", precision="fp16")
    ids = [int(t) for t in np.random.default_rng(2).integers(3, 1000, 45)]
    model.prefill(ids[:-1])
    a = model.infer(ids[-1], len(ids) - 1)
    model.reset()
    for p, t in enumerate(ids):
        b = model.infer(t, p)
    assert int(a.argmax()) == int(b.argmax())
    assert float(np.abs(a - b).max()) <= 1e-2 * float(np.abs(b).max()) + 1e-2


def test_rewind_after_rotation_replays_the_prefix(gemma_builds):
    """A rotated local cache no longer holds the prefix: rewinding to a shared prefix must equal a fresh run."""
    model = ane_eval.load_model(gemma_builds["split"], backend="mil", precision="fp32")
    ids = [int(t) for t in np.random.default_rng(3).integers(3, 1000, 40)]
    model.prefill(ids[:35])
    model.infer(ids[35], 35)
    rewound = model.infer(ids[22], 22)  # back inside the rotated region
    model.reset()
    model.prefill(ids[:22])
    np.testing.assert_array_equal(rewound, model.infer(ids[22], 22))


def test_inspect_shows_the_local_and_global_caches(gemma_builds):
    """`ane-eval inspect`: which cache holds which layers, how many positions, and that the local one rotates."""
    from ane_eval.card import format_card, model_card

    cards = {name: model_card(gemma_builds[name]) for name in ("split", "unified", "split_rotate")}
    caches = {name: {c["name"]: (c["kind"], c["layers"], c["positions"], c["rotates"])
                     for c in card["layout"]["kv_caches"]} for name, card in cards.items()}
    split = {"model_model_kv_cache_local": ("local", 3, SW, True), "model_model_kv_cache_global": ("global", 1, C, False)}
    assert caches == {"split": split, "split_rotate": split,
                      "unified": {"model_model_kv_cache_0": ("unified", 4, C, False)}}
    text = format_card(cards["split"])
    assert (f"model_model_kv_cache_local (6, 2, {SW}, 16): local (sliding-window layers), layers 3, positions {SW}, "
            f"shifted past the window of {SW} by infer_rotate / prefill_rotate") in text
    assert f"model_model_kv_cache_global (2, 2, {C}, 16): global (full-attention layers), layers 1, positions {C}" in text
    assert "LM head: logits" in text


@pytest.mark.parametrize("opts, message", [
    ({"context_length": 64, "batch_size": 8}, "context length 64 is below 256"),
    ({"context_length": 64, "batch_size": 12, "allow_small_context": True}, "prefill batch 12 must divide the "
                                                                             "sliding window 16"),
    ({"context_length": 64, "batch_size": 8, "allow_small_context": True, "single_cache": True,
      "split_rotate": True}, "single_cache has no rotate functions"),
])
def test_refused_gemma3_options(gemma_ckpt, tmp_path, opts, message):
    with pytest.raises(BuildError, match=message):
        build(gemma_ckpt, tmp_path / "out", BuildOptions(**opts))


def test_softcapping_is_refused(tmp_path):
    ckpt = write_gemma3_checkpoint(tmp_path / "ckpt", final_logit_softcapping=30.0)
    with pytest.raises(CheckpointError, match="final_logit_softcapping=30.0 is not supported"):
        build(ckpt, tmp_path / "out", BuildOptions(context_length=64, batch_size=8, allow_small_context=True))
