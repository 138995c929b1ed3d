"""ANEMLL 0.3.5 layouts the builder writes (argmax LM heads, monolithic models, 0.3.5 meta.yaml), read by discovery,
contract, ANEModel, the harness and `inspect`, and checked against HF transformers on the same weights.

Upstream sources (zkh2016/Anemll at 4e77d00e): llama_converter.py (argmax head, monolithic conversion),
combine_models.py (monolithic file names), generate_meta_yaml.py (meta.yaml keys), tests/chat.py (the driver: argmax
token = local index + chunk offset, the 0.3.5 prefill rule)."""
from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import yaml

import ane_eval
from ane_eval import contract
from ane_eval.convert import BuildOptions, build
from ane_eval.bundle import BundleError, discover
from ane_eval.contract import ContractError
from ane_eval.harness import ANELM, NoDistributionError
from ane_eval.model import NoLogitsError

from .conftest import QWEN_VOCAB, hf_logits, psnr
from .test_user_tasks import README
from .test_convert import features, spec_of

VOCAB, SPLIT = QWEN_VOCAB, 16
WIDTHS = [65] * 6 + [64] * 10


@pytest.fixture(scope="module")
def built(layouts_035):
    return layouts_035


@pytest.fixture(scope="module")
def hf(built):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(built[0], dtype=torch.float32).eval()


IDS = [int(t) for t in np.random.default_rng(1).integers(2, 1000, 44)]


def meta_of(path):
    return yaml.safe_load((path / "meta.yaml").read_text())["model_info"]


def test_meta_yaml_and_metadata_follow_035(built):
    _, dirs = built
    ref = meta_of(dirs["reference"])
    assert ref["version"] == "0.3.4" and "vocab_size" not in ref["parameters"]  # the default stays 0.3.4
    m = meta_of(dirs["argmax"])
    p = m["parameters"]
    assert m["version"] == "0.3.5" and "model_type" not in m
    assert p["ffn"] == "qwen_FFN_PF_chunk_01of02.mlmodelc"  # 0.3.5 keeps the chunk suffix
    assert (p["argmax_in_model"], p["vocab_size"], p["lm_head_chunk_sizes"], p["split_lm_head"],
            p["prefill_dynamic_slice"]) == (True, VOCAB, WIDTHS, SPLIT, True)
    mono = meta_of(dirs["monolithic_argmax"])
    p = mono["parameters"]
    assert mono["model_type"] == "monolithic" and p["monolithic_model"] == "qwen_monolithic_full.mlmodelc"
    assert p["functions"] == ["infer", "prefill"] and p["lut_bits"] == "none" and "ffn" not in p
    md = dict(spec_of(dirs["argmax"] / "qwen_lm_head.mlpackage").description.metadata.userDefined)
    assert (md["com.anemll.argmax_in_model"], md["com.anemll.vocab_size"],
            md["com.anemll.lm_head_chunk_sizes"]) == ("true", str(VOCAB), ",".join(map(str, WIDTHS)))
    md = dict(spec_of(dirs["monolithic_argmax"] / "qwen_monolithic_full.mlpackage").description.metadata.userDefined)
    assert md["com.anemll.functions"] == "infer,prefill" and md["com.anemll.batch_size"] == "16"
    assert sorted(p.name for p in dirs["monolithic"].glob("*.mlpackage")) == ["qwen_monolithic_full.mlpackage"]


def test_argmax_and_monolithic_interfaces(built):
    """llama_converter: argmax_idx int32 [N] / argmax_val fp16 [N]; monolithic functions take input_ids, and the
    prefill function returns logits (never the argmax)."""
    _, dirs = built
    spec = spec_of(dirs["argmax"] / "qwen_lm_head.mlpackage")
    _, outs, _ = features(spec.description)
    assert outs == {"argmax_idx": ((SPLIT,), 131104), "argmax_val": ((SPLIT,), 65552)}
    spec = spec_of(dirs["monolithic_argmax"] / "qwen_monolithic_full.mlpackage")
    fns = {f.name: features(f) for f in spec.description.functions}
    assert spec.description.defaultFunctionName == "infer" and set(fns) == {"infer", "prefill"}
    assert fns["infer"][0]["input_ids"] == ((1, 1), 131104) and fns["prefill"][0]["input_ids"] == ((1, 16), 131104)
    assert set(fns["infer"][1]) == {"argmax_idx", "argmax_val"}
    assert set(fns["prefill"][1]) == {f"logits{k}" for k in range(1, SPLIT + 1)}


@pytest.mark.parametrize("name", ["argmax", "monolithic", "monolithic_argmax"])
def test_tensor_contract_holds(built, name):
    """What the suite's contract tests check (evals/test_contracts.py test_tensor / test_no_undeclared_tensors)."""
    bundle = discover(built[1][name])
    parts = contract.describe_parts(bundle)
    geometry = contract.cross_check(bundle, parts, VOCAB)
    expected, declared = contract.expected_interface(geometry, len(bundle.chunks)), contract.declared_interface(parts)
    assert expected == declared
    assert geometry.logits_widths == WIDTHS and geometry.head == ("argmax" if "argmax" in name else "logits")


