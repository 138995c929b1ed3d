"""gate: perplexity-type metrics get a relative tolerance and, with samples on both sides, the paired per-document
test of the log-likelihood difference; accuracies keep max(tolerance, z * combined stderr); source annotations."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ane_eval import gate


def rolling_results(lls, words, task="wiki"):
    """An lm-eval results dict and samples of a rolling task, shaped as lm-eval 0.4.13 logs them: per document
    (loglikelihood, words) for word_perplexity, (loglikelihood, bytes) for byte_perplexity and bits_per_byte."""
    bytes_ = [5 * w for w in words]
    L, W, B = sum(lls), sum(words), sum(bytes_)
    results = {"results": {task: {"word_perplexity,none": math.exp(-L / W), "word_perplexity_stderr,none": "N/A",
                                  "byte_perplexity,none": math.exp(-L / B), "byte_perplexity_stderr,none": "N/A",
                                  "bits_per_byte,none": -L / B / math.log(2), "bits_per_byte_stderr,none": "N/A"}},
               "versions": {task: 1}, "n-shot": {task: 0},
               "higher_is_better": {task: {"word_perplexity": False, "byte_perplexity": False, "bits_per_byte": False}}}
    samples = [{"doc_id": i, "word_perplexity": (ll, w), "byte_perplexity": [ll, b], "bits_per_byte": [ll, b]}
               for i, (ll, w, b) in enumerate(zip(lls, words, bytes_))]
    return results, samples


def record(lls, words, samples=True):
    results, s = rolling_results(lls, words)
    return gate.task_record(results, "wiki", samples=s if samples else None)


def row(rows, metric="word_perplexity,none"):
    return next(r for r in rows if r.metric == metric)


def test_relative_tolerance_without_samples():
    rng = np.random.default_rng(0)
    words = rng.integers(50, 150, 40).tolist()
    base_ll = [-6.66 * w for w in words]  # word perplexity ~ 780
    before = record(base_ll, words, samples=False)
    worse = record([ll * 1.0093 for ll in base_ll], words, samples=False)  # the 785 -> 834 kind of rise
    r = row(gate.evaluate_gate("wiki", worse, baseline=before))
    assert r.delta / r.baseline > 0.05 and r.verdict == "FAIL regression"
    assert r.allowed == pytest.approx(0.01 * r.baseline) and "no per-document samples" in r.notes[0]
    assert row(gate.evaluate_gate("wiki", worse, baseline=before, relative_tolerance=0.1)).verdict == "pass"
    slightly = record([ll * 1.0005 for ll in base_ll], words, samples=False)  # +0.3%
    assert row(gate.evaluate_gate("wiki", slightly, baseline=before)).verdict == "pass"


def test_paired_test_separates_noise_from_a_shift():
    rng = np.random.default_rng(1)
    words = rng.integers(50, 150, 40).tolist()
    base_ll = [-2.0 * w + rng.normal(0, 5) for w in words]
    before = record(base_ll, words)
    # documents move a lot in both directions, the aggregate rises ~2%: not significant
    noisy = [ll + rng.normal(-0.4, 8) for ll in base_ll]
    r = row(gate.evaluate_gate("wiki", record(noisy, words), baseline=before))
    assert r.delta / r.baseline > 0.01 and r.verdict == "pass" and abs(r.z) < 1.96
    assert r.allowed > 0.01 * r.baseline and "paired over 40 documents" in r.notes[0]
    # every document a little worse (ll -0.04 a word: +4% perplexity, +2% bits per byte): significant
    shifted = [ll - 0.04 * w for ll, w in zip(base_ll, words)]
    r = row(gate.evaluate_gate("wiki", record(shifted, words), baseline=before))
    assert r.delta / r.baseline > 0.01 and r.verdict == "FAIL regression" and r.z > 1.96
    # the same numbers in bits per byte (units: bytes, linear in the log-likelihood)
    b = row(gate.evaluate_gate("wiki", record(shifted, words), baseline=before), "bits_per_byte,none")
    assert b.verdict == "FAIL regression" and b.z > 1.96
    # improvements never fail
    better = [ll + 0.02 * w for ll, w in zip(base_ll, words)]
    assert all(not r.failed for r in gate.evaluate_gate("wiki", record(better, words), baseline=before))


def test_paired_statistic_is_the_ratio_estimator():
    d = np.array([1.0, -2.0, 0.5, 3.0])
    u = np.array([10.0, 20.0, 5.0, 30.0])
    before = {"loglikelihoods": {"word_perplexity": {str(i): [-10.0, float(w)] for i, w in enumerate(u)}}}
    now = {"loglikelihoods": {"word_perplexity": {str(i): [-10.0 + x, float(w)] for i, (x, w) in
                                                  enumerate(zip(d, u))}}}
    p = gate.paired_loglikelihoods(now, before, "word_perplexity")
    r = d.sum() / u.sum()
    assert p.n == 4 and p.r == pytest.approx(r)
    assert p.se == pytest.approx(math.sqrt(4 / 3 * ((d - r * u) ** 2).sum()) / u.sum())


def test_accuracies_keep_the_stderr_rule():
    def acc(v, se):
        return {"version": 1, "n-shot": 0, "limit": None, "model": {}, "higher_is_better": {"acc": True},
                "metrics": {"acc,none": {"value": v, "stderr": se}}}
    r = gate.evaluate_gate("t", acc(0.80, 0.02), baseline=acc(0.90, 0.02), relative_tolerance=0.5)[0]
    assert r.allowed == pytest.approx(max(0.01, 1.96 * math.sqrt(2) * 0.02)) and r.verdict == "FAIL regression"


def test_against_source_shows_value_delta_and_flips():
    def acc_record(correct):
        return {"metrics": {"acc,none": {"value": sum(correct) / len(correct), "stderr": 0.1}},
                "items": {str(i): {"acc": float(c)} for i, c in enumerate(correct)}}
    now, source = acc_record([1, 0, 1, 1]), acc_record([1, 1, 0, 0])
    rows = gate.evaluate_gate("t", {**now, "version": 1, "n-shot": 0, "limit": None, "model": {}})
    gate.against_source(rows, now, source)
    assert rows[0].source == 0.5 and rows[0].source_delta == 0.25 and rows[0].verdict == "pass"
    assert rows[0].notes == ["acc: 1 right in the source, wrong after conversion (docs 1); "
                             "2 wrong in the source, right after conversion (docs 2, 3)"]
    table = gate.format_table(rows)
    assert "source" in table.splitlines()[0] and "+0.2500" in table
    assert "source" not in gate.format_table(gate.evaluate_gate("t", {**now, "version": 1, "n-shot": 0,
                                                                      "limit": None, "model": {}})).splitlines()[0]
