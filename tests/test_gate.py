"""The regression gate on synthetic records: every verdict just inside and just outside its bound, in both metric
directions, and every reason a baseline is refused. Pure Python, milliseconds: the tests mutation runs lean on."""
from __future__ import annotations

import json
import math

import pytest

from ane_eval import gate

EPS = 1e-6
FINGERPRINT = "0123456789abcdef" * 4


def record(metrics: dict, *, version=1.0, n_shot=0, limit=40, fingerprint=FINGERPRINT, name="demo",
           higher_is_better=None, items=None) -> dict:
    """A task record as gate.task_record writes it; metrics = {"acc,none": (value, stderr)}."""
    r = {"version": version, "n-shot": n_shot, "limit": limit,
         "model": {"name": name, "fingerprint": fingerprint},
         "higher_is_better": higher_is_better if higher_is_better is not None else {},
         "metrics": {k: {"value": v, "stderr": se} for k, (v, se) in metrics.items()}, "task_hash": None}
    if items is not None:
        r["items"] = items
    return r


def verdict(now, base, metric, **kw):
    rows = gate.evaluate_gate("t", now, None, base, **kw)
    (row,) = [r for r in rows if r.metric == metric]
    return row


# --- the allowed fall: max(tolerance, z * sqrt(se_base² + se_now²)) ----------------------------------------------
@pytest.mark.parametrize("se_base, se_now, tol, z", [
    (0.03, 0.04, 0.01, 1.96),   # the stderr term dominates: allowed 1.96 * 0.05 = 0.098
    (0.0, 0.0, 0.01, 1.96),     # no stderr: the tolerance floor
    (None, None, 0.02, 1.96),   # unknown stderr counts as 0
    (0.003, 0.004, 0.05, 1.96),  # tolerance above z*se (0.0098)
    (0.03, 0.04, 0.01, 3.0),    # z is the suite's, not a constant: 0.15
])
@pytest.mark.parametrize("metric, higher", [("acc,none", True), ("word_perplexity,none", False),
                                            ("bits_per_byte,none", False), ("exact_match,strict", True)])
def test_allowed_fall_just_inside_and_outside(se_base, se_now, tol, z, metric, higher):
    # accuracies: max(tolerance, z * combined se); perplexity-type metrics (no stderr from lm-eval, no samples
    # here): relative_tolerance x baseline (tests/test_gate_perplexity.py covers their paired per-document test)
    if gate.is_perplexity(metric):
        allowed, kw = tol, dict(relative_tolerance=tol / 2.0, z=z)
    else:
        allowed, kw = max(tol, z * math.sqrt((se_base or 0) ** 2 + (se_now or 0) ** 2)), dict(tolerance=tol, z=z)
    base = record({metric: (2.0, se_base)})
    worse = -1 if higher else 1
    for fall, fails in ((allowed - EPS, False), (allowed + EPS, True)):
        row = verdict(record({metric: (2.0 + worse * fall, se_now)}), base, metric, **kw)
        assert row.allowed == pytest.approx(allowed, abs=1e-12)
        assert row.failed is fails, (fall, row)
        assert row.verdict == ("FAIL regression" if fails else "pass")
    # a move of the same size the other way is an improvement, never a regression
    assert not verdict(record({metric: (2.0 - worse * 10 * allowed, se_now)}), base, metric, **kw).failed


def test_row_statistics():
    row = verdict(record({"acc,none": (0.80, 0.04)}), record({"acc,none": (0.90, 0.03)}), "acc,none")
    assert row.baseline == 0.90 and row.baseline_stderr == 0.03 and row.stderr == 0.04
    assert row.delta == pytest.approx(-0.10) and row.combined_se == pytest.approx(0.05)
    assert row.z == pytest.approx(-2.0) and row.allowed == pytest.approx(0.098)
    assert row.verdict == "FAIL regression"
    row = verdict(record({"acc,none": (0.9, 0.0)}), record({"acc,none": (0.9, 0.0)}), "acc,none")
    assert row.z is None and row.combined_se == 0.0 and row.allowed == gate.DEFAULT_TOLERANCE


def test_direction_from_the_record_overrides_the_name():
    """lm-eval's higher_is_better wins over the perplexity-suffix guess, both ways."""
    base = {"perplexity,none": (5.0, 0.0), "acc,none": (0.5, 0.0)}
    now = {"perplexity,none": (4.0, 0.0), "acc,none": (0.6, 0.0)}
    by_name = gate.evaluate_gate("t", record(now), None, record(base))
    assert [r.failed for r in by_name] == [False, False]  # perplexity fell (good), acc rose (good)
    flipped = {"perplexity": True, "acc": False}
    rows = gate.evaluate_gate("t", record(now, higher_is_better=flipped), None, record(base))
    assert [r.failed for r in rows] == [True, True]


