"""The evals/ suite as users run it (`pytest evals ...` in a subprocess): passes on the demo, thresholds fail
with the table, the regression gate names flipped documents, mismatched baselines are refused, -k selects,
benchmarks write JSON with extra_info."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def suite(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "pytest", "evals", "-p", "no:cacheprovider", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TQDM_DISABLE": "1"})


@pytest.fixture(scope="module")
def passing_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    proc = suite("--limit", 40, "--output-dir", out, "--update-baseline", "-k", "test_task", "-q")
    return proc, out


def test_suite_passes_on_the_demo(passing_run):
    proc, out = passing_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "8 passed" in proc.stdout
    summary = (out / "summary.md").read_text()
    assert "demo_boolq" in summary and "](report-metrics.png)" in summary and "](report-documents.png)" in summary
    assert (out / "report-metrics.png").is_file() and "data:image/png;base64," in (out / "report.html").read_text()
    baseline = json.loads((out / "baseline.json").read_text())
    assert set(baseline["tasks"]) == {"demo_boolq", "demo_arc_easy", "demo_hellaswag", "demo_wikitext", "demo_qa",
                                      "demo_boolq_long", "demo_arith_steps", "demo_hellaswag_distract"}
    assert baseline["tasks"]["demo_boolq"]["limit"] == 40 and baseline["model"]["fingerprint"]
    assert len(list(out.rglob("results_*.json"))) == 8 and len(list(out.rglob("samples_*.jsonl"))) == 8


def test_threshold_above_the_achieved_value_fails_with_the_table(tmp_path):
    s = tmp_path / "suite.yaml"
    s.write_text("tasks:\n  - name: demo_wikitext\n    thresholds: {word_perplexity: {max: 1.5}}\n")
    proc = suite("--suite", s, "--limit", 10, "--output-dir", tmp_path / "out", "-k", "test_task",
                 "--update-baseline")
    assert proc.returncode == 1
    assert "demo_wikitext did not pass:" in proc.stdout
    assert "value ± stderr" in proc.stdout and "<= 1.5" in proc.stdout and "FAIL threshold" in proc.stdout
    assert "baseline NOT updated" in proc.stdout and not (tmp_path / "out" / "baseline.json").exists()
    assert "Traceback" not in proc.stdout


@pytest.fixture(scope="module")
def noisy_task(tmp_path_factory):
    """demo_boolq with every third label flipped: the demo model gets exactly those documents wrong."""
    from ane_eval.demo.tasks import DATA_DIR

    d = tmp_path_factory.mktemp("noisy")
    rows = [json.loads(line) for line in (DATA_DIR / "boolq_test.jsonl").read_text().splitlines()[:30]]
    for i, r in enumerate(rows):
        if i % 3 == 0:
            r["label"] = 1 - r["label"]
    (d / "noisy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "noisy_boolq.yaml").write_text(
        f"task: noisy_boolq\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / 'noisy.jsonl'}\n"
        "output_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: \"{{passage}}\\nQuestion: {{question}}?\\nAnswer:\"\ndoc_to_target: label\n"
        "doc_to_choice: ['no', 'yes']\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    return d


def test_a_better_baseline_fails_the_gate_and_names_flips(noisy_task, tmp_path):
    args = ["--include-path", noisy_task, "--tasks", "noisy_boolq", "-k", "test_task"]
    proc = suite(*args, "--output-dir", tmp_path / "first", "--update-baseline")
    assert proc.returncode == 0, proc.stdout[-2000:]
    base = json.loads((tmp_path / "first" / "baseline.json").read_text())
    rec = base["tasks"]["noisy_boolq"]
    wrong_now = [d for d, v in rec["items"].items() if v["acc"] == 0]
    assert wrong_now  # the flipped labels
    for d in rec["items"]:
        rec["items"][d]["acc"] = 1.0
    rec["metrics"]["acc,none"]["value"] = 1.0
    better = tmp_path / "better.json"
    better.write_text(json.dumps(base))
    proc = suite(*args, "--output-dir", tmp_path / "second", "--baseline", better)
    assert proc.returncode == 1
    assert "FAIL regression" in proc.stdout
    assert f"acc: {len(wrong_now)} right before, wrong now (docs {', '.join(wrong_now[:3])}" in proc.stdout


def test_baseline_with_a_different_limit_is_refused(passing_run, tmp_path):
    _, out = passing_run
    proc = suite("--limit", 30, "--output-dir", tmp_path / "out", "--baseline", out / "baseline.json",
                 "-k", "test_task and boolq")
    assert proc.returncode == 1
    assert "refusing to compare with a baseline made differently: limit 40 in the baseline, 30 now" in proc.stdout


def test_same_baseline_passes(passing_run, tmp_path):
    _, out = passing_run
    proc = suite("--limit", 40, "--output-dir", tmp_path / "out", "--baseline", out / "baseline.json",
                 "-k", "test_task and (boolq or wikitext)")
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_k_selects_a_task():
    proc = suite("-k", "boolq", "--collect-only", "-q")
    selected = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    assert selected == ["evals/test_tasks.py::test_task[demo_boolq]", "evals/test_tasks.py::test_task[demo_boolq_long]"]


def test_contract_tests_are_one_per_tensor():
    proc = suite("-k", "test_tensor", "--collect-only", "-q")
    ids = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    assert "evals/test_contracts.py::test_tensor[chunk02-prefill-outputs-output_hidden_states]" in ids
    assert "evals/test_contracts.py::test_tensor[lm_head-main-outputs-logits8]" in ids
    assert len(ids) == 2 + 1 + 8 + 2 * 2 * 6  # embeddings in/out, lm_head in + 8 outs, 2 chunks x 2 fns x 6


def test_benchmarks_write_json_with_extra_info(tmp_path):
    out = tmp_path / "bench.json"
    proc = suite("-k", "test_bench", "--benchmark-enable", "--benchmark-json", out, "--benchmark-min-rounds", 1)
    assert proc.returncode == 0, proc.stdout[-2000:]
    doc = json.loads(out.read_text())
    assert doc["machine_info"]["chip"]
    names = {b["name"] for b in doc["benchmarks"]}
    assert names == {"test_load_time", "test_prefill_throughput", "test_decode_throughput",
                     "test_time_to_first_token", "test_loglikelihood_latency"}
    for b in doc["benchmarks"]:
        for key in ("backend", "compute_units", "precision", "chip", "os", "model", "context", "batch"):
            assert key in b["extra_info"], (b["name"], key)


def test_unusable_model_dir_stops_with_one_line(tmp_path):
    proc = suite("--model-dir", tmp_path / "missing", "-q")
    assert proc.returncode == 2
    assert f"ane-eval: {tmp_path / 'missing'}: no such directory" in proc.stdout
    assert "Traceback" not in proc.stdout and "raise BundleError" not in proc.stdout


# (score of a trivial model, documents) per default task: majority class for boolq (62.2% "yes" in validation),
# random choice otherwise; sizes of lm-eval's evaluation splits
TRIVIAL = {"boolq": (0.622, 3270), "arc_easy": (0.25, 2376), "arc_challenge": (0.25, 1172),
           "hellaswag": (0.25, 10042), "piqa": (0.5, 1838), "winogrande": (0.5, 1267), "openbookqa": (0.25, 500)}


def test_default_floors_are_three_standard_errors_above_a_trivial_model():
    from ane_eval.suite import default_suite, load_suite

    suite = load_suite(default_suite(model_is_demo=False))
    assert {t.name for t in suite.tasks} == set(TRIVIAL)
    for t in suite.tasks:
        p0, n = TRIVIAL[t.name]
        (floor,) = t.thresholds.values()
        assert floor >= p0 + 3 * (p0 * (1 - p0) / n) ** 0.5, t.name


def _broken_demo(root: Path, bug: str) -> Path:
    """The demo converted by the real converter from a checkpoint carrying a conversion bug's effect:
    `attention-scale`: scores scaled by 0.6 too much (q_proj x 0.6: RoPE and q.k are linear in q), as a wrong
    1/sqrt(d) would; `lm-head-parts-swapped`: the LM head's 8 parts in reverse order."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from ane_eval import demo
    from ane_eval.convert import BuildOptions, build

    ckpt = root / "checkpoint"
    shutil.copytree(demo.checkpoint_dir(), ckpt)
    w = load_file(str(ckpt / "model.safetensors"))
    if bug == "attention-scale":
        for k in [k for k in w if k.endswith("q_proj.weight")]:
            w[k] = (w[k].astype(np.float32) * 0.6).astype(np.float16)
    else:
        w["lm_head.weight"] = np.concatenate(np.split(w["lm_head.weight"], demo.BUILD_OPTIONS["split_lm_head"])[::-1])
    save_file(w, str(ckpt / "model.safetensors"))
    return build(ckpt, root / "model", BuildOptions(**demo.BUILD_OPTIONS))


