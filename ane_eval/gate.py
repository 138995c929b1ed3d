"""Thresholds, baselines and regression statistics over lm-eval results, shared by the pytest suite and the CLI.

A task's *record* is what a baseline keeps of a run: metric values and standard errors, the task version, the
few-shot count, the limit, the model files' fingerprint, and per-document correctness for item flips.
An accuracy-type metric regresses when it falls by more than max(tolerance, z * sqrt(se_base² + se_now²)) —
lm-eval's own comparison statistic, with a floor for metrics whose stderr is unknown. A perplexity-type metric
(lm-eval reports no stderr for them) regresses when it rises by more than max(relative_tolerance * baseline, the
noise band of the paired per-document test): where both sides have samples, the documents' log-likelihood
differences d_i (units u_i: words or bytes) give r = sum d / sum u with the ratio-estimator standard error
sqrt(n / (n - 1) * sum (d_i - r u_i)²) / sum u, and the band is z of those errors in the metric's units.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

BASELINE_FORMAT = "ane-eval-baseline/1"
DEFAULT_Z = 1.96
DEFAULT_TOLERANCE = 0.01
DEFAULT_RELATIVE_TOLERANCE = 0.01  # perplexity-type metrics: a 1% rise


class GateError(ValueError):
    """A comparison that must not be made (different task version, few-shot count, limit or model)."""


def _number(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def task_record(results: dict, task: str, *, limit=None, model: dict | None = None, samples=None) -> dict:
    """What a baseline keeps of one task's lm-eval results (and logged samples)."""
    res = results["results"][task]
    metrics = {}
    for key, value in res.items():
        if "," not in key or "_stderr," in key or _number(value) is None:
            continue
        name, filt = key.split(",", 1)
        metrics[key] = {"value": _number(value), "stderr": _number(res.get(f"{name}_stderr,{filt}"))}
    record = {
        "version": (results.get("versions") or {}).get(task),
        "n-shot": (results.get("n-shot") or {}).get(task),
        "limit": limit,
        "model": model or {},
        "higher_is_better": (results.get("higher_is_better") or {}).get(task, {}),
        "metrics": metrics,
        "task_hash": (results.get("task_hashes") or {}).get(task),
    }
    if samples:
        record["items"] = item_scores(samples)
        pairs = doc_loglikelihoods(samples)
        if pairs:
            record["loglikelihoods"] = pairs
    return record


def is_perplexity(metric: str) -> bool:
    return metric.split(",", 1)[0].endswith(("perplexity", "bits_per_byte"))


def doc_loglikelihoods(samples: list[dict]) -> dict:
    """metric -> doc_id -> [log-likelihood, units] for perplexity-type metrics: lm-eval's rolling tasks log
    (loglikelihood, words|bytes) per document; `perplexity` of loglikelihood tasks logs the bare value (1 unit)."""
    out: dict = {}
    for s in samples:
        for k, v in s.items():
            if not is_perplexity(k):
                continue
            if isinstance(v, (list, tuple)) and len(v) == 2 and all(_number(x) is not None for x in v):
                pair = [float(v[0]), float(v[1])]
            elif _number(v) is not None and not isinstance(v, bool):
                pair = [float(v), 1.0]
            else:
                continue
            out.setdefault(k, {})[str(s["doc_id"])] = pair
    return out


@dataclass
class Paired:
    """Paired per-document comparison of log-likelihoods: r = sum(ll_now - ll_before) / sum(units)."""
    n: int
    r: float
    se: float | None

    def note(self, metric: str, before: str, now: str) -> str:
        unit = {"word_perplexity": "word", "byte_perplexity": "byte", "bits_per_byte": "byte"}.get(metric, "doc")
        se = "" if self.se is None else f" ± {self.se:.4g}"
        z = "" if not self.se else f", z {self.r / self.se:+.2f}"
        return (f"{metric}: paired over {self.n} documents, log-likelihood {now} minus {before}: "
                f"{self.r:+.4g}{se} per {unit}{z}")


def paired_loglikelihoods(now: dict, before: dict, metric: str) -> Paired | None:
    a = (before.get("loglikelihoods") or {}).get(metric)
    b = (now.get("loglikelihoods") or {}).get(metric)
    if not a or not b:
        return None
    docs = sorted(set(a) & set(b))
    if not docs:
        return None
    d = [b[k][0] - a[k][0] for k in docs]
    u = [a[k][1] for k in docs]
    total = sum(u)
    if total <= 0:
        return None
    r = sum(d) / total
    n = len(docs)
    se = math.sqrt(n / (n - 1) * sum((di - r * ui) ** 2 for di, ui in zip(d, u))) / total if n > 1 else None
    return Paired(n, r, se)