def test_monolithic_logits_match_transformers(built, hf):
    model = ane_eval.load_model(built[1]["monolithic"], backend="mil", precision="fp32")
    model.prefill(IDS[:20])
    got = np.stack([model.infer(t, p) for p, t in enumerate(IDS) if p >= 20])
    ref = hf_logits(hf, IDS)[20:]
    assert psnr(ref, got) >= 50
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("name", ["argmax", "monolithic_argmax"])
def test_argmax_heads_give_the_greedy_tokens(built, hf, name):
    """fp32 mode: HF's greedy tokens; fp16: exactly the tokens of the logits head of the same weights."""
    _, dirs = built
    m32 = ane_eval.load_model(dirs[name], backend="mil", precision="fp32")
    m32.prefill(IDS[:20])
    tokens = [m32.next_token(t, p) for p, t in enumerate(IDS) if p >= 20]
    assert tokens == [int(t) for t in hf_logits(hf, IDS)[20:].argmax(-1)]
    assert max(tokens) >= sum(WIDTHS[:9])  # tokens from later chunks: the offsets are exercised
    with pytest.raises(NoLogitsError, match="no logits"):
        m32.infer(IDS[0], 0)
    m16, ref16 = (ane_eval.load_model(dirs[n], backend="mil", precision="fp16") for n in (name, "reference"))
    for m in (m16, ref16):
        m.prefill(IDS[:20])
    assert [m16.next_token(t, p) for p, t in enumerate(IDS) if p >= 20] == \
        [int(ref16.infer(t, p).argmax()) for p, t in enumerate(IDS) if p >= 20]


def _rewrite_meta(src, dst, **changes):
    shutil.copytree(src, dst)
    doc = yaml.safe_load((dst / "meta.yaml").read_text())
    for key, value in changes.items():
        target = doc["model_info"] if key in ("version", "model_type") else doc["model_info"]["parameters"]
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
    (dst / "meta.yaml").write_text(yaml.safe_dump(doc))
    return dst


def test_argmax_chunk_layout_sources(built, tmp_path, monkeypatch):
    """chat.py _resolve_argmax_chunk_layout: lm_head_chunk_sizes, else an even split of vocab_size (meta.yaml, then
    the head's metadata); nothing to map by is refused, not guessed."""
    src = built[1]["argmax"]
    no_sizes = _rewrite_meta(src, tmp_path / "a", lm_head_chunk_sizes=None)
    bundle = discover(no_sizes)
    parts = contract.describe_parts(bundle)
    del parts["lm_head"].metadata["com.anemll.lm_head_chunk_sizes"]
    assert contract.cross_check(bundle, parts, VOCAB).logits_widths == WIDTHS  # 1030 = 6*65 + 10*64
    neither = _rewrite_meta(src, tmp_path / "b", lm_head_chunk_sizes=None, vocab_size=None)
    bundle = discover(neither)
    parts = contract.describe_parts(bundle)
    assert contract.cross_check(bundle, parts, VOCAB).logits_widths == WIDTHS  # from com.anemll.* metadata
    parts["lm_head"].metadata.clear()
    with pytest.raises(ContractError, match="add vocab_size to meta.yaml"):
        contract.cross_check(bundle, parts, VOCAB)
    wrong = _rewrite_meta(src, tmp_path / "c", lm_head_chunk_sizes=[500, 500])
    with pytest.raises(ContractError, match="lm_head_chunk_sizes has 2 entries but .* returns 16 argmax pairs"):
        ane_eval.load_model(wrong, backend="mil")
    lies = _rewrite_meta(built[1]["reference"], tmp_path / "d", argmax_in_model=True)
    with pytest.raises(ContractError, match="argmax_in_model but .* returns"):
        ane_eval.load_model(lies, backend="mil")


def test_prefill_rules(built, tmp_path, monkeypatch):
    """0.3.4: padded batches; 0.3.5 with prefill_dynamic_slice: full batches only, the rest through infer; 0.3.5
    with neither flag: every token through infer (chat.py). All three put the same cache in place."""
    ref = built[1]["reference"]
    dirs = {"padded": ref,
            "full_batches": _rewrite_meta(ref, tmp_path / "fb", version="0.3.5", prefill_dynamic_slice=True),
            "tokens": _rewrite_meta(ref, tmp_path / "tk", version="0.3.5")}
    batches, logits = {}, {}
    for rule, path in dirs.items():
        model = ane_eval.load_model(path, backend="mil", precision="fp32")
        assert model.prefill_rule == rule
        calls = []
        run = model._run_prefill
        monkeypatch.setattr(model, "_run_prefill", lambda pos, rows, *fn, run=run: (calls.append((pos, len(rows))),
                                                                                    run(pos, rows, *fn)))
        model.prefill(IDS[:40])
        batches[rule] = (calls, model.token_evaluations)
        logits[rule] = model.infer(IDS[40], 40)
    assert batches == {"padded": ([(0, 16), (16, 16), (32, 16)], 48), "full_batches": ([(0, 16), (16, 16)], 40),
                       "tokens": ([], 40)}
    for rule in ("full_batches", "tokens"):
        np.testing.assert_allclose(logits[rule], logits["padded"], atol=1e-3)


