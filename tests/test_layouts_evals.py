"""Every layout the converter builds, through the suite users run: `pytest evals -k contract` (the tensor and
behavioural contracts) and the demo tasks, on the portable runtime and on an EMULATED Mac (tests/coreml_emulator.py:
coremltools' own Python code over an emulation of its native binding) for `.mlpackage` parts and `.mlmodelc` copies
(tests/mlmodelc_writer.py). HF agreement of the same builds: tests/test_layouts_035.py, tests/test_gemma3.py,
tests/test_convert.py.

Two processes run every session (tests/suite_runs.py: one `pytest evals` session per model directory); the tests
below read each session's JUnit outcomes and lm-eval samples. The tiny random models cannot score, so their task
run has no thresholds: it checks that every task type executes end to end (argmax heads: generation only, the
scoring tasks refused in one line) and, on the emulated Mac, gives the portable runtime's responses per request."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ane_eval import demo

from .mlmodelc_writer import compile_directory
from .suite_runs import outcomes

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("demo_qa", "demo_boolq", "demo_wikitext")  # generate_until, loglikelihood, loglikelihood_rolling
ARGMAX_REFUSAL = "not a distribution, so the task(s) {task} cannot be scored"
ARGMAX_SKIPS = "an argmax LM head returns no logits"  # the two logits-only checks of evals/test_contracts.py
# layout -> (model directory, backend, run the tasks too, contract tests that must be among the passed ones)
RUNS = {
    "0.3.4-qwen2": ("qwen:reference", "mil", True, ["lm_head-main-outputs-logits16"]),
    "argmax": ("qwen:argmax", "mil", True, ["lm_head-main-outputs-argmax_idx", "lm_head-main-outputs-argmax_val"]),
    "monolithic": ("qwen:monolithic", "mil", True, ["monolithic-infer-inputs-input_ids",
                                                    "monolithic-prefill-outputs-logits16"]),
    "monolithic_argmax": ("qwen:monolithic_argmax", "mil", True, ["monolithic-infer-outputs-argmax_idx"]),
    "gemma3_split": ("gemma:split", "mil", True, ["chunk02-infer_rotate-states-model_model_kv_cache_global",
                                                  "chunk01-prefill_rotate-states-model_model_kv_cache_local"]),
    "gemma3_unified": ("gemma:unified", "mil", True, ["chunk01-infer-states-model_model_kv_cache_0"]),
    "gemma3_split_rotate": ("gemma:split_rotate", "mil", True, [
        "chunk01-infer_rotate-states-model_model_kv_cache_local", "chunk01-prefill-inputs-update_mask"]),
    # the emulated Mac: ANEMLL models the converter builds (fp16 and LUT) and .mlmodelc copies of them (the fp16
    # demo's packages run the whole suite there: tests/test_coreml.py test_evals_suite_on_an_emulated_mac)
    "lut4": ("demo:lut4", "coreml", False, ["chunk01-infer-states-model_model_kv_cache_0"]),
    "fp16.mlmodelc": ("demo:fp16.mlmodelc", "coreml", False, ["embeddings-main-inputs-input_ids"]),
    "lut4.mlmodelc": ("demo:lut4.mlmodelc", "coreml", False, ["lm_head-main-outputs-logits8"]),
    "argmax.mlmodelc": ("qwen:argmax.mlmodelc", "coreml", True, ["lm_head-main-outputs-argmax_idx"]),
    "gemma3_split_rotate.mlmodelc": ("gemma:split_rotate.mlmodelc", "coreml", True, [
        "chunk01-prefill_rotate-states-model_model_kv_cache_global", "chunk01-prefill-inputs-update_mask"]),
}


def _model_dir(key: str, layouts_035, gemma_builds, root: Path) -> Path:
    family, name = key.split(":")
    compiled = name.endswith(".mlmodelc")
    name = name.removesuffix(".mlmodelc")
    src = {"qwen": lambda: layouts_035[1][name], "gemma": lambda: gemma_builds[name],
           "demo": lambda: demo.model_dir(lut=4) if name == "lut4" else demo.model_dir()}[family]()
    return compile_directory(src, root / f"{family}-{name}.mlmodelc") if compiled else src


@pytest.fixture(scope="module")
def sessions(layouts_035, gemma_builds, tmp_path_factory):
    """{layout: (JUnit outcomes, output dir, exit status)} of every run in RUNS, one process per backend."""
    root = tmp_path_factory.mktemp("layout_sessions")
    suite = root / "tasks.yaml"
    suite.write_text("tasks:\n" + "".join(f"  - name: {t}\n" for t in TASKS))  # no thresholds: they only run
    result = {}
    for backend in ("mil", "coreml"):
        runs = []
        for layout, (key, b, tasks, _) in RUNS.items():
            if b != backend:
                continue
            model_dir, out = _model_dir(key, layouts_035, gemma_builds, root), root / f"out-{layout}"
            args = ["--model-dir", model_dir, "--backend", backend, "--output-dir", out,
                    "-k", "contract or test_task" if tasks else "contract", "--suite", suite, "--limit", 2]
            runs.append({"layout": layout, "args": list(map(str, args)), "junit": str(root / f"{layout}.xml")})
        spec = root / f"{backend}.json"
        spec.write_text(json.dumps(runs))
        proc = subprocess.run([sys.executable, "-m", "tests.suite_runs", *(["--emulated-mac"] if backend == "coreml"
                                                                          else []), spec],
                              cwd=ROOT, capture_output=True, text=True, timeout=1200,
                              env={**os.environ, "TQDM_DISABLE": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        for run in json.loads(spec.read_text()):
            result[run["layout"]] = (outcomes(Path(run["junit"])), root / f"out-{run['layout']}", run["exit"])
    return result


def _samples(out: Path, task: str) -> list:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    return [(s["doc_id"], s["resps"]) for s in map(json.loads, path.read_text().splitlines())]


@pytest.mark.parametrize("layout", RUNS)
def test_contract(sessions, layout):
    """Every test of evals/test_contracts.py passes (an argmax head skips only the two logits-only checks), with
    the layout's own tensors among them; the session ran to its end (the suite stops early when a model cannot be
    loaded, after the tensor tests, which read only the files)."""
    results, _, exit_status = sessions[layout]
    contract = {k: v for k, v in results.items() if k.startswith("test_contracts.py::")}
    argmax = "argmax" in layout
    refused = {f"test_tasks.py::test_task[{t}]" for t in TASKS[1:]} if argmax and RUNS[layout][2] else set()
    assert exit_status == (1 if refused else 0), f"{layout}: pytest exit status {exit_status}"
    assert {k for k, v in results.items() if v[0] == "failed"} == refused, \
        {k: v for k, v in results.items() if v[0] == "failed"}
    skipped = [v[1] for v in contract.values() if v[0] == "skipped"]
    assert len(skipped) == (2 if argmax else 0) and all(ARGMAX_SKIPS in why for why in skipped), skipped
    for tensor in RUNS[layout][3]:
        assert contract[f"test_contracts.py::test_tensor[{tensor}]"][0] == "passed", tensor


@pytest.mark.parametrize("layout", [layout for layout, run in RUNS.items() if run[2]])
def test_demo_tasks(sessions, layout):
    """Logits heads run every task type; an argmax head runs the generation task and refuses the scoring ones in
    one line (evals/test_tasks.py, through the harness's NoDistributionError)."""
    results, out, _ = sessions[layout]
    tasks = {t: results[f"test_tasks.py::test_task[{t}]"] for t in TASKS}
    assert f"backend: {RUNS[layout][1]}" in (out / "summary.md").read_text()
    if "argmax" not in layout:
        assert all(v[0] == "passed" for v in tasks.values()), tasks
        assert all(_samples(out, t) for t in TASKS)
        return
    assert tasks["demo_qa"][0] == "passed" and _samples(out, "demo_qa")
    for t in ("demo_boolq", "demo_wikitext"):
        assert tasks[t][0] == "failed" and ARGMAX_REFUSAL.format(task=t) in tasks[t][1], tasks[t]
        assert not list(out.rglob(f"samples_{t}_*.jsonl"))


@pytest.mark.parametrize("layout", [layout for layout, run in RUNS.items() if run[1] == "coreml" and run[2]])
def test_emulated_mac_answers_as_the_portable_runtime(sessions, layout):
    """The `.mlmodelc` copy on the emulated CoreML gives, request by request, the responses of the packages on the
    portable runtime (the emulator computes with it: this checks the CoreML path feeds and reads it the same), and
    both runs report one fingerprint, saying which file set ran."""
    on_mac, on_mil = (sessions[name][1] for name in (layout, layout.removesuffix(".mlmodelc")))
    (mac_fp, mac_files), (mil_fp, mil_files) = (
        re.search(r"fingerprint `(\w+)` \((\w+) files\)", (out / "summary.md").read_text()).groups()
        for out in (on_mac, on_mil))
    assert mac_fp == mil_fp and (mac_files, mil_files) == ("mlmodelc", "mlpackage")
    for task in TASKS:
        if list(on_mil.rglob(f"samples_{task}_*.jsonl")):
            assert _samples(on_mac, task) == _samples(on_mil, task), task
