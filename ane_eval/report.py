"""Pictures of a run: `report.html` (one self-contained file, every image embedded as base64 PNG, works offline and
as a CI artifact) and the same plots as PNG files next to `summary.md`, which links them.

Plots, each drawn only when its data is there:
  metrics   every task's metric with its 95% interval (1.96 stderr), the baseline's value and interval, the
            reference model's value (fidelity) and the threshold
  documents per-document correctness; against a baseline, which documents flipped (right -> wrong, wrong -> right)
  kld       histogram of per-token KL divergence against the reference model (fidelity)
  timings   prefill/decode throughput and time to first token from pytest-benchmark (evals/test_bench.py)

Input is plain data (`ReportData`): gate rows and records as the suite and the CLI already hold them, optional
`reference` values per task and metric, an optional KLD array, and pytest-benchmark's benchmark dicts.
"""
from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from . import gate

# One accent colour per plot: readable, and the browser test finds each in the rendered page (an image that did
# not decode leaves its colour out).
COLORS = {"metrics": "#1f5fbf", "documents": "#d62728", "kld": "#8c2fb0", "timings": "#e07b00"}
BASELINE_COLOR, REFERENCE_COLOR, RIGHT, WRONG, GAINED = "#7f7f7f", "#2ca02c", "#a6c8ea", "#5a5a5a", "#2ca02c"
TITLES = {"metrics": "Metrics with 95% intervals", "documents": "Per-document results",
          "kld": "Fidelity: KL divergence per token", "timings": "Timings (pytest-benchmark)"}


@dataclass
class ReportData:
    rows: list  # gate.Row, one per task and metric
    records: dict  # task -> gate record of this run (per-document `items` for the documents plot)
    model: dict = field(default_factory=dict)
    backend: str = ""
    baseline: dict | None = None  # task -> baseline record
    reference: dict = field(default_factory=dict)  # task -> {metric ("acc,none" or "acc"): reference model value}
    kld: object = None  # per-token KL divergences (any float sequence) from a fidelity run
    benchmarks: list = field(default_factory=list)  # pytest-benchmark dicts: name, stats{mean,...}, extra_info


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never a display, also on machines that have one
    import matplotlib.pyplot as plt

    return plt


def _reference(data: ReportData, task: str, metric: str):
    values = data.reference.get(task) or {}
    v = values.get(metric, values.get(metric.split(",", 1)[0]))
    return None if v is None else float(v)


def _threshold(text: str):
    return float(text.split()[1]) if text else None


