"""ANEModel: discovery, cross-checks, the prefill/infer protocol, state isolation, backends."""
from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest
import yaml

import ane_eval
from ane_eval.backends import BackendError, auto_backend, coreml_available, select
from ane_eval.bundle import BundleError, discover
from ane_eval.contract import ContractError
from ane_eval.mil import ModelFormatError
from ane_eval.mil import BlobError
from ane_eval.model import ContextOverflowError

from .conftest import hf_logits


@pytest.fixture(scope="module")
def model(demo_dir):
    return ane_eval.load_model(demo_dir, backend="mil", precision="fp16")


@pytest.fixture(scope="module")
def ids(model):
    text = ("Kosdak lives in Quist. Kosdak works as a teacher. Every morning, Kosdak reads a story to the class.\n"
            "Question: What is 3 plus 4?\nAnswer: 7\nQ: Where does Tukre live?\nA: Quist")
    return model.tokenizer.encode(text)


def test_properties(model):
    assert (model.context_length, model.batch_size, model.num_chunks, model.vocab_size) == (256, 32, 2, 1024)
    assert model.backend == "mil" and len(model.tokenizer) == 1000


def test_prefill_then_infer_equals_token_by_token_and_transformers(demo_dir, ids, hf_demo):
    m = ane_eval.load_model(demo_dir, backend="mil", precision="fp32")
    m.reset()
    m.prefill(ids[:-1])
    a = m.infer(ids[-1], len(ids) - 1)
    m.reset()
    for p, t in enumerate(ids):
        b = m.infer(t, p)
    np.testing.assert_allclose(a, b, atol=1e-3)  # logits are fp16 outputs: 1 ulp apart at most
    ref = hf_logits(hf_demo, ids)[-1]
    np.testing.assert_allclose(a, ref, atol=2e-3)
    assert a.argmax() == ref.argmax()


def test_state_isolation(demo_dir, model, ids):
    other = model.tokenizer.encode("Zonak is a doctor in Quist. Every morning, Zonak visits the sick in the hospital."
                                   " " * 3 + "Q: What is 9 minus 2?\nA: 7" * 3)

    def score(m, prompt):
        m.prefill(prompt[:-1])
        return m.infer(prompt[-1], len(prompt) - 1)

    model.reset()
    after_other_then_reset = (score(model, other), model.reset(), score(model, ids))[2]
    model.reset()
    after_reset = score(model, ids)
    fresh = score(ane_eval.load_model(demo_dir, backend="mil", precision="fp16"), ids)
    model.reset()
    score(model, other)  # no reset: the stale longer prompt's slots stay in the cache, hidden by the mask
    after_other_no_reset = score(model, ids)
    assert len(other) > len(ids)
    np.testing.assert_array_equal(after_other_then_reset, after_reset)
    np.testing.assert_array_equal(after_reset, fresh)
    np.testing.assert_array_equal(after_other_no_reset, fresh)


def test_prefix_rewind_equals_scratch(model, ids):
    """Score A, then B sharing A's first k tokens by prefilling only B[k:]: no state copy, same logits."""
    k = 21
    a = ids
    b = ids[:k] + model.tokenizer.encode(" Every morning, Tukre feeds the cows in the barn.")
    model.reset()
    model.prefill(a[:-1])
    model.infer(a[-1], len(a) - 1)
    model.prefill(b[k:-1], start=k)
    rewound = model.infer(b[-1], len(b) - 1)
    model.reset()
    model.prefill(b[:-1])
    scratch = model.infer(b[-1], len(b) - 1)
    np.testing.assert_allclose(rewound, scratch, atol=2e-2)
    assert rewound.argmax() == scratch.argmax()