def test_harness_generates_with_argmax_heads_and_refuses_scoring(built):
    from lm_eval.api.instance import Instance

    from ane_eval import runner

    _, dirs = built
    reqs = [Instance("generate_until", {}, (ctx, {"until": ["\n\n"], "max_gen_toks": 12}), i)
            for i, ctx in enumerate(["Kosdak lives in", "Question: What is 3 plus 4?\nAnswer:"])]
    for argmax, logits in (("argmax", "reference"), ("monolithic_argmax", "monolithic")):
        lm = ANELM(model=ane_eval.load_model(dirs[argmax], backend="mil"))
        assert not lm.has_distribution
        want = ANELM(model=ane_eval.load_model(dirs[logits], backend="mil")).generate_until(reqs, disable_tqdm=True)
        assert lm.generate_until(reqs, disable_tqdm=True) == want and any(want)
    model = lm.model
    before = model.token_evaluations
    with pytest.raises(NoDistributionError, match="not a distribution, so 1 loglikelihood request"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("a", " b"), 0)], disable_tqdm=True)
    with pytest.raises(NoDistributionError, match="rolling"):
        lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("a b c",), 0)], disable_tqdm=True)
    sampled = Instance("generate_until", {}, ("a", {"until": ["\n"], "do_sample": True, "temperature": 0.7}), 1)
    with pytest.raises(NoDistributionError, match="sampled generation"):
        lm.generate_until([reqs[0], sampled], disable_tqdm=True)
    tm = runner.task_manager()
    # a generation task listed first must not run before the refusal (lm-eval runs request types in turn)
    with pytest.raises(NoDistributionError, match=r"the task\(s\) demo_boolq, demo_wikitext cannot be scored"):
        runner.evaluate(lm, ["demo_qa", "demo_boolq", "demo_wikitext"], tm, limit=2, bootstrap_iters=0)
    assert model.token_evaluations == before
    with pytest.raises(NoDistributionError) as e:
        runner.evaluate(lm, ["demo_boolq"], tm, limit=2, bootstrap_iters=0)
    assert str(e.value).replace(model.name, "<model>") in README  # the troubleshooting guide quotes it


def test_inspect_names_the_head(built):
    from ane_eval.card import format_card, model_card

    _, dirs = built
    for name, head in (("reference", "logits"), ("argmax", "argmax"), ("monolithic_argmax", "argmax")):
        card = model_card(dirs[name])
        assert card["consistency"]["ok"], card["consistency"]
        assert card["layout"]["head"] == head
        assert f"LM head: {head} (" in format_card(card)
        assert [(c["name"], c["kind"], c["layers"], c["positions"]) for c in card["layout"]["kv_caches"]] == \
            [("model_model_kv_cache_0", "whole model", 2, 64)]
    card = model_card(dirs["monolithic_argmax"])
    assert card["layout"]["model_type"] == "monolithic" and [p["role"] for p in card["parts"]] == ["monolithic"]


@pytest.mark.parametrize("change, message", [
    ({"argmax_in_model": "maybe"}, "argmax_in_model must be true or false, got 'maybe'"),
    ({"lm_head_chunk_sizes": [500, -500]}, "lm_head_chunk_sizes must be a positive integer"),
    ({"vocab_size": 10 ** 12}, "vocab_size must be a positive integer up to"),
    ({"model_type": "fancy"}, "model_info.model_type must be one of chunked, monolithic"),
    ({"functions": "infer"}, "functions must be a list of function names"),
])
def test_bad_035_keys_are_one_line(built, tmp_path, change, message):
    path = _rewrite_meta(built[1]["argmax"], tmp_path / "m", **change)
    with pytest.raises(BundleError, match="meta.yaml: " + message) as e:
        discover(path)
    assert "\n" not in str(e.value)


def test_monolithic_without_meta_yaml_is_found(built, tmp_path):
    path = _rewrite_meta(built[1]["monolithic"], tmp_path / "m")
    (path / "meta.yaml").unlink()
    bundle = discover(path)
    assert bundle.monolithic.name == "qwen_monolithic_full.mlpackage" and bundle.embeddings is None


@pytest.mark.parametrize("opts, message", [
    ({"monolithic": True, "lut_lmhead": 4}, "a monolithic model takes one LUT for all its weights"),
    ({"argmax": True, "meta_version": "0.3.4"}, "argmax heads and monolithic models are ANEMLL 0.3.5 layouts"),
    ({"monolithic": True, "lut_ffn": 4}, "LM head parts of width [65] cannot be palettized in groups of 8"),
])
def test_refused_035_options(built, tmp_path, opts, message):
    from ane_eval.convert import BuildError

    with pytest.raises(BuildError, match=re.escape(message)):
        build(built[0], tmp_path / "out", BuildOptions(context_length=64, batch_size=16, num_chunks=2, **opts))