def test_per_metric_tolerance():
    base, now = record({"acc,none": (0.9, 0.0), "f1,none": (0.9, 0.0)}), record({"acc,none": (0.87, 0.0),
                                                                                  "f1,none": (0.87, 0.0)})
    rows = gate.evaluate_gate("t", now, None, base, tolerance={"acc": 0.05})
    assert [(r.allowed, r.failed) for r in rows] == [(0.05, False), (gate.DEFAULT_TOLERANCE, True)]
    rows = gate.evaluate_gate("t", now, None, base, tolerance={"acc,none": 0.02})
    assert rows[0].allowed == 0.02 and rows[0].failed


def test_metric_missing_from_the_baseline_is_not_compared():
    row = verdict(record({"acc,none": (0.1, 0.0)}), record({"f1,none": (0.9, 0.0)}), "acc,none")
    assert row.baseline is None and row.allowed is None and not row.failed


# --- thresholds ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric, threshold, bound, is_min", [
    ("acc,none", 0.6, 0.6, True),                    # a number: a floor for higher-is-better
    ("word_perplexity,none", 3.0, 3.0, False),       # a number: a ceiling for lower-is-better
    ("acc,none", {"min": 0.6}, 0.6, True),
    ("acc,none", {"max": 0.6}, 0.6, False),
    ("word_perplexity,none", {"max": 2.5}, 2.5, False),
    ("word_perplexity,none", {"min": 1.5}, 1.5, True),
])
def test_threshold_at_and_just_past_the_bound(metric, threshold, bound, is_min):
    name = metric.split(",")[0]
    past = bound - EPS if is_min else bound + EPS
    for value, fails in ((bound, False), (past, True)):
        for key in (name, metric):  # thresholds may name the metric with or without its filter
            (row,) = gate.evaluate_gate("t", record({metric: (value, 0.01)}), {key: threshold})
            assert row.failed is fails and row.threshold == f"{'>=' if is_min else '<='} {bound:g}"
            assert row.verdict == ("FAIL threshold" if fails else "pass")


def test_threshold_and_regression_together():
    (row,) = gate.evaluate_gate("t", record({"acc,none": (0.5, 0.0)}), {"acc": 0.6}, record({"acc,none": (0.9, 0.0)}))
    assert row.verdict == "FAIL threshold + regression"


# --- refusals -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, other, message", [
    ("version", 2.0, "task version 1.0 in the baseline, 2.0 now"),
    ("n_shot", 5, "few-shot count 0 in the baseline, 5 now"),
    ("limit", 30, "limit 40 in the baseline, 30 now"),
    ("limit", None, "limit 40 in the baseline, None now"),
    ("fingerprint", "f" * 64, "model files differ (baseline demo 0123456789ab, now demo ffffffffffff)"),
])
def test_each_refusal_reason(field, other, message):
    base = record({"acc,none": (0.9, 0.01)})
    now = record({"acc,none": (0.9, 0.01)}, **{field: other})
    with pytest.raises(gate.GateError) as e:
        gate.evaluate_gate("t", now, None, base)
    assert str(e.value) == f"t: refusing to compare with a baseline made differently: {message}"
    if field == "fingerprint":  # `compare` is for comparing different model files
        assert not gate.compare({"t": base}, {"t": now})[0].failed
        assert not gate.evaluate_gate("t", now, None, base, check_model=False)[0].failed
    else:
        with pytest.raises(gate.GateError, match=message.split(" in ")[0]):
            gate.compare({"t": base}, {"t": now})


def test_all_reasons_in_one_error():
    base = record({"acc,none": (0.9, 0.01)})
    now = record({"acc,none": (0.9, 0.01)}, version=2.0, n_shot=5, limit=None, fingerprint="f" * 64)
    with pytest.raises(gate.GateError) as e:
        gate.evaluate_gate("t", now, None, base)
    assert str(e.value) == ("t: refusing to compare with a baseline made differently: task version 1.0 in the "
                            "baseline, 2.0 now; few-shot count 0 in the baseline, 5 now; limit 40 in the baseline, "
                            "None now; model files differ (baseline demo 0123456789ab, now demo ffffffffffff)")


def test_model_without_fingerprint_is_compared():
    """A results file from lm-eval itself records no fingerprint: nothing to refuse on."""
    base = record({"acc,none": (0.9, 0.01)}, fingerprint=None)
    assert not gate.evaluate_gate("t", record({"acc,none": (0.9, 0.01)}), None, base)[0].failed


def test_compare_needs_a_shared_task():
    with pytest.raises(gate.GateError, match=r"no task in common \(A has \['a'\], B has \['b'\]\)"):
        gate.compare({"a": record({})}, {"b": record({})})


