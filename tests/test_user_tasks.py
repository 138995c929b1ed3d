"""Users' own tasks (--include-path, suite include_paths), offline use, and the README troubleshooting guide."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ane_eval
from ane_eval import runner

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def user_tasks(tmp_path_factory):
    """A private task: local JSONL data, lm-eval YAML, exactly as a team would write it."""
    d = tmp_path_factory.mktemp("my_tasks")
    rows = [{"q": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1), str(abs(a - b) + 7)], "label": 0}
            for a in range(5) for b in range(4)]
    # the same questions with the choices rotated: labels 0, 1 and 2, so a choice-order bug changes the score
    rotated = [{"q": r["q"], "choices": r["choices"][i % 3:] + r["choices"][:i % 3], "label": (3 - i % 3) % 3}
               for i, r in enumerate(rows)]
    for name, data in (("my_sums", rows), ("my_sums_rotated", rotated)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
        (d / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {d / (name + '.jsonl')}\n"
            "output_type: multiple_choice\ntest_split: test\ndoc_to_text: \"Question: {{q}}\\nAnswer:\"\n"
            "doc_to_target: label\ndoc_to_choice: \"{{choices}}\"\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")
    return d


def run(args, module):
    return subprocess.run([sys.executable, "-m", *module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})


def test_include_path_same_metrics_in_suite_and_cli(user_tasks, tmp_path):
    suite_out, cli_out = tmp_path / "suite", tmp_path / "cli"
    proc = run(["evals", "-p", "no:cacheprovider", "--include-path", user_tasks, "--tasks", "my_sums",
                "--output-dir", suite_out, "--update-baseline", "-k", "test_task"], ["pytest"])
    assert proc.returncode == 0, proc.stdout[-2000:]
    proc = run(["run", "--model", "demo", "--tasks", "my_sums", "--include-path", user_tasks, "--output-dir", cli_out],
               ["ane_eval.cli"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = json.loads((suite_out / "baseline.json").read_text())["tasks"]["my_sums"]["metrics"]
    b = json.loads((cli_out / "baseline.json").read_text())["tasks"]["my_sums"]["metrics"]
    assert a == b and a["acc,none"]["value"] > 0


def test_suite_file_include_paths_are_relative_to_the_suite(user_tasks, tmp_path):
    home = tmp_path / "team"
    shutil.copytree(user_tasks, home / "tasks")
    yaml_path = home / "tasks" / "my_sums.yaml"
    yaml_path.write_text(yaml_path.read_text().replace(str(user_tasks), str(home / "tasks")))
    (home / "suite.yaml").write_text("include_paths: [tasks]\ntasks:\n  - name: my_sums\n    thresholds: {acc: 0.01}\n")
    proc = run(["evals", "-p", "no:cacheprovider", "--suite", home / "suite.yaml", "--output-dir", tmp_path / "o",
                "-k", "test_task"], ["pytest"])
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "1 passed" in proc.stdout


def test_unknown_task_is_one_line_everywhere():
    proc = run(["evals", "-p", "no:cacheprovider", "--tasks", "my_sumz", "-k", "test_task"], ["pytest"])
    assert proc.returncode == 1
    assert "unknown task 'my_sumz'" in proc.stdout and "Traceback" not in proc.stdout
    proc = run(["run", "--model", "demo", "--tasks", "demo_hellaswg"], ["ane_eval.cli"])
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ane-eval: error: unknown task 'demo_hellaswg' (did you mean demo_hellaswag")
    assert last.endswith("list tasks with `lm-eval ls tasks` or add your YAMLs with --include-path")


def test_local_task_never_touches_the_network(user_tasks, demo_dir, monkeypatch):
    from ane_eval.harness import ANELM

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    tm = runner.task_manager([user_tasks])
    results = runner.evaluate(ANELM(model=ane_eval.load_model(demo_dir, backend="mil")),
                              ["my_sums", "my_sums_rotated"], tm)
    labels = [s["target"] for s in results["samples"]["my_sums_rotated"]]
    assert len(set(labels)) == 3
    # each choice is scored on its own: the order of the choices changes nothing, document by document
    per_doc = {t: [s["acc"] for s in sorted(results["samples"][t], key=lambda s: s["doc_id"])]
               for t in ("my_sums", "my_sums_rotated")}
    assert per_doc["my_sums"] == per_doc["my_sums_rotated"]
    assert sum(per_doc["my_sums"]) > len(labels) / 3  # above chance: the scores are the model's, not noise


def test_hub_task_without_cached_data_is_one_line():
    proc = run(["run", "--model", "demo", "--tasks", "boolq", "--limit", "2", "--output-dir", "/tmp/ane-eval-x"],
               ["ane_eval.cli"])
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ane-eval: error: cannot load the data of boolq: ") and "aps/super_glue" in last


# --- the README's troubleshooting guide quotes the real messages ----------------------------------------------
def _message(fn) -> str:
    try:
        fn()
    except Exception as e:  # the guide documents exactly these exceptions' messages
        return str(e).splitlines()[0]
    raise AssertionError("no error raised")


def _in_readme(message: str, replacements: dict) -> None:
    for real, placeholder in replacements.items():
        message = message.replace(str(real), placeholder)
    assert message in README, f"README troubleshooting does not quote:\n{message}"


def test_troubleshooting_messages_are_current(demo_dir, tmp_path, monkeypatch):
    from ane_eval.backends import coreml, select
    from ane_eval.model import ContextOverflowError  # noqa: F401

    model = ane_eval.load_model(demo_dir, backend="mil")
    d = tmp_path / "model"
    shutil.copytree(demo_dir, d)
    repl = {d: "<model dir>"}
    # shape/dtype contract (CoreML's "value type not convertible")
    bad = {"hidden_states": np.zeros((1, 10, 128), np.float16), "position_ids": np.arange(10, dtype=np.int32),
           "causal_mask": np.zeros((1, 1, 10, 256), np.float16), "current_pos": np.array([0], np.int32)}
    _in_readme(_message(lambda: model._call(model._chunks[0]["prefill"][0], model.chunk_parts[0], "prefill", bad)), repl)
    # compiled batch differs from meta.yaml
    (d / "meta.yaml").write_text((d / "meta.yaml").read_text().replace("batch_size: 32", "batch_size: 64"))
    _in_readme(_message(lambda: ane_eval.load_model(d, backend="mil")), repl)
    (d / "meta.yaml").write_text((d / "meta.yaml").read_text().replace("batch_size: 64", "batch_size: 32"))
    # context overflow (the harness truncates like HFLM; the model API refuses)
    model.reset()
    _in_readme(_message(lambda: model.prefill(list(range(300)))), repl)
    # ANE busy
    monkeypatch.setattr(coreml, "RETRY_DELAYS", (0.0,) * 6)

    from tests.coreml_emulator import BUSY_TEXT

    class Busy:
        def predict(self, inputs, state=None):
            raise RuntimeError(BUSY_TEXT)
    _in_readme(_message(lambda: coreml._Predictor(Busy(), "llama_FFN_PF_chunk_01of02.mlmodelc:prefill",
                                                  sleep=lambda s: None).predict({})), repl)
    # CoreML unavailable (on a machine without it)
    if not ane_eval.backends.coreml_available()[0]:
        msg = _message(lambda: select("coreml"))
        assert re.sub(r"\(this is \w+\)", "(this is Linux)", msg) in README
    # a .mlmodelc that is not a compiled model (a renamed package, a half-copied download)
    for p in d.glob("*.mlpackage"):
        p.rename(p.with_suffix(".mlmodelc"))
    msg = _message(lambda: ane_eval.load_model(d, backend="mil"))
    _in_readme(msg, repl)
    for p in d.glob("*.mlmodelc"):
        p.rename(p.with_suffix(".mlpackage"))
    # missing tokenizer
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).unlink()
    _in_readme(_message(lambda: ane_eval.load_model(d, backend="mil")), repl)


def test_allow_missing_data_skips_with_one_line(tmp_path):
    proc = run(["evals", "-p", "no:cacheprovider", "--tasks", "boolq", "-k", "test_task", "--output-dir", tmp_path,
                "--allow-missing-data", "-rs"], ["pytest"])
    assert proc.returncode == 0, proc.stdout[-2000:]
    skipped = [ln for ln in proc.stdout.splitlines() if ln.startswith("SKIPPED")]
    assert len(skipped) == 1 and "cannot load the data of boolq" in skipped[0] and "aps/super_glue" in skipped[0]
    proc = run(["evals", "-p", "no:cacheprovider", "--tasks", "boolq", "-k", "test_task", "--output-dir", tmp_path],
               ["pytest"])
    assert proc.returncode == 1 and "cannot load the data of boolq" in proc.stdout and "Traceback" not in proc.stdout
