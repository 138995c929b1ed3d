"""Fidelity against the source model: the demo's fp16 conversion is faithful to its checkpoint, its LUT4 conversion
clearly is not; every statistic equals a direct computation from both models' logits; a stored top-k reference
gives the live values within its documented bound; the command line's outputs and errors."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from ane_eval import demo, fidelity
from ane_eval.cli import main
from tests.conftest import hf_logits, psnr

REPORT_KEYS = {"tokens", "mean_kld", "median_kld", "p90_kld", "p99_kld", "max_kld", "top1_agreement", "ppl_model",
               "ppl_reference", "ppl_ratio", "mean_dp", "rms_dp", "logit_psnr_db"}


@pytest.fixture(scope="module")
def text() -> str:
    return (demo.HERE.parent.parent / "evals" / "suites" / "demo_fidelity.txt").read_text()


@pytest.fixture(scope="module")
def checkpoint():
    return fidelity.load_reference(demo.checkpoint_dir())


@pytest.fixture(scope="module")
def models():
    import ane_eval

    return {name: ane_eval.load_model(demo.model_dir(lut=lut), backend="mil") for name, lut in (("fp16", None),
                                                                                                ("lut4", 4))}


@pytest.fixture(scope="module")
def live(models, checkpoint, text, tmp_path_factory):
    """{name: (report, stored reference file)} of the live measurement (which also saves the reference)."""
    out = tmp_path_factory.mktemp("fidelity")
    return {name: (fidelity.run(fidelity.plan(m, checkpoint, [text]), save=out / f"{name}.npz", progress=False),
                   out / f"{name}.npz") for name, m in models.items()}


def test_fp16_conversion_is_faithful_to_its_checkpoint(live):
    r = live["fp16"][0]
    assert r["tokens"] == 656 and r["windows"] == 3  # longer than the 256-token context: rolling windows
    assert 0 <= r["mean_kld"] < 1e-4 and r["max_kld"] < 0.01
    assert r["top1_agreement"] >= 0.99
    assert abs(r["ppl_ratio"] - 1) < 0.002 and r["rms_dp"] < 0.005 and r["logit_psnr_db"] > 60


def test_lut4_conversion_is_clearly_worse(live):
    fp16, lut4 = live["fp16"][0], live["lut4"][0]
    assert lut4["mean_kld"] > 0.01 and lut4["mean_kld"] > 100 * fp16["mean_kld"]
    assert lut4["mean_kld"] - 3 * lut4["mean_kld_stderr"] > fp16["mean_kld"] + 3 * fp16["mean_kld_stderr"]
    assert lut4["top1_agreement"] < 0.97 < fp16["top1_agreement"]
    assert lut4["rms_dp"] > 10 * fp16["rms_dp"] and lut4["logit_psnr_db"] < fp16["logit_psnr_db"] - 20


def direct(model, hf, text):
    """The statistics computed here from both models' logits, with torch and lm-eval's windows: nothing of
    ane_eval.fidelity."""
    import torch
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tok = model.tokenizer
    ids = tok.encode(text)
    C = model.context_length
    p_logits, q_logits, targets = [], [], []
    for w in get_rolling_token_windows(ids, tok.bos_token_id, C, 1):
        ctx, cont = make_disjoint_window(w)
        inp = (ctx + cont)[:-1]
        first = len(inp) - len(cont)
        model.reset()  # the ANEMLL protocol: prefill the context, one infer per scored position
        if first:
            model.prefill(inp[:first])
        q_logits.append(np.stack([model.infer(inp[p], p) for p in range(first, len(inp))]))
        p_logits.append(hf_logits(hf, inp)[first:])
        targets += cont
    P, Q = torch.tensor(np.concatenate(p_logits), dtype=torch.float64), torch.tensor(np.concatenate(q_logits),
                                                                                         dtype=torch.float64)
    logp, logq = P.log_softmax(-1), Q.log_softmax(-1)
    kld = torch.nn.functional.kl_div(logq, logp, reduction="none", log_target=True).sum(-1).numpy()
    t = torch.tensor(targets)
    nll_p, nll_q = -logp[torch.arange(len(t)), t].numpy(), -logq[torch.arange(len(t)), t].numpy()
    dp = np.exp(-nll_q) - np.exp(-nll_p)
    return {"tokens": len(targets), "mean_kld": kld.mean(), "median_kld": np.median(kld),
            "p90_kld": np.quantile(kld, 0.9), "p99_kld": np.quantile(kld, 0.99), "max_kld": kld.max(),
            "top1_agreement": float((P.argmax(-1) == Q.argmax(-1)).double().mean()),
            "ppl_model": math.exp(nll_q.mean()), "ppl_reference": math.exp(nll_p.mean()),
            "ppl_ratio": math.exp(nll_q.mean() - nll_p.mean()), "mean_dp": dp.mean(),
            "rms_dp": math.sqrt((dp ** 2).mean()), "logit_psnr_db": psnr(P.numpy(), Q.numpy()),
            "mean_kld_stderr": kld.std(ddof=1) / math.sqrt(len(kld))}


@pytest.mark.parametrize("name", ["fp16", "lut4"])
def test_values_equal_a_direct_computation(name, live, models, hf_demo, text):
    report = live[name][0]
    want = direct(models[name], hf_demo, text)
    for key, value in want.items():
        assert report[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("name", ["fp16", "lut4"])
def test_stored_reference_equals_live_within_its_bound(name, live, models):
    report, path = live[name]
    stored = fidelity.run(fidelity.plan(models[name], fidelity.load_reference(path)), progress=False)
    a, b = report["positions"], stored["positions"]
    for key in ("same_top", "nll_reference", "dp"):  # exact up to float32 storage
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-6, err_msg=key)
    for key in ("top1_agreement", "ppl_reference", "ppl_ratio", "mean_dp", "rms_dp", "tokens"):
        assert stored[key] == pytest.approx(report[key], rel=1e-5, abs=1e-8), key
    # documented: the stored KLD never exceeds the full KLD, and falls short by at most the bound
    assert np.all(b["kld"] <= a["kld"] + 1e-6) and np.all(a["kld"] - b["kld"] <= b["bound"] + 1e-6)
    assert stored["mean_kld"] <= report["mean_kld"] + 1e-6 <= stored["mean_kld"] + stored["kld_error_bound"] + 2e-6
    assert stored["mean_kld"] == pytest.approx(report["mean_kld"], rel=0.02, abs=1e-7)  # tight in practice
    assert "top-64" in stored["logit_psnr_scope"] and "all 1024" in report["logit_psnr_scope"]


def test_a_small_top_k_shows_the_bound_at_work(live, models, checkpoint, text, tmp_path):
    m = models["lut4"]
    path = tmp_path / "k4.npz"
    full = fidelity.run(fidelity.plan(m, checkpoint, [text], max_tokens=300), save=path, top_k=4, progress=False)
    small = fidelity.run(fidelity.plan(m, fidelity.load_reference(path)), progress=False)
    a, b = full["positions"], small["positions"]
    short = a["kld"] - b["kld"]
    assert short.max() > 1e-3  # a real shortfall at k = 4 ...
    assert np.all(short >= -1e-6) and np.all(short <= b["bound"] + 1e-6)  # ... always within the bound


def synthetic_plan(T, V):
    return fidelity.Plan(lm=None, reference=None, docs=[list(range(T))], windows=[([0], list(range(T)))], window=T,
                         prefix_token=0, vocab_size=V, tokens=T)


def test_a_128k_vocabulary_stores_small_and_the_bound_holds(tmp_path):
    rng = np.random.default_rng(0)
    T, V = 24, 128256
    p_logits = (rng.standard_normal((T, V)) * 3).astype(np.float32)
    p_logits[np.arange(T), rng.integers(0, V, T)] += 25  # peaked positions, long tails
    q_logits = p_logits + rng.standard_normal((T, V)).astype(np.float32) * 0.5
    targets = rng.integers(0, V, T)
    ref = fidelity.RefRows.from_logits(p_logits, targets)
    path = fidelity.save_reference(tmp_path / "ref.npz", [ref], synthetic_plan(T, V), "synthetic", top_k=64)
    assert path.stat().st_size / T < 64 * 8 + 64  # bytes per position, whatever the vocabulary
    exact = fidelity.compare(ref, q_logits, targets)
    approx = fidelity.compare(ref.top(64), q_logits, targets)
    short = exact["kld"] - approx["kld"]
    assert np.all(short >= -1e-9) and np.all(short <= approx["bound"] + 1e-9)


def test_the_bound_is_the_worst_case():
    """A reference whose rest mass sits, at the k-th probability each, on the tokens the model finds least likely
    reaches the bound: it is the supremum, not a guess."""
    V, k = 50, 5
    q = np.linspace(0, -12, V)  # model logits: token 0 most likely
    p_logp = np.full(V, -np.inf)
    p_logp[:k] = np.log([0.5, 0.2, 0.1, 0.06, 0.04])
    rest, c = 0.1, 0.04 - 1e-12  # rest tokens hold at most the k-th probability each (a hair less: no ties)
    m = int(rest / c)
    p_logp[V - m:] = math.log(c)  # on the least likely tokens for the model
    p_logp[V - m - 1] = math.log(rest - m * c)
    p = p_logp.astype(np.float64)
    ref = fidelity.RefRows(p[None], None, np.array([-np.inf]), np.zeros(1), p[None, :1][0], np.array([0]))
    exact = fidelity.compare(ref, q[None].astype(np.float32), [0])
    approx = fidelity.compare(ref.top(k), q[None].astype(np.float32), [0])
    assert exact["kld"][0] - approx["kld"][0] == pytest.approx(approx["bound"][0], rel=1e-6)


# --- command line ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_file(text, tmp_path_factory):
    f = tmp_path_factory.mktemp("text") / "demo.txt"
    f.write_text(text)
    return f


def test_cli_json_and_thresholds(text_file, tmp_path, capsys):
    args = ["fidelity", "--model", "demo", "--reference", str(demo.checkpoint_dir()), "--text", str(text_file),
            "--max-tokens", "300", "--json", "--backend", "mil"]
    assert main([*args, "--output-dir", str(tmp_path), "--save-reference", str(tmp_path / "ref.npz")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert REPORT_KEYS <= set(doc) and doc["tokens"] == 300 and doc["failed"] == []
    assert json.loads((tmp_path / "fidelity.json").read_text())["mean_kld"] == doc["mean_kld"]
    with np.load(tmp_path / "fidelity_positions.npz") as z:
        assert len(z["kld"]) == 300
    # the stored reference needs no checkpoint and no text; thresholds give exit 1
    stored = ["fidelity", "--model", "demo", "--reference", str(tmp_path / "ref.npz"), "--backend", "mil"]
    assert main([*stored, "--min-top1", "0.99", "--max-kld", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "top-1 agreement" in out and "stored reference" in out and ">= 0.99" in out
    assert main([*stored, "--max-kld", "1e-12", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["failed"] == ["mean_kld"]


def _pickled(path):
    np.savez(path, format=np.array(["x", None], dtype=object))
    return path


@pytest.mark.parametrize("make, extra, message", [
    (lambda d: d / "none", [], "no such reference"),
    (lambda d: demo.checkpoint_dir(), [], "no text to score: pass --text FILE"),
    (lambda d: demo.checkpoint_dir(), ["--text", "/nonexistent.txt"], "no such text file"),
    (lambda d: _pickled(d / "p.npz"), [], "not a usable fidelity reference (Object arrays cannot be loaded"),
    (lambda d: (d / "t.npz").write_bytes(b"PK\x03\x04junk") and d / "t.npz", [], "not a usable fidelity reference"),
    (lambda d: d, [], "not a Hugging Face checkpoint directory (no config.json)"),
])
def test_cli_bad_input_is_one_line_and_exit_2(make, extra, message, tmp_path, capsys):
    ref = make(tmp_path)
    assert main(["fidelity", "--model", "demo", "--reference", str(ref), "--backend", "mil", *extra]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ane-eval: error:")]
    assert len(err) == 1 and message in err[0], err


def test_source_runs_are_cached(tmp_path):
    """The suite's source rows: lm-eval's HFLM behind CachingLM; a rerun makes no model call."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from ane_eval import runner

    ref = fidelity.load_reference(demo.checkpoint_dir())
    calls = []
    ref.model.register_forward_hook(lambda *a: calls.append(1))
    lm = HFLM(pretrained=ref.model, tokenizer=AutoTokenizer.from_pretrained(demo.checkpoint_dir()), batch_size=1,
              max_length=256)
    tm = runner.task_manager()
    first = runner.evaluate(lm, ["demo_boolq"], tm, limit=5, use_cache=str(tmp_path / "cache"))
    assert len(calls) > 0
    calls.clear()
    again = runner.evaluate(lm, ["demo_boolq"], tm, limit=5, use_cache=str(tmp_path / "cache"))
    assert calls == [] and again["results"]["demo_boolq"]["acc,none"] == first["results"]["demo_boolq"]["acc,none"]