# --- per-document flips -------------------------------------------------------------------------------------------
def test_flips_name_documents_in_numeric_order():
    before = {str(d): {"acc": 1.0} for d in range(12)} | {"20": {"acc": 0.0}, "3x": {"f1": 1.0}}
    now = {str(d): {"acc": 0.0} for d in range(12)} | {"20": {"acc": 1.0}, "3x": {"f1": 0.0}}
    lost, gained = gate.flips(now, before, "acc")
    assert lost == [str(d) for d in range(12)] and gained == ["20"]
    base = record({"acc,none": (1.0, 0.0)}, items=before)
    row = verdict(record({"acc,none": (0.1, 0.0)}, items=now), base, "acc,none")
    assert row.notes == ["acc: 12 right before, wrong now (docs 0, 1, 2, 3, 4, 5, 6, 7, 8, 9…); "
                         "1 wrong before, right now (docs 20)"]
    assert verdict(record({"acc,none": (1.0, 0.0)}, items=before), base, "acc,none").notes == []


def test_item_scores_keep_binary_metrics_only():
    samples = [{"doc_id": 0, "acc": 1, "acc_norm": 0.0, "f1": 0.5, "target": "x", "filtered": True},
               {"doc_id": 1, "perplexity": 3.2}]
    assert gate.item_scores(samples) == {"0": {"acc": 1.0, "acc_norm": 0.0}}


# --- records from lm-eval results ---------------------------------------------------------------------------------
def test_task_record_from_lm_eval_results():
    results = {"results": {"t": {"alias": "t", "acc,none": 0.75, "acc_stderr,none": 0.05, "acc_norm,none": "N/A",
                                 "word_perplexity,none": 2.1, "word_perplexity_stderr,none": "N/A"}},
               "versions": {"t": 2.0}, "n-shot": {"t": 3}, "higher_is_better": {"t": {"acc": True}},
               "task_hashes": {"t": "abc"}}
    r = gate.task_record(results, "t", limit=40, model={"fingerprint": "f"}, samples=[{"doc_id": 7, "acc": 1}])
    assert r["metrics"] == {"acc,none": {"value": 0.75, "stderr": 0.05},
                            "word_perplexity,none": {"value": 2.1, "stderr": None}}
    assert (r["version"], r["n-shot"], r["limit"], r["task_hash"]) == (2.0, 3, 40, "abc")
    assert r["items"] == {"7": {"acc": 1.0}} and r["model"] == {"fingerprint": "f"}
    assert "items" not in gate.task_record(results, "t")


def test_baseline_files(tmp_path):
    path = gate.write_baseline(tmp_path / "sub" / "baseline.json", {"t": record({"acc,none": (0.9, 0.0)})}, {"name": "m"})
    doc = gate.load_baseline(path)
    assert doc["format"] == gate.BASELINE_FORMAT and doc["tasks"]["t"]["limit"] == 40
    assert gate.load_records(path) == (doc["tasks"], {"name": "m"})
    assert gate.load_records(tmp_path / "sub") == (doc["tasks"], {"name": "m"})
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other", "tasks": {}}))
    with pytest.raises(gate.GateError, match="not an ane-eval baseline"):
        gate.load_baseline(tmp_path / "bad.json")
    with pytest.raises(gate.GateError, match="no such baseline file; create one with --update-baseline"):
        gate.load_baseline(tmp_path / "missing.json")


def test_table_shows_the_numbers():
    rows = gate.evaluate_gate("t", record({"acc,none": (0.85, 0.0465)}), {"acc": 0.5},
                              record({"acc,none": (1.0, 0.0)}))
    text = gate.format_table(rows)
    assert "0.8500 ± 0.0465" in text and ">= 0.5" in text and "-0.1500" in text and "-3.23" in text
    assert "0.0911" in text and "FAIL regression" in text
    md = gate.format_table(rows, markdown=True)
    assert md.splitlines()[0].startswith("| task | metric |") and "| FAIL regression |" in md


def test_compare_every_shared_task_with_the_given_tolerance_and_z():
    a = {"t1": record({"acc,none": (0.9, 0.0)}), "t2": record({"acc,none": (0.9, 0.0)}), "only_a": record({})}
    b = {"t1": record({"acc,none": (0.88, 0.0)}), "t2": record({"acc,none": (0.9, 0.0)}, fingerprint="f" * 64)}
    rows = gate.compare(a, b, tolerance=0.03)
    assert [(r.task, r.allowed, r.failed) for r in rows] == [("t1", 0.03, False), ("t2", 0.03, False)]
    assert gate.compare(a, b, tolerance=0.01)[0].failed
    a_se = {"t1": record({"acc,none": (0.9, 0.03)})}
    b_se = {"t1": record({"acc,none": (0.8, 0.04)})}
    assert gate.compare(a_se, b_se, tolerance=0.0, z=3.0)[0].allowed == pytest.approx(0.15)