@pytest.mark.parametrize("bug", ["attention-scale", "lm-head-parts-swapped"])
def test_a_broken_conversion_fails_the_demo_suite(bug, tmp_path):
    model = _broken_demo(tmp_path, bug)
    proc = suite("--model-dir", model, "--suite", ROOT / "evals" / "suites" / "demo.yaml", "--output-dir",
                 tmp_path / "out", "-k", "test_task and wikitext")
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "demo_wikitext did not pass:" in proc.stdout and "FAIL threshold" in proc.stdout


def test_argmax_monolithic_demo_generates_and_refuses_scoring(tmp_path):
    """The demo converted as an ANEMLL 0.3.5 monolithic model with an argmax head: its tensor and behavioural
    contracts pass, the generation task passes its threshold, a loglikelihood task fails with the one-line refusal
    (never a score)."""
    from ane_eval import demo

    model_dir = demo.model_dir(argmax=True, monolithic=True)
    proc = suite("--model-dir", model_dir, "--suite", ROOT / "evals" / "suites" / "demo.yaml", "--limit", 20,
                 "--output-dir", tmp_path, "-k", "contract or demo_qa or (demo_boolq and not long)", "-q", "-rA")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "PASSED evals/test_tasks.py::test_task[demo_qa]" in lines
    assert [ln.split(" - ")[0] for ln in lines if ln.startswith("FAILED")] == [
        "FAILED evals/test_tasks.py::test_task[demo_boolq]"]
    assert ("its LM head returns only the argmax of each vocabulary chunk (argmax_in_model), not a distribution, "
            "so the task(s) demo_boolq cannot be scored") in proc.stdout
    assert "PASSED evals/test_contracts.py::test_tensor[monolithic-infer-outputs-argmax_idx]" in lines
    assert "Traceback" not in proc.stdout