def _metric_se(metric: str, base: float, se_r: float) -> float:
    """A standard error of the per-unit log-likelihood in the metric's units (delta method)."""
    return abs(base) * se_r if metric.endswith("perplexity") else se_r / math.log(2)


def item_scores(samples: list[dict]) -> dict:
    """doc_id -> {metric: 0/1} for per-document binary metrics (acc, acc_norm, exact_match, ...)."""
    items = {}
    for s in samples:
        scores = {k: float(v) for k, v in s.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("doc_id",) and v in (0, 1)}
        if scores:
            items[str(s["doc_id"])] = scores
    return items


@dataclass
class Row:
    task: str
    metric: str  # "acc,none"
    value: float
    stderr: float | None = None
    threshold: str = ""  # ">= 0.6" / "<= 30"
    baseline: float | None = None
    baseline_stderr: float | None = None
    delta: float | None = None
    combined_se: float | None = None  # sqrt(se_base² + se_now²)
    z: float | None = None  # delta / combined_se
    allowed: float | None = None  # the fall the gate tolerates
    verdict: str = "pass"
    notes: list = field(default_factory=list)
    source: float | None = None  # the source checkpoint's value (pytest evals --reference)
    source_delta: float | None = None

    @property
    def failed(self) -> bool:
        return self.verdict.startswith("FAIL")


def _direction(record: dict, metric: str) -> bool:
    name = metric.split(",", 1)[0]
    hib = record.get("higher_is_better", {})
    if name in hib:
        return bool(hib[name])
    return not name.endswith(("perplexity", "bits_per_byte"))


def check_compatible(now: dict, base: dict, task: str) -> None:
    problems = []
    for key, what in (("version", "task version"), ("n-shot", "few-shot count"), ("limit", "limit")):
        if now.get(key) != base.get(key):
            problems.append(f"{what} {base.get(key)!r} in the baseline, {now.get(key)!r} now")
    if now.get("model", {}).get("fingerprint") and base.get("model", {}).get("fingerprint") and \
            now["model"]["fingerprint"] != base["model"]["fingerprint"] and not base["model"].get("any_model"):
        problems.append(f"model files differ (baseline {base['model'].get('name')} "
                        f"{base['model']['fingerprint'][:12]}, now {now['model'].get('name')} "
                        f"{now['model']['fingerprint'][:12]})")
    if problems:
        raise GateError(f"{task}: refusing to compare with a baseline made differently: " + "; ".join(problems))


def _tolerance(tolerance, metric: str, name: str, default: float) -> float:
    return tolerance.get(metric, tolerance.get(name, default)) if isinstance(tolerance, dict) else tolerance


def evaluate_gate(task: str, record: dict, thresholds: dict | None = None, baseline: dict | None = None,
                  tolerance: float | dict = DEFAULT_TOLERANCE, z: float = DEFAULT_Z,
                  check_model: bool = True,
                  relative_tolerance: float | dict = DEFAULT_RELATIVE_TOLERANCE) -> list[Row]:
    """One row per metric: threshold verdict, then regression verdict against the baseline record."""
    thresholds = thresholds or {}
    if baseline is not None:
        base_copy = dict(baseline)
        if not check_model:
            base_copy["model"] = {**baseline.get("model", {}), "any_model": True}
        check_compatible(record, base_copy, task)
    rows = []
    for metric, m in record["metrics"].items():
        name = metric.split(",", 1)[0]
        row = Row(task, metric, m["value"], m.get("stderr"))
        higher = _direction(record, metric)
        limit = thresholds.get(metric, thresholds.get(name))
        if limit is not None:
            bound, is_min = (limit.get("min"), True) if isinstance(limit, dict) and "min" in limit else \
                (limit.get("max"), False) if isinstance(limit, dict) else (limit, higher)
            row.threshold = f"{'>=' if is_min else '<='} {bound:g}"
            if (is_min and m["value"] < bound) or (not is_min and m["value"] > bound):
                row.verdict = "FAIL threshold"
        if baseline is not None and metric in baseline["metrics"]:
            b = baseline["metrics"][metric]
            row.baseline, row.baseline_stderr = b["value"], b.get("stderr")
            row.delta = m["value"] - b["value"]
            if is_perplexity(metric):
                _perplexity_rule(row, name, record, baseline,
                                 _tolerance(relative_tolerance, metric, name, DEFAULT_RELATIVE_TOLERANCE), z)
            else:
                tol = _tolerance(tolerance, metric, name, DEFAULT_TOLERANCE)
                se = math.sqrt((m.get("stderr") or 0.0) ** 2 + (b.get("stderr") or 0.0) ** 2)
                row.combined_se = se
                row.z = row.delta / se if se > 0 else None
                row.allowed = max(tol, z * se)
            fall = -row.delta if higher else row.delta
            if fall > row.allowed and not row.failed:
                row.verdict = "FAIL regression"
            elif fall > row.allowed:
                row.verdict += " + regression"
            row.notes += _item_notes(record, baseline, name, "before", "now")
        rows.append(row)
    return rows