def test_flips_skip_documents_missing_on_one_side():
    before = {"0": {"f1": 1.0}, "1": {"acc": 1.0}, "2": {"acc": 1.0}, "7": {"acc": 0.0}}
    now = {"0": {"acc": 0.0}, "1": {"acc": 0.0}, "9": {"acc": 0.0}, "7": {"acc": 1.0}}
    assert gate.flips(now, before, "acc") == (["1"], ["7"])


def test_non_finite_values_are_not_metrics():
    results = {"results": {"t": {"acc,none": float("inf"), "f1,none": float("nan"), "em,none": 0.5}},
               "versions": {"t": 1}, "higher_is_better": {"t": {"em": True}}}
    r = gate.task_record(results, "t")
    assert list(r["metrics"]) == ["em,none"] and r["higher_is_better"] == {"em": True}


def test_unreadable_baseline_names_the_file(tmp_path):
    p = tmp_path / "b.json"
    p.write_text("{not json")
    with pytest.raises(gate.GateError, match=rf"{p}: not a JSON baseline file \(Expecting"):
        gate.load_baseline(p)


def test_records_without_model_or_direction_keys():
    """Records from lm-eval results files of other tools may lack `model` and `higher_is_better`."""
    base, now = record({"word_perplexity,none": (2.0, 0.0)}), record({"word_perplexity,none": (2.5, 0.0)})
    for r in (base, now):
        del r["model"], r["higher_is_better"]
    (row,) = gate.evaluate_gate("t", now, None, base)
    assert row.failed  # perplexity rose: lower is better by name
    assert gate.compare({"t": base}, {"t": now})[0].failed


# --- mutation-testing survivors (issue 14): boundaries, text of the notes and tables, lm-eval result files -------
def test_a_fall_exactly_at_the_allowed_bound_passes():
    """"Regresses when it falls by MORE than the allowed fall": equality passes (0.25 and 0.5 are exact floats)."""
    base = record({"acc,none": (0.75, 0.0), "word_perplexity,none": (2.0, 0.0)})
    now = record({"acc,none": (0.5, 0.0), "word_perplexity,none": (2.5, 0.0)})
    rows = gate.evaluate_gate("t", now, {"acc": 0.1}, base, tolerance=0.25, relative_tolerance=0.25)
    assert [(r.metric, r.allowed, r.verdict) for r in rows] == [("acc,none", 0.25, "pass"),
                                                                ("word_perplexity,none", 0.5, "pass")]
    rows = gate.evaluate_gate("t", now, {"acc": 0.6}, base, tolerance=0.25)  # a threshold failure stays alone
    assert rows[0].verdict == "FAIL threshold"


def test_filter_names_may_contain_commas():
    """lm-eval's keys are f"{metric},{filter}"; only the first comma separates them."""
    base = record({"word_perplexity,my,filter": (2.0, None), "acc,a,b": (0.9, 0.0)})
    now = record({"word_perplexity,my,filter": (2.1, None), "acc,a,b": (0.5, 0.0)}, items={"0": {"acc": 0.0}})
    assert gate.is_perplexity("word_perplexity,my,filter") and not gate.is_perplexity("acc,word_perplexity,x")
    ppl, acc = gate.evaluate_gate("t", now, {"word_perplexity": 2.05, "acc": 0.6}, base)
    assert ppl.threshold == "<= 2.05" and ppl.verdict == "FAIL threshold + regression"  # lower is better by name
    assert ppl.allowed == pytest.approx(0.02) and ppl.notes[0].startswith("word_perplexity: +5.00% relative")
    assert acc.threshold == ">= 0.6" and acc.verdict == "FAIL threshold + regression"
    results = {"results": {"t": {"acc,a,b": 0.5, "acc_stderr,a,b": 0.1}}, "versions": {"t": 1}}
    assert gate.task_record(results, "t")["metrics"] == {"acc,a,b": {"value": 0.5, "stderr": 0.1}}
    gate.against_source([acc], now, {"metrics": {"acc,a,b": {"value": 0.7}}, "items": {"0": {"acc": 1.0}}})
    assert acc.source == 0.7 and acc.notes == ["acc: 1 right in the source, wrong after conversion (docs 0); "
                                               "0 wrong in the source, right after conversion"]


