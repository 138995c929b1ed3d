"""The ane-eval command line: run, inspect, compare, on the demo model and on broken inputs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ane_eval.cli import main


def cli(*args, check_exit=None):
    proc = subprocess.run([sys.executable, "-m", "ane_eval.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"}, timeout=600)
    if check_exit is not None:
        assert proc.returncode == check_exit, proc.stdout + proc.stderr
    return proc


def error_lines(proc) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("ane-eval: error:")]


def test_help():
    proc = cli("--help", check_exit=0)
    for command in ("run", "inspect", "compare"):
        assert command in proc.stdout


def test_inspect_demo(demo_dir, capsys):
    assert main(["inspect", str(demo_dir)]) == 0
    out = capsys.readouterr().out
    assert "consistency: OK  context 256, prefill batch 32, hidden 128, vocab 1024" in out
    assert "[chunk 2] llama_FFN_PF_chunk_02of02.mlpackage" in out and "fp16 (no LUT)" in out
    assert "state  model_model_kv_cache_0   (8, 2, 256, 32)" in out and "ops: " in out
    assert "backends: mil: available" in out
    assert main(["inspect", str(demo_dir), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["consistency"]["ok"] and len(card["parts"]) == 4
    assert 1_000_000 < card["parameters"] < 1_200_000


def test_inspect_lut_bits_from_the_program(capsys):
    from ane_eval import demo

    assert main(["inspect", str(demo.model_dir(lut=4)), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    bits = {p["role"]: p["lut_bits"] for p in card["parts"]}
    assert bits == {"embeddings": [], "chunk 1": [4], "chunk 2": [4], "lm_head": [4]}


def test_inspect_inconsistent_model_exits_1(demo_dir, tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(demo_dir, d)
    meta = (d / "meta.yaml").read_text().replace("batch_size: 32", "batch_size: 64")
    (d / "meta.yaml").write_text(meta)
    assert main(["inspect", str(d)]) == 1
    assert "consistency: FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["inspect", "/nonexistent/model"], "no such directory"),
    (["run", "--model", "/nonexistent/model", "--tasks", "demo_boolq"], "no such directory"),
    (["run", "--model", "demo", "--tasks", "demo_boolk"], "unknown task 'demo_boolk' (did you mean demo_boolq"),
    (["compare", "/nonexistent/a.json", "/nonexistent/b.json"], "no such results file or directory"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    proc = cli(*args, check_exit=2)
    assert len(error_lines(proc)) == 1 and message in error_lines(proc)[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_debug_shows_the_traceback():
    proc = cli("--debug", "inspect", "/nonexistent/model")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_file_instead_of_model_dir(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("hi")
    proc = cli("inspect", f, check_exit=2)
    assert "is a file, not a model directory" in error_lines(proc)[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, demo_dir):
    out = tmp_path_factory.mktemp("run")
    proc = cli("run", "--model", demo_dir, "--tasks", "demo_boolq,demo_arc_easy", "--limit", 20, "--output-dir", out,
               "--log-samples", "--backend", "mil", check_exit=0)
    assert "|demo_boolq" in proc.stdout and "acc" in proc.stdout
    return out


def test_run_writes_the_suite_files(run_dir):
    assert (run_dir / "summary.md").is_file() and (run_dir / "baseline.json").is_file()
    assert (run_dir / "report.html").is_file() and "](report-metrics.png)" in (run_dir / "summary.md").read_text()
    results = list(run_dir.rglob("results_*.json"))
    samples = list(run_dir.rglob("samples_demo_boolq_*.jsonl"))
    assert len(results) == 1 and len(samples) == 1
    doc = json.loads(results[0].read_text())
    assert set(doc["results"]) == {"demo_boolq", "demo_arc_easy"} and doc["config"]["limit"] == 20
    assert len(samples[0].read_text().splitlines()) == 20


def test_compare_exit_statuses(run_dir, tmp_path):
    assert cli("compare", run_dir, run_dir).returncode == 0
    worse = tmp_path / "worse.json"
    base = json.loads((run_dir / "baseline.json").read_text())
    base["tasks"]["demo_boolq"]["metrics"]["acc,none"]["value"] -= 0.5
    for doc in base["tasks"]["demo_boolq"]["items"].values():
        doc["acc"] = 0.0
    worse.write_text(json.dumps(base))
    proc = cli("compare", run_dir / "baseline.json", worse)
    assert proc.returncode == 1 and "FAIL regression" in proc.stdout and "REGRESSION" in proc.stdout
    assert "right before, wrong now" in proc.stdout
    assert cli("compare", worse, run_dir).returncode == 0  # B better than A
    proc = cli("compare", run_dir, worse, "--json")
    assert json.loads(proc.stdout)["regression"] is True
    other_limit = json.loads(worse.read_text())
    other_limit["tasks"]["demo_boolq"]["limit"] = 50
    mismatched = tmp_path / "mismatched.json"
    mismatched.write_text(json.dumps(other_limit))
    proc = cli("compare", run_dir, mismatched, check_exit=2)
    assert "refusing to compare" in error_lines(proc)[0] and "limit 20 in the baseline, 50 now" in error_lines(proc)[0]
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    proc = cli("compare", run_dir, broken, check_exit=2)
    assert "not valid JSON" in error_lines(proc)[0]
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"hello": 1}))
    assert "neither an ane-eval baseline nor an lm-eval results file" in error_lines(cli("compare", odd, odd))[0]


def test_compare_reads_lm_eval_results_files(run_dir):
    results = next(run_dir.rglob("results_*.json"))
    proc = cli("compare", results, run_dir / "baseline.json", check_exit=0)
    assert "demo_arc_easy" in proc.stdout and "acc_norm,none" in proc.stdout


def test_resume_with_cache(demo_dir, tmp_path):
    """A run killed midway and started again with --use-cache does not recompute finished requests and ends with
    the same results as an uninterrupted run."""
    import ane_eval
    from ane_eval import runner
    from ane_eval.harness import ANELM

    tm = runner.task_manager()
    model = ane_eval.load_model(demo_dir, backend="mil")
    cache = str(tmp_path / "cache")
    original = model.infer
    calls = {"n": 0, "die_after": None}

    class Killed(BaseException):
        pass

    def counted_infer(token, pos):
        calls["n"] += 1
        if calls["die_after"] is not None and calls["n"] > calls["die_after"]:
            raise Killed()
        return original(token, pos)

    model.infer = counted_infer
    reference = runner.evaluate(ANELM(model=model), ["demo_arc_easy"], tm, limit=16)
    full_cost = model.token_evaluations
    assert calls["n"] > 4, calls
    calls.update(die_after=calls["n"] // 2, n=0)  # killed halfway through the infers the full run made
    with pytest.raises(Killed):
        runner.evaluate(ANELM(model=model), ["demo_arc_easy"], tm, limit=16, use_cache=cache)
    model.infer = original
    before = model.token_evaluations
    resumed = runner.evaluate(ANELM(model=model), ["demo_arc_easy"], tm, limit=16, use_cache=cache)
    resumed_cost = model.token_evaluations - before
    assert resumed["results"]["demo_arc_easy"]["acc,none"] == reference["results"]["demo_arc_easy"]["acc,none"]
    a = [s["resps"] for s in sorted(reference["samples"]["demo_arc_easy"], key=lambda s: s["doc_id"])]
    b = [s["resps"] for s in sorted(resumed["samples"]["demo_arc_easy"], key=lambda s: s["doc_id"])]
    for doc_a, doc_b in zip(a, b, strict=True):  # prefix sharing may batch prefills differently: not bit-exact
        for (x,), (y,) in zip(doc_a, doc_b, strict=True):
            assert abs(x[0] - y[0]) <= 1e-3 and x[1] == y[1]
    assert 0 < resumed_cost < full_cost
    assert Path(cache + "_rank0.db").is_file()