def _perplexity_rule(row: Row, name: str, record: dict, baseline: dict, rel_tol: float, z: float) -> None:
    """Lower is better; the fall allowed is max(rel_tol * baseline, z paired standard errors) in metric units."""
    base = row.baseline
    row.allowed = rel_tol * abs(base)
    paired = paired_loglikelihoods(record, baseline, name)
    if paired is not None and paired.se:
        row.combined_se = _metric_se(name, base, paired.se)
        row.z = row.delta / row.combined_se if row.combined_se > 0 else None
        band = abs(base) * math.expm1(z * paired.se) if name.endswith("perplexity") else z * paired.se / math.log(2)
        row.allowed = max(row.allowed, band)
    if base:
        row.notes.append(f"{name}: {row.delta / base:+.2%} relative (allowed rise {row.allowed / abs(base):.2%})"
                         + (f"; {paired.note(name, 'before', 'now')}" if paired else "; no per-document samples "
                            "for a paired test"))


def _item_notes(now: dict, before: dict, name: str, then: str, later: str) -> list[str]:
    """Per-document flips of a binary metric, as one note."""
    if not ("items" in now and "items" in before and name in _item_metrics(now)):
        return []
    lost, gained = flips(now["items"], before["items"], name)
    if not (lost or gained):
        return []

    def docs(ids):
        return f" (docs {', '.join(ids[:10])}{'…' if len(ids) > 10 else ''})" if ids else ""
    return [f"{name}: {len(lost)} right {then}, wrong {later}{docs(lost)}; "
            f"{len(gained)} wrong {then}, right {later}{docs(gained)}"]


def against_source(rows: list[Row], record: dict, source: dict) -> None:
    """Annotate rows with the source checkpoint's value, the delta, flipped documents and, for perplexity-type
    metrics, the paired per-document test (informational: thresholds and baselines decide the verdict)."""
    for row in rows:
        s = source.get("metrics", {}).get(row.metric)
        if s is None:
            continue
        name = row.metric.split(",", 1)[0]
        row.source = s["value"]
        row.source_delta = row.value - s["value"]
        row.notes += _item_notes(record, source, name, "in the source", "after conversion")
        if is_perplexity(row.metric):
            paired = paired_loglikelihoods(record, source, name)
            if paired is not None:
                row.notes.append(paired.note(name, "source", "converted"))


def _item_metrics(record: dict) -> set:
    return {k for scores in record.get("items", {}).values() for k in scores}


def flips(now: dict, before: dict, metric: str) -> tuple[list[str], list[str]]:
    """(docs right before and wrong now, docs wrong before and right now) for a per-item metric."""
    lost, gained = [], []
    for doc in sorted(set(now) & set(before), key=lambda d: (len(d), d)):
        a, b = before[doc].get(metric), now[doc].get(metric)
        if a is None or b is None:
            continue
        if a == 1 and b == 0:
            lost.append(doc)
        elif a == 0 and b == 1:
            gained.append(doc)
    return lost, gained


def _num(v, sign: str = "") -> str:
    if v is None:
        return "-"
    if v != 0 and abs(v) < 5e-5:  # would print as 0.0000 (fidelity's KLD lives there)
        return f"{v:{sign}.2e}"
    return f"{v:{sign}.4f}" if abs(v) < 1000 else f"{v:{sign}.1f}"


def format_value(v, stderr=None) -> str:
    if v is None:
        return "-"
    return _num(v) + (f" ± {_num(stderr)}" if stderr is not None else "")