def test_relative_tolerance_per_metric():
    base, now = record({"word_perplexity,none": (2.0, None)}), record({"word_perplexity,none": (2.08, None)})
    for tol in ({"word_perplexity,none": 0.05}, {"word_perplexity": 0.05}):
        (row,) = gate.evaluate_gate("t", now, None, base, relative_tolerance=tol)
        assert row.allowed == pytest.approx(0.1) and not row.failed
        assert row.notes == ["word_perplexity: +4.00% relative (allowed rise 5.00%); no per-document samples for a "
                             "paired test"]
    (row,) = gate.evaluate_gate("t", now, None, base, relative_tolerance={"other": 0.5})
    assert row.allowed == pytest.approx(2.0 * gate.DEFAULT_RELATIVE_TOLERANCE) and row.failed
    (row,) = gate.compare({"t": base}, {"t": now}, relative_tolerance=0.05)
    assert row.allowed == pytest.approx(0.1) and not row.failed


def ll_record(metric, pairs, value, items=None):
    """A record with per-document (log-likelihood, units) of a perplexity-type metric."""
    r = record({f"{metric},none": (value, None)}, items=items)
    r["loglikelihoods"] = {metric: {str(k): list(v) for k, v in pairs.items()}}
    return r


def test_paired_test_needs_shared_documents_on_both_sides():
    a = {"loglikelihoods": {"word_perplexity": {"0": [-10.0, 5.0], "1": [-12.0, 6.0]}}}
    assert gate.paired_loglikelihoods(a, {}, "word_perplexity") is None
    assert gate.paired_loglikelihoods({}, a, "word_perplexity") is None
    other = {"loglikelihoods": {"word_perplexity": {"7": [-10.0, 5.0]}}}
    assert gate.paired_loglikelihoods(other, a, "word_perplexity") is None
    # only the shared documents count; one document: a ratio but no standard error
    now = {"loglikelihoods": {"word_perplexity": {"1": [-11.0, 6.0], "9": [-1.0, 1.0]}}}
    p = gate.paired_loglikelihoods(now, a, "word_perplexity")
    assert (p.n, p.r, p.se) == (1, pytest.approx(1 / 6), None)
    # units between 0 and 1 are units (loglikelihood tasks log 1 per document; a byte count is never below 1)
    half = {"loglikelihoods": {"word_perplexity": {"0": [-1.0, 0.25], "1": [-2.0, 0.25]}}}
    half_now = {"loglikelihoods": {"word_perplexity": {"0": [-0.5, 0.25], "1": [-1.0, 0.25]}}}
    assert gate.paired_loglikelihoods(half_now, half, "word_perplexity").r == pytest.approx(1.5 / 0.5)
    zero = {"loglikelihoods": {"word_perplexity": {"0": [-1.0, 0.0]}}}
    assert gate.paired_loglikelihoods(zero, zero, "word_perplexity") is None


def test_one_paired_document_falls_back_to_the_relative_tolerance():
    base = ll_record("word_perplexity", {0: (-10.0, 5.0)}, 7.389)
    now = ll_record("word_perplexity", {0: (-10.5, 5.0)}, 8.166)
    (row,) = gate.evaluate_gate("t", now, None, base)
    assert row.allowed == pytest.approx(0.07389) and row.combined_se is None and row.z is None and row.failed
    assert row.notes == ["word_perplexity: +10.52% relative (allowed rise 1.00%); word_perplexity: paired over 1 "
                         "documents, log-likelihood now minus before: -0.1 per word"]


def test_bits_per_byte_band_is_linear_in_the_log_likelihood():
    """bits_per_byte = -sum ll / (bytes ln 2): its standard error is the paired one over ln 2, its band z of them."""
    pairs = {i: (-50.0 - i, 40.0 + i) for i in range(6)}
    moved = {i: (ll - 0.1 * u + (3.0 if i % 2 else -3.0), u) for i, (ll, u) in pairs.items()}
    base, now = ll_record("bits_per_byte", pairs, 1.8), ll_record("bits_per_byte", moved, 1.85)
    p = gate.paired_loglikelihoods(now, base, "bits_per_byte")
    (row,) = gate.evaluate_gate("t", now, None, base, z=2.5)
    assert row.combined_se == pytest.approx(p.se / math.log(2))
    assert 2.5 * p.se / math.log(2) > 0.018  # the band, not the 1% floor
    assert row.allowed == pytest.approx(2.5 * p.se / math.log(2))
    assert row.z == pytest.approx(0.05 / (p.se / math.log(2)))
    assert row.notes == [f"bits_per_byte: +2.78% relative (allowed rise {row.allowed / 1.8:.2%}); bits_per_byte: "
                         f"paired over 6 documents, log-likelihood now minus before: {p.r:+.4g} ± {p.se:.4g} per byte, "
                         f"z {p.r / p.se:+.2f}"]