# --- the suite -------------------------------------------------------------------------------------------------------
def test_suite_with_a_checkpoint_reference(tmp_path):
    from tests.test_suite import suite

    proc = suite("--reference", demo.checkpoint_dir(), "-k", "fidelity or (demo_boolq and not long) or demo_wikitext",
                 "--limit", 8, "--output-dir", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "3 passed" in proc.stdout
    assert re.search(r"fidelity +mean_kld +\S+ ± \S+ +- +- +<= 0.001 ", proc.stdout)
    assert re.search(r"demo_boolq +acc,none +1.0000 ± 0.0000 +1.0000 +\+0.0000 ", proc.stdout)
    header = next(ln for ln in proc.stdout.splitlines() if ln.startswith("task "))
    assert "source" in header and "Δ source" in header
    assert "word_perplexity: paired over 8 documents, log-likelihood converted minus source" in proc.stdout
    assert json.loads((tmp_path / "fidelity.json").read_text())["tokens"] == 656
    assert list((tmp_path / "source-cache").glob("checkpoint-*_rank0.db"))


def test_suite_with_a_stored_reference_and_a_broken_threshold(live, tmp_path):
    from tests.test_suite import suite

    s = tmp_path / "suite.yaml"
    s.write_text("tasks: [demo_boolq]\nfidelity:\n  thresholds: {mean_kld: {max: 1.0e-9}, top1_agreement: 0.9}\n")
    proc = suite("--reference", live["fp16"][1], "--suite", s, "-k", "fidelity", "--output-dir", tmp_path / "out")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "fidelity did not pass" in proc.stdout and "FAIL threshold" in proc.stdout
    assert "stored reference" in proc.stdout and "Traceback" not in proc.stdout
