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