def test_word_perplexity_band_and_note():
    pairs = {i: (-20.0 - i, 10.0) for i in range(4)}
    moved = {0: (-20.5, 10.0), 1: (-21.0, 10.0), 2: (-22.5, 10.0), 3: (-23.4, 10.0)}
    base, now = ll_record("word_perplexity", pairs, 8.0), ll_record("word_perplexity", moved, 8.4)
    p = gate.paired_loglikelihoods(now, base, "word_perplexity")
    (row,) = gate.evaluate_gate("t", now, None, base)
    assert row.combined_se == pytest.approx(8.0 * p.se) and row.z == pytest.approx(0.4 / (8.0 * p.se))
    assert row.allowed == pytest.approx(8.0 * math.expm1(1.96 * p.se))
    assert row.notes == [f"word_perplexity: +5.00% relative (allowed rise {row.allowed / 8.0:.2%}); word_perplexity: "
                         f"paired over 4 documents, log-likelihood now minus before: {p.r:+.4g} ± {p.se:.4g} per "
                         f"word, z {p.r / p.se:+.2f}"]


@pytest.mark.parametrize("metric, unit", [("word_perplexity", "word"), ("byte_perplexity", "byte"),
                                          ("bits_per_byte", "byte"), ("perplexity", "doc")])
def test_paired_note_text(metric, unit):
    assert gate.Paired(3, -0.25, 0.125).note(metric, "A", "B") == (
        f"{metric}: paired over 3 documents, log-likelihood B minus A: -0.25 ± 0.125 per {unit}, z -2.00")
    assert gate.Paired(1, 0.5, None).note(metric, "A", "B") == (
        f"{metric}: paired over 1 documents, log-likelihood B minus A: +0.5 per {unit}")
    assert gate.Paired(2, 0.5, 0.0).note(metric, "A", "B").endswith(f"+0.5 ± 0 per {unit}")


def test_against_source_for_perplexity_and_rows_without_a_source():
    pairs = {0: (-10.0, 5.0), 1: (-12.0, 6.0)}
    converted = ll_record("word_perplexity", {0: (-10.5, 5.0), 1: (-12.0, 6.0)}, 7.5)
    converted["metrics"] = {"acc,none": {"value": 0.5, "stderr": None}, **converted["metrics"]}
    source = ll_record("word_perplexity", pairs, 7.0)
    rows = gate.evaluate_gate("t", converted)
    rows[1].notes = ["earlier note"]
    gate.against_source(rows, converted, source)  # acc,none has no source value: skipped, the next row still done
    assert rows[0].source is None and rows[0].notes == []
    p = gate.paired_loglikelihoods(converted, source, "word_perplexity")
    assert rows[1].source == 7.0 and rows[1].source_delta == pytest.approx(0.5)
    assert rows[1].notes == ["earlier note", p.note("word_perplexity", "source", "converted")]
    assert rows[1].notes[1].startswith("word_perplexity: paired over 2 documents, log-likelihood converted minus "
                                       "source: -0.04545 ± ")
    plain = gate.evaluate_gate("t", converted)
    gate.against_source(plain, converted, {})  # a source without metrics annotates nothing
    assert [r.source for r in plain] == [None, None]
    no_pairs = gate.evaluate_gate("t", converted)
    gate.against_source(no_pairs, converted, {"metrics": source["metrics"]})  # no samples: no paired note
    assert no_pairs[1].source == 7.0 and no_pairs[1].notes == []


def test_doc_loglikelihoods_shapes():
    samples = [{"doc_id": 0, "perplexity": 2.5, "word_perplexity": [-3.0, "x"], "bits_per_byte": True},
               {"doc_id": 1, "word_perplexity": (-4.0, 2), "byte_perplexity": [-1.0, 2.0, 3.0], "acc": 1},
               {"doc_id": 2, "perplexity": "N/A", "word_perplexity": [-5.0, 3.0]}]
    assert gate.doc_loglikelihoods(samples) == {"perplexity": {"0": [2.5, 1.0]},
                                                "word_perplexity": {"1": [-4.0, 2.0], "2": [-5.0, 3.0]}}