def format_table(rows: list[Row], markdown: bool = False) -> str:
    with_source = any(r.source is not None for r in rows)
    header = ["task", "metric", "value ± stderr", *(["source", "Δ source"] if with_source else []), "threshold",
              "baseline", "delta", "combined se", "z", "allowed fall", "verdict"]
    body = [[r.task, r.metric, format_value(r.value, r.stderr),
             *([format_value(r.source), _num(r.source_delta, "+")] if with_source else []),
             r.threshold or "-", format_value(r.baseline, r.baseline_stderr), _num(r.delta, "+"), _num(r.combined_se),
             "-" if r.z is None else f"{r.z:+.2f}", _num(r.allowed), r.verdict] for r in rows]
    notes = [n for r in rows for n in r.notes]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else []))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*row) for row in body]
    return "\n".join(lines + notes)


# --- files ----------------------------------------------------------------------------------------------------------
def load_baseline(path) -> dict:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise GateError(f"{path}: no such baseline file; create one with --update-baseline") from None
    except ValueError as e:
        raise GateError(f"{path}: not a JSON baseline file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != BASELINE_FORMAT or not isinstance(doc.get("tasks"), dict):
        raise GateError(f"{path}: not an ane-eval baseline (expected format {BASELINE_FORMAT!r})")
    return doc


def write_baseline(path, records: dict, model: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": BASELINE_FORMAT, "model": model, "tasks": records}, indent=2) + "\n")
    return path


def write_summary(path, rows: list[Row], model: dict, backend: str, images=()) -> Path:
    """summary.md: the verdict table, then the report's plots (PNG files next to it, linked by name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    verdict = "FAILED" if any(r.failed for r in rows) else "passed"
    text = (f"# ane-eval summary: {verdict}\n\nmodel: `{model.get('name')}` ({model.get('path')}), fingerprint "
            f"`{str(model.get('fingerprint'))[:12]}` ({model.get('files', '?')} files), backend: {backend}\n\n"
            + format_table(rows, markdown=True) + "\n")
    text += "".join(f"\n![{Path(p).stem}]({Path(p).name})\n" for p in images)
    path.write_text(text)
    return path


def load_records(path) -> tuple[dict, dict]:
    """({task: record}, model) from a baseline file, an lm-eval results_*.json (with its samples_*.jsonl), or an
    output directory holding either."""
    p = Path(path)
    if not p.exists():
        raise GateError(f"{p}: no such results file or directory")
    if p.is_dir():
        if (p / "baseline.json").is_file():
            return load_records(p / "baseline.json")
        files = sorted(p.rglob("results_*.json"), key=lambda f: f.name)
        if not files:
            raise GateError(f"{p}: no baseline.json or lm-eval results_*.json inside")
        records, model = {}, {}
        for f in files:  # later runs of a task override earlier ones
            r, model = load_records(f)
            records.update(r)
        return records, model
    try:
        doc = json.loads(p.read_text())
    except ValueError as e:
        raise GateError(f"{p}: not valid JSON ({e})") from None
    if isinstance(doc, dict) and doc.get("format") == BASELINE_FORMAT:
        return doc["tasks"], doc.get("model", {})
    if not (isinstance(doc, dict) and isinstance(doc.get("results"), dict) and "versions" in doc):
        raise GateError(f"{p}: neither an ane-eval baseline nor an lm-eval results file")
    stamp = p.stem.removeprefix("results_")
    limit = (doc.get("config") or {}).get("limit")
    model = {"name": doc.get("model_name"), "path": str(p)}
    records = {}
    for task in doc["results"]:
        if task not in (doc.get("configs") or {}):
            continue  # group rows aggregate their tasks
        sample_file = p.with_name(f"samples_{task}_{stamp}.jsonl")
        samples = [json.loads(line) for line in sample_file.read_text().splitlines() if line.strip()] \
            if sample_file.is_file() else None
        records[task] = task_record(doc, task, limit=limit, model=model, samples=samples)
    return records, model


def compare(a: dict, b: dict, tolerance: float | dict = DEFAULT_TOLERANCE, z: float = DEFAULT_Z,
            relative_tolerance: float | dict = DEFAULT_RELATIVE_TOLERANCE) -> list[Row]:
    """B (now) against A (before), per shared task; model files may differ (that is what compare is for), task
    version, few-shot count and limit may not."""
    rows = []
    shared = [t for t in b if t in a]
    if not shared:
        raise GateError(f"no task in common (A has {sorted(a)}, B has {sorted(b)})")
    for task in shared:
        rows += evaluate_gate(task, b[task], None, a[task], tolerance, z, check_model=False,
                              relative_tolerance=relative_tolerance)
    return rows