def test_prefill_never_runs_a_batch_past_the_context(demo_dir):
    """A prefill that starts near the end re-feeds known tokens from an earlier batch start (C - B)."""
    m = ane_eval.load_model(demo_dir, backend="mil", precision="fp32")
    rng = np.random.default_rng(1)
    seq = [int(t) for t in rng.integers(2, 1000, 250)]
    calls = []
    original = m._run_prefill
    m._run_prefill = lambda pos, rows: (calls.append(pos), original(pos, rows))
    m.reset()
    m.prefill(seq[:230])
    m.prefill(seq[230:249], start=230)
    assert calls == [0, 32, 64, 96, 128, 160, 192, 224, 224]  # 224 + 32 = 256 = C
    a = m.infer(seq[249], 249)
    m.reset()
    m.prefill(seq[:249])
    b = m.infer(seq[249], 249)
    np.testing.assert_allclose(a, b, atol=1e-3)


def test_context_overflow_is_an_error(model):
    model.reset()
    with pytest.raises(ContextOverflowError, match="ends at 257, past the context length 256"):
        model.prefill(list(range(257)))
    model.reset()
    model.prefill(list(range(256)))
    with pytest.raises(ContextOverflowError, match="position 256 is past the context length 256"):
        model.infer(5, 256)
    with pytest.raises(ValueError, match="needs positions 0..299 in the cache"):
        model.infer(5, 300)


def test_contract_check_on_every_call(model, monkeypatch):
    monkeypatch.setattr(model, "batch_size", 16)
    model.reset()
    with pytest.raises(ContractError, match=r"llama_embeddings.mlpackage expects input_ids \(1, 1\) or \(1, 32\) "
                                            r"int32, got \(1, 16\) int32"):
        model.prefill([1, 2, 3])
    monkeypatch.undo()
    bad = {"hidden_states": np.zeros((1, 10, 128), np.float16), "position_ids": np.arange(10, dtype=np.int32),
           "causal_mask": np.zeros((1, 1, 10, 256), np.float16), "current_pos": np.array([0], np.int32)}
    with pytest.raises(ContractError, match=r"prefill expects hidden_states \(1, 32, 128\) fp16, got \(1, 10, 128\) "
                                            r"float16; pad to the compiled batch 32"):
        model._call(model._chunks[0]["prefill"][0], model.chunk_parts[0], "prefill", bad)


def test_auto_backend_says_which(demo_dir):
    m = ane_eval.load_model(demo_dir, backend="auto")
    assert m.backend == auto_backend()[0]
    assert f"backend={m.backend}" in repr(m)
    with pytest.raises(BackendError, match="unknown backend 'tpu'"):
        select("tpu")
    if not coreml_available()[0]:
        with pytest.raises(BackendError, match="backend 'coreml' is unavailable: .*use --backend mil"):
            select("coreml")