def test_flip_notes_need_items_on_both_sides_and_list_at_most_ten():
    ten = {str(d): {"acc": 1.0} for d in range(10)}
    base = record({"acc,none": (1.0, 0.0)}, items=ten)
    lost_ten = record({"acc,none": (0.0, 0.0)}, items={d: {"acc": 0.0} for d in ten})
    assert verdict(lost_ten, base, "acc,none").notes == [
        "acc: 10 right before, wrong now (docs 0, 1, 2, 3, 4, 5, 6, 7, 8, 9); 0 wrong before, right now"]
    eleven = record({"acc,none": (1.0, 0.0)}, items={str(d): {"acc": 1.0} for d in range(11)})
    assert verdict(record({"acc,none": (0.0, 0.0)}, items={str(d): {"acc": 0.0} for d in range(11)}), eleven,
                   "acc,none").notes[0].startswith("acc: 11 right before, wrong now (docs 0, 1, 2, 3, 4, 5, 6, 7, 8, 9…)")
    no_items = record({"acc,none": (0.0, 0.0)})
    assert verdict(no_items, base, "acc,none").notes == []
    assert verdict(lost_ten, record({"acc,none": (1.0, 0.0)}), "acc,none").notes == []
    other = record({"acc,none": (0.0, 0.0)}, items={d: {"f1": 0.0} for d in ten})  # acc not per item now
    assert verdict(other, base, "acc,none").notes == []
    gained = record({"acc,none": (1.0, 0.0)}, items={"3": {"acc": 1.0}})
    assert verdict(gained, record({"acc,none": (0.0, 0.0)}, items={"3": {"acc": 0.0}}), "acc,none").notes == [
        "acc: 0 right before, wrong now; 1 wrong before, right now (docs 3)"]


def test_numbers_as_the_table_prints_them():
    assert [gate._num(v) for v in (None, 0, 2e-5, -4.9e-5, 5e-5, 0.5, 999.99994, 1000, 12345.67)] == [
        "-", "0.0000", "2.00e-05", "-4.90e-05", "0.0001", "0.5000", "999.9999", "1000.0", "12345.7"]
    assert gate._num(0.25, "+") == "+0.2500" and gate._num(3e-6, "+") == "+3.00e-06"
    assert gate.format_value(None, 0.1) == "-" and gate.format_value(0.5) == "0.5000"
    assert gate.format_value(0.5, 0.0) == "0.5000 ± 0.0000"


def _table_rows():
    base = record({"acc,none": (0.9, 0.03), "f1,none": (0.5, None)}, items={"0": {"acc": 1.0}})
    now = record({"acc,none": (0.8, 0.04), "f1,none": (0.5, None)}, items={"0": {"acc": 0.0}})
    return gate.evaluate_gate("t", now, {"acc": 0.85}, base)


def test_plain_table_text():
    assert gate.format_table(_table_rows()) == "\n".join([
        "task  metric    value ± stderr   threshold  baseline         delta    combined se  z      allowed fall  "
        "verdict                    ",
        "----  --------  ---------------  ---------  ---------------  -------  -----------  -----  ------------  "
        "---------------------------",
        "t     acc,none  0.8000 ± 0.0400  >= 0.85    0.9000 ± 0.0300  -0.1000  0.0500       -2.00  0.0980        "
        "FAIL threshold + regression",
        "t     f1,none   0.5000           -          0.5000           +0.0000  0.0000       -      0.0100        "
        "pass                       ",
        "acc: 1 right before, wrong now (docs 0); 0 wrong before, right now"])


def test_markdown_table_text_and_summary(tmp_path):
    rows = _table_rows()
    header = ("| task | metric | value ± stderr | threshold | baseline | delta | combined se | z | allowed fall | "
              "verdict |")
    table = "\n".join([
        header, "|---|---|---|---|---|---|---|---|---|---|",
        "| t | acc,none | 0.8000 ± 0.0400 | >= 0.85 | 0.9000 ± 0.0300 | -0.1000 | 0.0500 | -2.00 | 0.0980 | "
        "FAIL threshold + regression |",
        "| t | f1,none | 0.5000 | - | 0.5000 | +0.0000 | 0.0000 | - | 0.0100 | pass |",
        "", "- acc: 1 right before, wrong now (docs 0); 0 wrong before, right now"])
    assert gate.format_table(rows, markdown=True) == table
    assert gate.format_table(rows[1:], markdown=True) == "\n".join(table.splitlines()[:2] + [table.splitlines()[3]])
    model = {"name": "demo", "path": "/m", "fingerprint": FINGERPRINT, "files": 4}
    path = gate.write_summary(tmp_path / "a" / "b" / "summary.md", rows, model, "mil", ["/x/plot_one.png", "two.png"])
    assert path.read_text() == (f"# ane-eval summary: FAILED\n\nmodel: `demo` (/m), fingerprint `0123456789ab` (4 "
                                f"files), backend: mil\n\n{table}\n\n![plot_one](plot_one.png)\n\n![two](two.png)\n")
    path = gate.write_summary(tmp_path / "a" / "b" / "summary.md", rows[1:], {"name": "x"}, "coreml")
    assert path.read_text().startswith("# ane-eval summary: passed\n\nmodel: `x` (None), fingerprint `None` (? "
                                       "files), backend: coreml\n\n| task |")