def plot_metrics(data: ReportData):
    """One panel per metric name, tasks on the y axis."""
    plt = _pyplot()
    by_metric: dict[str, list] = {}
    for r in data.rows:
        by_metric.setdefault(r.metric, []).append(r)
    heights = [0.9 + 0.45 * len(rows) for rows in by_metric.values()]
    fig, axes = plt.subplots(len(by_metric), 1, figsize=(8, sum(heights) + 0.4), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (metric, rows) in zip(axes[:, 0], by_metric.items()):
        ys = range(len(rows))
        spans = []  # every drawn x, to fit the axis
        for y, r in zip(ys, rows):
            spans += [r.value - 1.96 * (r.stderr or 0), r.value + 1.96 * (r.stderr or 0)]
            ax.errorbar(r.value, y, xerr=1.96 * (r.stderr or 0), fmt="o", color=COLORS["metrics"], capsize=4,
                        label="this run" if y == 0 else None)
            if r.baseline is not None:
                ax.errorbar(r.baseline, y - 0.25, xerr=1.96 * (r.baseline_stderr or 0), fmt="s", ms=5,
                            color=BASELINE_COLOR, capsize=3, label="baseline" if y == 0 else None)
                spans += [r.baseline - 1.96 * (r.baseline_stderr or 0), r.baseline + 1.96 * (r.baseline_stderr or 0)]
            ref = _reference(data, r.task, r.metric)
            if ref is not None:
                ax.plot(ref, y + 0.25, "D", color=REFERENCE_COLOR, ms=6, label="reference model" if y == 0 else None)
                spans.append(ref)
            bound = _threshold(r.threshold)
            if bound is not None:
                ax.plot([bound, bound], [y - 0.4, y + 0.4], color="black", lw=2, label="threshold" if y == 0 else None)
                spans.append(bound)
            if r.failed:
                ax.annotate(r.verdict, (r.value, y), xytext=(6, 6), textcoords="offset points", color="#b00000",
                            fontsize=8)
        # at least 2% of the value wide: identical runs must not zoom into float noise
        lo, hi = min(spans), max(spans)
        pad = max(0.08 * (hi - lo), 0.02 * max(abs(lo), abs(hi)), 1e-6)
        ax.set_xlim(lo - pad, hi + pad)
        ax.ticklabel_format(axis="x", useOffset=False, style="plain")
        ax.set_yticks(list(ys), [r.task for r in rows])
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_title(metric, fontsize=10, loc="left")
        ax.grid(axis="x", alpha=0.3)
    legend = {}
    for ax in axes[:, 0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    axes[0, 0].legend(legend.values(), legend.keys(), loc="lower left", bbox_to_anchor=(0, 1.15), ncol=4,
                      fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def _doc_matrix(data: ReportData):
    """(task and metric label, [state per document]) for every per-document metric of every task; states 0 wrong,
    1 right, 2 right before and wrong now, 3 wrong before and right now."""
    lanes = []
    for task, record in data.records.items():
        items = record.get("items") or {}
        before = ((data.baseline or {}).get(task) or {}).get("items") or {}
        docs = sorted(items, key=lambda d: (len(d), d))
        for metric in dict.fromkeys(m for scores in items.values() for m in scores):
            states = []
            for d in docs:
                now, old = items[d].get(metric), (before.get(d) or {}).get(metric)
                states.append(2 if old == 1 and now == 0 else 3 if old == 0 and now == 1 else int(now == 1))
            label = f"{task} {metric}" + (f"  (-{states.count(2)} / +{states.count(3)})" if before else "")
            lanes.append((label, states))
    return lanes


def plot_documents(data: ReportData):
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    plt = _pyplot()
    lanes = _doc_matrix(data)
    width = max(len(s) for _, s in lanes)
    fig, axes = plt.subplots(len(lanes), 1, figsize=(8, 0.55 * len(lanes) + 1.0), squeeze=False)
    cmap = ListedColormap([WRONG, RIGHT, COLORS["documents"], GAINED])
    for ax, (label, states) in zip(axes[:, 0], lanes):
        row = [states + [math.nan] * (width - len(states))]
        ax.imshow(row, aspect="auto", cmap=cmap, vmin=-0.5, vmax=3.5, interpolation="nearest")
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    axes[-1, 0].set_xticks(range(0, width, max(1, width // 10)))
    axes[-1, 0].set_xlabel("document")
    handles = [Patch(color=RIGHT, label="right"), Patch(color=WRONG, label="wrong")]
    if data.baseline:
        handles += [Patch(color=COLORS["documents"], label="right before, wrong now"),
                    Patch(color=GAINED, label="wrong before, right now")]
    fig.legend(handles=handles, loc="upper center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def plot_kld(data: ReportData):
    import numpy as np

    plt = _pyplot()
    kld = np.asarray(data.kld, dtype=np.float64).ravel()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.hist(kld, bins=50, color=COLORS["kld"])
    for q, style in ((np.mean(kld), "-"), (np.percentile(kld, 99), "--")):
        ax.axvline(q, color="black", ls=style, lw=1)
    ax.set_title(f"{kld.size} tokens: mean {np.mean(kld):.4g}, p99 {np.percentile(kld, 99):.4g} (nats)",
                 fontsize=10, loc="left")
    ax.set_xlabel("KL(reference || model) per token")
    ax.set_ylabel("tokens")
    fig.tight_layout()
    return fig


def timings(benchmarks: list) -> list[tuple[str, float, str]]:
    """(label, value, unit) from pytest-benchmark dicts of evals/test_bench.py: token throughputs from the token
    counts its tests record in extra_info, and mean latencies."""
    out = []
    for b in benchmarks:
        stats, info, name = b.get("stats") or {}, b.get("extra_info") or {}, b.get("name", "")
        mean = stats.get("mean")
        if not mean:
            continue
        if "prefill" in name and info.get("tokens"):
            out.append(("prefill", info["tokens"] / mean, "tokens/s"))
        elif "decode" in name and info.get("decode_steps"):
            out.append(("decode", info["decode_steps"] / mean, "tokens/s"))
        elif "first_token" in name:
            out.append((f"time to first token ({info.get('prompt_tokens', '?')}-token prompt)", mean * 1e3, "ms"))
        else:
            out.append((name.removeprefix("test_").replace("_", " "), mean * 1e3, "ms"))
    return out


def plot_timings(data: ReportData):
    plt = _pyplot()
    values = timings(data.benchmarks)
    units = sorted({u for _, _, u in values}, reverse=True)
    fig, axes = plt.subplots(1, len(units), figsize=(8, 0.5 * len(values) + 1.4), squeeze=False)
    for ax, unit in zip(axes[0], units):
        pts = [(label, v) for label, v, u in values if u == unit]
        ax.barh(range(len(pts)), [v for _, v in pts], color=COLORS["timings"])
        ax.set_yticks(range(len(pts)), [label for label, _ in pts], fontsize=8)
        ax.invert_yaxis()
        for y, (_, v) in enumerate(pts):
            ax.annotate(f"{v:,.0f}" if v >= 100 else f"{v:.3g}", (v, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        ax.set_xlabel(unit + (" (higher is better)" if unit == "tokens/s" else " (lower is better)"))
        ax.margins(x=0.2)
    fig.tight_layout()
    return fig


def figures(data: ReportData) -> dict:
    """name -> matplotlib figure, for the plots whose data is present."""
    figs = {}
    if data.rows:
        figs["metrics"] = plot_metrics(data)
    if _doc_matrix(data):
        figs["documents"] = plot_documents(data)
    if data.kld is not None and len(data.kld):
        figs["kld"] = plot_kld(data)
    if timings(data.benchmarks):
        figs["timings"] = plot_timings(data)
    return figs


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _pyplot().close(fig)
    return buf.getvalue()


def _html(data: ReportData, images: dict) -> str:
    failed = any(r.failed for r in data.rows)
    m = data.model
    head = ["task", "metric", "value ± stderr", "threshold", "baseline", "delta", "z", "verdict"]
    cells = [[r.task, r.metric, gate.format_value(r.value, r.stderr), r.threshold or "-",
              gate.format_value(r.baseline, r.baseline_stderr), "-" if r.delta is None else f"{r.delta:+.4f}",
              "-" if r.z is None else f"{r.z:+.2f}", r.verdict] for r in data.rows]
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(
        f"<tr class='{'fail' if row[-1].startswith('FAIL') else 'pass'}'>"
        + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells) + "</table>"
    notes = [n for r in data.rows for n in r.notes]
    missing = []
    if not data.benchmarks or "timings" not in images:
        missing.append("no timings: run the benchmarks with <code>--benchmark-enable</code> (pytest evals)")
    sections = "".join(
        f"<h2>{TITLES[name]}</h2><img alt='{name}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        for name, png in images.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ane-eval report: {html.escape(str(m.get('name')))}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 980px; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; }}
tr.fail td {{ background: #fde0e0; }} img {{ max-width: 100%; display: block; margin: 0.5em 0 1.5em; }}
.verdict {{ font-weight: bold; color: {'#b00000' if failed else '#1a7f37'}; }}
</style></head><body>
<h1>ane-eval report: <span class="verdict">{'FAILED' if failed else 'passed'}</span></h1>
<p>model <code>{html.escape(str(m.get('name')))}</code> ({html.escape(str(m.get('path')))}), fingerprint
<code>{html.escape(str(m.get('fingerprint'))[:12])}</code>, backend {html.escape(data.backend)}</p>
{table}
{''.join(f'<p>{html.escape(n)}</p>' for n in notes)}
{sections}
{''.join(f'<p><i>{t}</i></p>' for t in missing)}
</body></html>
"""


def write_report(out_dir, data: ReportData) -> tuple[Path, list[Path]]:
    """Write report.html and report-<plot>.png into out_dir; returns (html path, png paths)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = {name: _png(fig) for name, fig in figures(data).items()}
    pngs = []
    for name, png in images.items():
        pngs.append(out / f"report-{name}.png")
        pngs[-1].write_bytes(png)
    page = out / "report.html"
    page.write_text(_html(data, images))
    return page, pngs
