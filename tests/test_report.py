"""report.html and its PNG plots: written from gate rows and records, self-contained, and rendered by a real
browser (headless Chromium) whose screenshot shows every plot decoded.

The README's example image comes from the same render: `python -m tests.test_report results/report.html
docs/report.png` after a demo run."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ane_eval import gate, report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def lm_eval_results(task: str, acc: float, n: int, version=1.0) -> dict:
    """The fields of lm-eval's results dict that gate.task_record reads (lm_eval/evaluator.py output)."""
    return {"results": {task: {"alias": task, "acc,none": acc, "acc_stderr,none": (acc * (1 - acc) / (n - 1)) ** 0.5}},
            "versions": {task: version}, "n-shot": {task: 0}, "higher_is_better": {task: {"acc": True}}}


def record(task: str, right: list[int]) -> dict:
    samples = [{"doc_id": i, "acc": float(r)} for i, r in enumerate(right)]
    return gate.task_record(lm_eval_results(task, sum(right) / len(right), len(right)), task, samples=samples)


def benchmark(name: str, mean: float, **extra) -> dict:
    """One entry of pytest-benchmark's JSON (`benchmarks[]`: name, stats, extra_info)."""
    return {"name": name, "stats": {"mean": mean, "min": mean * 0.9, "max": mean * 1.2}, "extra_info": extra}


@pytest.fixture(scope="module")
def data() -> report.ReportData:
    rng = np.random.default_rng(0)
    before = {"long": (rng.random(120) < 0.8).astype(int).tolist(), "easy": [1] * 60}
    for d in (3, 17, 40, 41, 90):
        before["long"][d] = 1
    now = {"long": list(before["long"]), "easy": [1] * 60}
    for d in (3, 17, 40, 41, 90):  # right before, wrong now
        now["long"][d] = 0
    now["long"][[i for i, r in enumerate(before["long"]) if r == 0][0]] = 1  # wrong before, right now
    records = {t: record(t, r) for t, r in now.items()}
    baseline = {t: record(t, r) for t, r in before.items()}
    rows = [row for t in records for row in gate.evaluate_gate(t, records[t], {"acc": 0.7}, baseline[t])]
    return report.ReportData(
        rows, records, {"name": "demo", "path": "/models/demo", "fingerprint": "0123456789abcdef"}, "mil",
        baseline=baseline, reference={"long": {"acc": 0.83}, "easy": {"acc,none": 1.0}},
        kld=rng.exponential(0.01, 2000),
        benchmarks=[benchmark("test_prefill_throughput", 0.05, tokens=128),
                    benchmark("test_decode_throughput", 0.2, decode_steps=32),
                    benchmark("test_time_to_first_token", 0.03, prompt_tokens=64),
                    benchmark("test_load_time", 0.15)])


@pytest.fixture(scope="module")
def written(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    page, pngs = report.write_report(out, data)
    gate.write_summary(out / "summary.md", data.rows, data.model, data.backend, pngs)
    return out, page, pngs


def test_every_plot_is_written_and_linked_from_the_summary(written):
    out, page, pngs = written
    assert [p.name for p in pngs] == [f"report-{n}.png" for n in ("metrics", "documents", "kld", "timings")]
    summary = (out / "summary.md").read_text()
    for p in pngs:
        assert p.read_bytes().startswith(b"\x89PNG") and f"]({p.name})" in summary


def test_report_is_one_self_contained_file(written, data):
    _, page, pngs = written
    text = page.read_text()
    sources = re.findall(r"src='([^']*)'", text)
    assert len(sources) == len(pngs) and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http" not in text and "<link" not in text and "<script" not in text
    for r in data.rows:  # the table shows every verdict
        assert f"<td>{r.task}</td><td>{r.metric}</td>" in text and f"<td>{r.verdict}</td>" in text


def test_flips_and_timings_come_from_the_data(data):
    lanes = dict(report._doc_matrix(data))
    assert sorted(lanes) == ["easy acc  (-0 / +0)", "long acc  (-5 / +1)"]
    assert lanes["long acc  (-5 / +1)"][3] == 2 and lanes["long acc  (-5 / +1)"].count(3) == 1
    values = {label: round(v, 3) for label, v, _ in report.timings(data.benchmarks)}
    assert values["prefill"] == 2560 and values["decode"] == 160
    assert values["time to first token (64-token prompt)"] == 30 and values["load time"] == 150


def test_without_optional_data_only_the_metrics_plot(data, tmp_path):
    bare = report.ReportData(data.rows, {t: {k: v for k, v in r.items() if k != "items"}
                                         for t, r in data.records.items()})
    page, pngs = report.write_report(tmp_path, bare)
    assert [p.name for p in pngs] == ["report-metrics.png"]
    assert "--benchmark-enable" in page.read_text()


def render(page: Path, png: Path, height: int = 4200) -> str:
    """Headless Chromium screenshot of the page; returns its stderr (console messages are logged there)."""
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--enable-logging=stderr", "--v=0", f"--window-size=1000,{height}",
                           f"--screenshot={png}", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and png.is_file(), proc.stderr[-2000:]
    return proc.stderr


def color_pixels(png: Path, hex_color: str, tol: int = 12) -> int:
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    want = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels - want).max(axis=-1) <= tol).sum())


@pytest.mark.skipif(CHROMIUM is None and os.environ.get("CI") != "true",
                    reason="headless Chromium not installed (Debian: apt-get install chromium); required in CI")
def test_browser_renders_every_plot(written, tmp_path):
    assert CHROMIUM, "CI=true but no chromium on PATH: .ci/run must install it (apt-get install -y chromium)"
    _, page, pngs = written
    shot = tmp_path / "shot.png"
    log = render(page, shot)
    assert not re.search(r"CONSOLE|Uncaught|Failed to load resource", log), log[-2000:]
    # Each plot's accent colour is drawn only inside its image: present in the screenshot means that image
    # decoded and rendered with content (a broken image shows a small icon and its alt text instead).
    for name, color in report.COLORS.items():
        assert color_pixels(shot, color) > 200, f"{name} plot not visible in the rendered page"


def test_a_broken_image_is_caught(written, tmp_path):
    """The pixel check above can fail: the same page with one image's data corrupted loses that plot's colour."""
    if CHROMIUM is None:
        pytest.skip("headless Chromium not installed")
    _, page, _ = written
    text = page.read_text()
    start = text.index("alt='kld' src='data:image/png;base64,") + len("alt='kld' src='data:image/png;base64,")
    broken = tmp_path / "report.html"
    broken.write_text(text[:start] + "AAAA" + text[start + 4:])
    render(broken, tmp_path / "shot.png")
    assert color_pixels(tmp_path / "shot.png", report.COLORS["kld"]) < 50
    assert color_pixels(tmp_path / "shot.png", report.COLORS["metrics"]) > 200


if __name__ == "__main__":  # python -m tests.test_report REPORT_HTML OUT_PNG: the README image
    page, out = Path(sys.argv[1]), Path(sys.argv[2])
    render(page, out, height=int(sys.argv[3]) if len(sys.argv) > 3 else 2600)
    print(json.dumps({"wrote": str(out)}))