def test_table_with_source_columns():
    rows = _table_rows()[1:]
    gate.against_source(rows, {}, {"metrics": {"f1,none": {"value": 0.4}}})
    lines = gate.format_table(rows, markdown=True).splitlines()
    assert lines[0].startswith("| task | metric | value ± stderr | source | Δ source | threshold |")
    assert lines[2] == "| t | f1,none | 0.5000 | 0.4000 | +0.1000 | - | 0.5000 | +0.0000 | 0.0000 | - | 0.0100 | pass |"


def test_baseline_file_text_and_nested_directories(tmp_path):
    records = {"t": record({"acc,none": (0.9, 0.0)})}
    path = gate.write_baseline(tmp_path / "a" / "b" / "baseline.json", records, {"name": "m"})
    assert path.read_text() == json.dumps({"format": gate.BASELINE_FORMAT, "model": {"name": "m"},
                                           "tasks": records}, indent=2) + "\n"
    gate.write_baseline(path, records, {"name": "m2"})  # overwriting in an existing directory
    assert gate.load_baseline(path)["model"] == {"name": "m2"}
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"format": gate.BASELINE_FORMAT, "tasks": records}))
    assert gate.load_records(bare) == (records, {})


def _lm_eval_output(d, stamp, tasks, limit=None, model_name="ane", samples=None):
    """An lm-eval output directory as lm-eval 0.4.13 writes it: results_<stamp>.json (a group row has no config)
    and samples_<task>_<stamp>.jsonl."""
    d.mkdir(parents=True, exist_ok=True)
    doc = {"results": {"grp": {"acc,none": 0.1}, **{t: {"acc,none": v, "acc_stderr,none": 0.05}
                                                    for t, v in tasks.items()}},
           "versions": {t: 1 for t in tasks}, "n-shot": {t: 0 for t in tasks},
           "configs": {t: {} for t in tasks}, "config": {"limit": limit}, "model_name": model_name}
    (d / f"results_{stamp}.json").write_text(json.dumps(doc))
    for task, lines in (samples or {}).items():
        (d / f"samples_{task}_{stamp}.jsonl").write_text("\n".join(json.dumps(s) for s in lines) + "\n\n")
    return d / f"results_{stamp}.json"


def test_records_from_lm_eval_output(tmp_path):
    out = tmp_path / "out"
    first = _lm_eval_output(out / "ane", "2024-01-01T00-00-00", {"a": 0.5, "b": 0.6}, limit=40,
                            samples={"a": [{"doc_id": 0, "acc": 1}, {"doc_id": 1, "acc": 0}]})
    records, model = gate.load_records(first)
    assert sorted(records) == ["a", "b"] and model == {"name": "ane", "path": str(first)}
    assert records["a"]["items"] == {"0": {"acc": 1.0}, "1": {"acc": 0.0}} and "items" not in records["b"]
    assert records["a"]["limit"] == 40 and records["a"]["metrics"]["acc,none"] == {"value": 0.5, "stderr": 0.05}
    assert records["a"]["model"] == model and records["a"]["version"] == 1
    # a directory: every results file found below it, later runs (by file name) override earlier ones
    _lm_eval_output(out / "ane" / "later", "2024-02-01T00-00-00", {"b": 0.9}, model_name="second")
    records, model = gate.load_records(out)
    assert {t: r["metrics"]["acc,none"]["value"] for t, r in records.items()} == {"a": 0.5, "b": 0.9}
    assert model["name"] == "second" and records["b"]["limit"] is None
    doc = json.loads(first.read_text())
    del doc["config"]
    first.write_text(json.dumps(doc))
    assert gate.load_records(first)[0]["a"]["limit"] is None


def test_unreadable_results_name_the_file(tmp_path):
    with pytest.raises(gate.GateError, match=rf"^{tmp_path / 'nope'}: no such results file or directory$"):
        gate.load_records(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(gate.GateError, match=r"empty: no baseline.json or lm-eval results_\*.json inside$"):
        gate.load_records(tmp_path / "empty")
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(gate.GateError, match=rf"^{bad}: not valid JSON \(Expecting"):
        gate.load_records(bad)
    for doc in ({"results": {}}, {"versions": {}}, {"results": [], "versions": {}}, [1, 2]):
        bad.write_text(json.dumps(doc))
        with pytest.raises(gate.GateError, match=rf"^{bad}: neither an ane-eval baseline nor an lm-eval results file$"):
            gate.load_records(bad)


def test_baseline_without_model_against_a_fingerprinted_run():
    base = record({"acc,none": (0.9, 0.0)})
    del base["model"]
    assert not gate.evaluate_gate("t", record({"acc,none": (0.9, 0.0)}), None, base)[0].failed
    results = {"results": {"t": {"acc,none": 0.5}}, "versions": {"t": 1}, "higher_is_better": {"u": {"acc": False}}}
    assert gate.task_record(results, "t")["higher_is_better"] == {}