# --- broken model directories -----------------------------------------------------------------------------------
@pytest.fixture()
def broken(demo_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(demo_dir, dst)
    return dst


def _meta(d, **params):
    doc = yaml.safe_load((d / "meta.yaml").read_text())
    doc["model_info"]["parameters"].update(params)
    (d / "meta.yaml").write_text(yaml.safe_dump(doc))


def _weights(d, part):
    return next(d.glob(f"*{part}*.mlpackage")) / "Data/com.apple.CoreML/weights/weight.bin"


ZOO = {
    "missing chunk": (lambda d: shutil.rmtree(d / "llama_FFN_PF_chunk_02of02.mlpackage"),
                      BundleError, r"missing FFN chunk\(s\) 02of02"),
    "duplicate chunk": (lambda d: (shutil.copytree(d / "llama_FFN_PF_chunk_01of02.mlpackage",
                                                   d / "llama_FFN_PF_lut4_chunk_01of02.mlpackage"),
                                   _meta(d, ffn=None)),
                        BundleError, r"duplicate FFN chunk\(s\): 01 is llama_FFN_PF_chunk_01of02.mlpackage and "
                                     r"llama_FFN_PF_lut4_chunk_01of02.mlpackage"),
    "missing embeddings": (lambda d: shutil.rmtree(d / "llama_embeddings.mlpackage"),
                           BundleError, r"no embeddings part \(\*_embeddings\*.mlpackage or .mlmodelc\)"),
    "missing lm_head": (lambda d: shutil.rmtree(d / "llama_lm_head.mlpackage"), BundleError, "no lm_head part"),
    "wrong context length": (lambda d: _meta(d, context_length=512), ContractError,
                             "meta.yaml context_length is 512 but the model was compiled for 256"),
    "wrong batch size": (lambda d: _meta(d, batch_size=64), ContractError,
                         "meta.yaml batch_size is 64 but the model was compiled with prefill batch 32"),
    "wrong split count": (lambda d: _meta(d, split_lm_head=16), ContractError,
                          "meta.yaml split_lm_head is 16 but llama_lm_head.mlpackage has 8 logits outputs"),
    "wrong chunk count": (lambda d: _meta(d, num_chunks=3), BundleError,
                          "meta.yaml num_chunks is 3 but the directory has 2 chunks"),
    "truncated weight.bin": (lambda d: _weights(d, "lm_head").write_bytes(_weights(d, "lm_head").read_bytes()[:5000]),
                             BlobError, "truncated or corrupt"),
    "corrupted blob record": (lambda d: _corrupt_record(_weights(d, "chunk_02")), BlobError, "bad sentinel"),
    "missing tokenizer": (lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")],
                          BundleError, "no tokenizer in .* ane-eval never downloads a substitute"),
    # loaded on a thread while the weights are read (model.py): its failure arrives as the same one line
    "corrupt tokenizer": (lambda d: (d / "tokenizer.json").write_text("{not json"), BundleError,
                          "cannot load the tokenizer"),
    "empty directory": (lambda d: [shutil.rmtree(p) if p.is_dir() else p.unlink() for p in d.iterdir()],
                        BundleError, "the directory is empty"),
    "bad meta.yaml": (lambda d: (d / "meta.yaml").write_text("model_info: [unclosed"), BundleError,
                      "meta.yaml: not valid YAML"),
    "tokenizer_path outside": (lambda d: _meta(d, tokenizer_path="../../etc"), BundleError,
                               "tokenizer_path '../../etc' is not a directory inside the model directory"),
}


def _corrupt_record(path):
    with open(path, "r+b") as fh:
        fh.seek(64)
        fh.write(struct.pack("<I", 0))


@pytest.mark.parametrize("case", list(ZOO))
def test_broken_directory_zoo(broken, case):
    damage, error, message = ZOO[case]
    damage(broken)
    with pytest.raises(error, match=message):
        ane_eval.load_model(broken, backend="mil")


def test_not_a_directory(tmp_path):
    f = tmp_path / "model.txt"
    f.write_text("x")
    with pytest.raises(BundleError, match="is a file, not a model directory"):
        discover(f)
    with pytest.raises(BundleError, match="no such directory"):
        discover(tmp_path / "nope")


def test_meta_variants(broken):
    """Old meta.yaml files: no split_lm_head (then 8), no architecture; .mlmodelc names with .mlpackage files;
    lut names that do not match the files."""
    doc = yaml.safe_load((broken / "meta.yaml").read_text())
    params = doc["model_info"]["parameters"]
    del params["split_lm_head"]
    del doc["model_info"]["architecture"]
    params["ffn"] = "llama_FFN_PF_lut4.mlmodelc"  # names a LUT variant that is not there: fall back to the pattern
    (broken / "meta.yaml").write_text(yaml.safe_dump(doc))
    m = ane_eval.load_model(broken, backend="mil")
    assert m.bundle.split_lm_head == 8 and m.num_chunks == 2 and m.bundle.architecture == "llama"
    (broken / "meta.yaml").unlink()  # no meta.yaml at all: file patterns and declared shapes
    m = ane_eval.load_model(broken, backend="mil")
    assert (m.context_length, m.batch_size, m.bundle.split_lm_head) == (256, 32, None)


def test_renamed_package_is_not_a_compiled_model(broken):
    """Compiled parts are found for the portable runtime too (tests/test_mlmodelc.py runs them); a package renamed
    to .mlmodelc is refused in one line naming it."""
    for p in broken.glob("*.mlpackage"):
        p.rename(p.with_suffix(".mlmodelc"))
    assert discover(broken, backend="mil").embeddings.name == "llama_embeddings.mlmodelc"
    with pytest.raises(ModelFormatError, match=r"llama_\w+.mlmodelc: not a compiled model \(no model.mil"):
        ane_eval.load_model(broken, backend="mil")


def test_causal_mask_rows():
    """The rows built for a batch are those rows of the full (C, C) mask: 0 up to the query's position, then -inf."""
    from ane_eval.model import causal_mask

    full = causal_mask(16)
    assert full.shape == (1, 1, 16, 16) and full.dtype == np.float16
    np.testing.assert_array_equal(full[0, 0], np.triu(np.full((16, 16), -np.inf, np.float16), k=1))
    np.testing.assert_array_equal(causal_mask(16, 4, 8), full[:, :, 4:12])
    np.testing.assert_array_equal(causal_mask(16, 15, 1), np.zeros((1, 1, 1, 16), np.float16))


def test_expected_geometry_comes_from_config_and_meta(demo_dir, tmp_path):
    """The contract's expected shapes follow the original checkpoint's config.json and meta.yaml, so a part
    declaring another shape fails `pytest evals`; nothing is taken from the parts' own declarations."""
    import json

    from ane_eval import contract, demo

    hf = json.loads((demo.checkpoint_dir() / "config.json").read_text())
    layers, kv, d, vocab = hf["num_hidden_layers"], hf["num_key_value_heads"], hf["head_dim"], hf["vocab_size"]
    C, B, K = (demo.BUILD_OPTIONS[k] for k in ("context_length", "batch_size", "split_lm_head"))
    g, unknown = contract.expected_geometry(discover(demo_dir))
    assert unknown == []
    assert (g.context_length, g.batch_size, g.hidden_size) == (C, B, hf["hidden_size"])
    assert g.state_shape == (2 * layers, kv, C, d) and g.logits_widths == [vocab // K] * K
    exp = contract.expected_interface(g, 2)
    assert exp[("chunk01", "prefill", "inputs", "causal_mask")] == ((1, 1, B, C), "fp16")
    assert exp[("chunk02", "prefill", "outputs", "output_hidden_states")] == ((1, 1, hf["hidden_size"]), "fp16")
    assert exp[("chunk01", "prefill", "outputs", "output_hidden_states")] == ((1, B, hf["hidden_size"]), "fp16")

    d2 = tmp_path / "model"
    shutil.copytree(demo_dir, d2)
    cfg = json.loads((d2 / "config.json").read_text())
    (d2 / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 4, "head_dim": None}))
    g2, unknown = contract.expected_geometry(discover(d2))
    assert g2.state_shape == (2 * layers, 4, C, hf["hidden_size"] // hf["num_attention_heads"]) and unknown == []
    declared = contract.declared_interface(contract.describe_parts(discover(d2)))
    key = ("chunk01", "infer", "states", contract.STATE_NAME)
    assert contract.expected_interface(g2, 2)[key] != declared[key]  # what test_tensor reports
    (d2 / "meta.yaml").write_text((d2 / "meta.yaml").read_text().replace("  state_length: 512\n", "").replace(
        "    split_lm_head: 8\n", "    split_lm_head: 8\n    state_length: 512\n"))
    assert contract.expected_geometry(discover(d2))[0].state_shape[2] == 512  # S = max(state_length, C)
    (d2 / "config.json").unlink()
    g3, unknown = contract.expected_geometry(discover(d2))
    assert g3.state_shape is None and g3.logits_widths == [None] * 8 and "config.json hidden_size" in unknown
    assert contract.expected_interface(g3, 2)[("lm_head", "main", "outputs", "logits8")] == (None, "fp16")
    assert contract.expected_interface(g3, 2)[("lm_head", "main", "inputs", "hidden_states")] == (None, "fp16")
    (d2 / "config.json").write_text("{not json")
    with pytest.raises(ContractError, match=r"config.json: not valid JSON .*; fix or remove it"):
        contract.expected_geometry(discover(d2))
