"""The CoreML path on an EMULATED Mac (tests/coreml_emulator.py: coremltools' own Python code over an emulation of its
native binding, backed by the portable runtime). What this proves and what it cannot: README "On a Mac"."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import ane_eval
from ane_eval import contract, demo
from ane_eval.backends import BackendError, auto_backend, macos_version, os_name, select
from ane_eval.bundle import discover, model_info
from tests import coreml_emulator
from tests.mlmodelc_writer import compile_directory

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Question: is the state clean between prompts? The quick brown fox jumps over the lazy dog.\nAnswer:"


@pytest.fixture()
def mac(monkeypatch):
    return coreml_emulator.activate(monkeypatch)


@pytest.fixture(scope="module")
def mil_demo(demo_dir):
    return ane_eval.load_model(demo_dir, backend="mil")


def _last_logits(model, ids):
    model.reset()
    model.prefill(ids[:-1])
    return model.infer(ids[-1], len(ids) - 1)


def test_platform_detection(mac, monkeypatch):
    """auto is CoreML on an Apple silicon Mac with macOS 15+, the version as sw_vers says (platform.mac_ver() says
    10.16 here, as a Python built against an older SDK does); an Intel Mac has no Neural Engine."""
    import platform

    assert macos_version() == "15.5" and platform.mac_ver()[0] == "10.16"
    assert auto_backend()[0] == "coreml" and select("auto").name == "coreml"
    assert os_name() == "macOS 15.5"
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert auto_backend() == ("mil", "this Mac has no Neural Engine (x86_64)")
    with pytest.raises(BackendError, match="CPU_AND_NE need the Neural Engine of an Apple silicon Mac"):
        select("coreml")
    assert select("coreml", compute_units="CPU_ONLY").describe() == "coreml (CPU_ONLY)"


def test_coremltools_boundary_as_emulated(mac, demo_dir):
    """The facts the driver must live with, produced by coremltools' own code over the emulated binding."""
    import coremltools as ct

    chunk = str(demo_dir / "llama_FFN_PF_chunk_01of02.mlpackage")
    m = ct.models.MLModel(chunk, compute_units=ct.ComputeUnit.CPU_AND_NE, function_name="infer")
    ct.models.MLModel(chunk, compute_units=ct.ComputeUnit.CPU_AND_NE, function_name="prefill")
    assert len(mac.compiles) == 2  # MLModel compiles the package at every load
    inputs = {"hidden_states": np.zeros((1, 1, 128), np.float16), "position_ids": np.zeros(1, np.int32),
              "causal_mask": np.zeros((1, 1, 1, 256), np.float16), "current_pos": np.zeros(1, np.int32)}
    state = m.make_state()
    out = m.predict(inputs, state)
    assert inputs["hidden_states"].dtype == np.float32  # coremltools converted our fp16 array (a temporary copy)
    assert out["output_hidden_states"].dtype == np.float32  # Float16 outputs cross as float32
    assert state.read_state(contract.STATE_NAME).dtype == np.float32
    with pytest.raises(KeyError, match="does not match any of the model input name"):
        m.predict({**inputs, "extra": np.zeros(1, np.float32)}, state)
    with pytest.raises(RuntimeError, match="value type not convertible"):  # int64 ids never reach CoreML
        m.predict({**inputs, "position_ids": np.zeros(1, np.int64)}, state)


def test_demo_on_coreml_equals_mil(mac, demo_dir, mil_demo, monkeypatch):
    """Each package compiled once, its functions loaded from the compiled copy; fp16 crosses as float32 arrays we own;
    the logits are the portable runtime's exactly (the emulator computes with it)."""
    import coremltools as ct

    fed = []
    real = ct.models.CompiledMLModel.predict
    monkeypatch.setattr(ct.models.CompiledMLModel, "predict",
                        lambda self, data, state=None: (fed.extend(v.dtype for v in data.values()),
                                                        real(self, data, state))[1])
    m = ane_eval.load_model(demo_dir, backend="auto")
    assert m.backend == "coreml" and "backend=coreml (CPU_AND_NE)" in repr(m)
    assert sorted(Path(p).name for p in mac.compiles) == sorted(p.name for p in demo_dir.glob("*.mlpackage"))
    assert sorted(fn for _, fn in mac.loads) == ["infer", "infer", "main", "main", "prefill", "prefill"]
    ids = m.tokenizer.encode(PROMPT)
    np.testing.assert_array_equal(_last_logits(m, ids), _last_logits(mil_demo, ids))
    assert set(fed) == {np.dtype(np.float32), np.dtype(np.int32)}  # no fp16 array for coremltools to copy


def test_lut_build_on_coreml_equals_mil(mac):
    lut_dir = demo.model_dir(lut=4)
    coreml, mil = (ane_eval.load_model(lut_dir, backend=b) for b in ("coreml", "mil"))
    ids = coreml.tokenizer.encode(PROMPT)
    np.testing.assert_array_equal(_last_logits(coreml, ids), _last_logits(mil, ids))


def test_compiled_only_directory_loads_as_it_is(mac, demo_dir, mil_demo, tmp_path):
    """A directory of `.mlmodelc` parts only (what ANEMLL publishes) resolves to CoreML and loads every part as it
    is: `CompiledMLModel(path, compute_units, function_name)` hands the path to the binding, which compiles only
    what is not a compiled model (`Model::Model`: `Utils::isCompiledModelPath`, CoreMLPython.mm). Same logits as
    the packages on the portable runtime."""
    import coremltools as ct

    compiled = compile_directory(demo_dir, tmp_path / "compiled")
    m = ane_eval.load_model(compiled, backend="auto")
    assert m.backend == "coreml" and mac.compiles == []
    chunks = [f"llama_FFN_PF_chunk_0{i}of02.mlmodelc" for i in (1, 2)]
    assert sorted(mac.loads) == sorted([(c, fn) for c in chunks for fn in ("infer", "prefill")]
                                       + [("llama_embeddings.mlmodelc", "main"), ("llama_lm_head.mlmodelc", "main")])
    ids = m.tokenizer.encode(PROMPT)
    np.testing.assert_array_equal(_last_logits(m, ids), _last_logits(mil_demo, ids))
    assert model_info(m.bundle)["files"] == "mlmodelc"
    # coremltools' CompiledMLModel itself (models/_compiled_model.py): fp16 inputs converted to float32 before the
    # binding, no input-name check (it has no spec to check against), Float16 outputs back as float32
    head = ct.models.CompiledMLModel(str(compiled / "llama_lm_head.mlmodelc"), ct.ComputeUnit.CPU_AND_NE)
    inputs = {"hidden_states": np.zeros((1, 1, 128), np.float16), "not_an_input": np.zeros(1, np.float32)}
    out = head.predict(inputs)
    assert inputs["hidden_states"].dtype == np.float32 and out["logits1"].dtype == np.float32
    with pytest.raises(RuntimeError, match="prefill"):  # CoreML refuses a function the model does not have
        ct.models.CompiledMLModel(str(compiled / "llama_lm_head.mlmodelc"), ct.ComputeUnit.CPU_AND_NE,
                                  function_name="prefill")


def test_anelm_on_coreml_equals_mil_per_request(mac, demo_dir, mil_demo):
    from lm_eval.api.instance import Instance

    from ane_eval.harness import ANELM

    context = "Question: Which word completes the sentence? The sky is\nAnswer:"
    reqs = [Instance("loglikelihood", {}, (context, f" {c}"), i) for i, c in enumerate(["blue", "green", "loud"])]
    rolling = [Instance("loglikelihood_rolling", {}, (PROMPT * 3,), 0)]
    coreml, mil = ANELM(model_dir=str(demo_dir), backend="coreml"), ANELM(model=mil_demo)
    assert coreml.loglikelihood(reqs, disable_tqdm=True) == mil.loglikelihood(reqs, disable_tqdm=True)
    assert coreml.loglikelihood_rolling(rolling, disable_tqdm=True) == mil.loglikelihood_rolling(rolling,
                                                                                                 disable_tqdm=True)
    generate = [Instance("generate_until", {}, (q, {"until": ["\n"], "max_gen_toks": 16}), i)
                for i, q in enumerate(["Question: What is 3 plus 4?\nAnswer:", "Kosdak lives in"])]
    answers = coreml.generate_until(generate, disable_tqdm=True)
    assert answers == mil.generate_until(generate, disable_tqdm=True) and any(answers)


def test_contract_knows_the_coreml_boundary(mac, demo_dir):
    m = ane_eval.load_model(demo_dir, backend="coreml")
    infer, part = m._chunks[0]["infer"][0], m.chunk_parts[0]
    ok = {"hidden_states": np.zeros((1, 1, 128), np.float32), "position_ids": np.zeros(1, np.int32),
          "causal_mask": np.zeros((1, 1, 1, 256), np.float32), "current_pos": np.zeros(1, np.int32)}
    m.reset()
    m._call(infer, part, "infer", ok)  # float32 holding fp16 values: what CoreML's own outputs are
    cases = [({"hidden_states": np.full((1, 1, 128), 0.1, np.float32)}, "holds values that are not fp16"),
             ({"hidden_states": np.zeros((1, 4, 128), np.float32)}, r"expects hidden_states \(1, 1, 128\) fp16, got "
                                                                    r"\(1, 4, 128\) float32"),
             ({"position_ids": np.zeros(1, np.int64)}, r"expects position_ids \(1,\) int32, got \(1,\) int64")]
    for change, message in cases:
        with pytest.raises(contract.ContractError, match=message):
            m._call(infer, part, "infer", {**ok, **change})


def test_failed_load_is_one_line_and_never_retried(mac, demo_dir):
    import coremltools as ct

    mac.load_failures["llama_lm_head.mlpackage"] = coreml_emulator.LOAD_FAILURE
    with pytest.raises(BackendError) as e:
        ane_eval.load_model(demo_dir, backend="coreml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("llama_lm_head.mlpackage:main: CoreML could not load it: Failed to build "
                                              "the model execution plan") and msg.endswith("error code: -14.")
    assert [name for name, _ in mac.loads].count("03-llama_lm_head.mlmodelc") == 0
    # what plain coremltools does with it: a RuntimeWarning, no proxy, then make_state raises a bare Exception
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = ct.models.MLModel(str(demo_dir / "llama_lm_head.mlpackage"))
    assert any(w.category is RuntimeWarning and "error code: -14" in str(w.message) for w in caught)
    with pytest.raises(Exception, match="not loaded with the Core ML Framework"):
        m.make_state()


def test_busy_is_what_the_ane_reports(mac, demo_dir, monkeypatch):
    from ane_eval.backends import coreml

    sleeps = []
    backend = coreml.CoreMLBackend(sleep=sleeps.append)
    p = backend.load(demo_dir / "llama_embeddings.mlpackage")
    ids = {"input_ids": np.zeros((1, 1), np.int32)}
    mac.busy = 2
    assert p.predict(ids)["hidden_states"].shape == (1, 1, 128) and sleeps == [0.05, 0.1]
    mac.busy = 100
    with pytest.raises(coreml.ANEBusyError, match="still timed out after 6 retries .*Program Inference timeout.*one model"):
        p.predict(ids)
    mac.busy = 0
    for deterministic in (coreml_emulator.user_info(coreml_emulator.LOAD_FAILURE.format(mil="/m/x.mlmodelc/model.mil")),
                          "Qwen2.5-14B-ctx512/qwen_lm_head.mlmodelc: resource not found",
                          "ANEProgramProcessRequestDirect() Failed with status=0x16 : statusType=0x9: Program "
                          "Inference error"):
        assert not coreml._is_busy(RuntimeError(deterministic))


def test_compiled_copy_fingerprints_as_its_package(demo_dir, tmp_path):
    """A `.mlmodelc` beside each package (what a Mac run of the converter leaves): the Mac runs the compiled files,
    Linux the packages, and both carry one fingerprint, saying which file set ran."""
    d = tmp_path / "model"
    shutil.copytree(demo_dir, d)
    for pkg in d.glob("*.mlpackage"):
        compiled = pkg.with_suffix(".mlmodelc")
        (compiled / "weights").mkdir(parents=True)
        shutil.copy2(pkg / "Data/com.apple.CoreML/weights/weight.bin", compiled / "weights/weight.bin")
        (compiled / "model.mil").write_text("program(1.3)\n")
        (compiled / "coremldata.bin").write_bytes(b"\0" * 16)
    linux, mac = model_info(discover(d, backend="mil")), model_info(discover(d, backend="coreml"))
    assert (linux["files"], mac["files"]) == ("mlpackage", "mlmodelc")
    assert linux["fingerprint"] == mac["fingerprint"] == model_info(discover(demo_dir))["fingerprint"]
    w = d / "llama_lm_head.mlmodelc/weights/weight.bin"
    w.write_bytes(w.read_bytes()[:-1] + b"\1")  # other weights: another model
    assert model_info(discover(d, backend="coreml"))["fingerprint"] != mac["fingerprint"]


def test_appledouble_files_are_ignored(demo_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(demo_dir, d)
    (d / "meta.yaml").unlink()  # found by file pattern, as without meta.yaml or with names that do not match
    for p in [*d.iterdir(), *d.rglob("weight.bin")]:
        (p.parent / f"._{p.name}").write_bytes(b"\0\5\26\7")  # AppleDouble header, as macOS writes on exFAT/SMB
    b = discover(d)
    assert [p.name for p in [b.embeddings, *b.chunks, b.lm_head]] == [
        "llama_embeddings.mlpackage", "llama_FFN_PF_chunk_01of02.mlpackage", "llama_FFN_PF_chunk_02of02.mlpackage",
        "llama_lm_head.mlpackage"]
    assert model_info(b)["fingerprint"] == model_info(discover(demo_dir))["fingerprint"]


# --- whole processes on an emulated Mac --------------------------------------------------------------------------
def _run(args):
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "TQDM_DISABLE": "1"})


def test_evals_suite_on_an_emulated_mac(tmp_path):
    """`pytest evals` on the demo: every test passes, with backend=coreml; the benchmark records the compute units
    and the macOS version."""
    bench = tmp_path / "bench.json"
    # test_fidelity needs --reference (the source checkpoint; tests/test_fidelity.py runs it): deselected here
    proc = _run(["pytest", "-p", "tests.coreml_emulator", "evals", "-q", "-p", "no:cacheprovider", "--output-dir",
                 tmp_path, "--benchmark-enable", "--benchmark-json", bench, "-k", "not test_fidelity"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout and "skipped" not in proc.stdout
    assert "backend: coreml (CPU_AND_NE)" in (tmp_path / "summary.md").read_text()
    benchmarks = json.loads(bench.read_text())["benchmarks"]
    assert len(benchmarks) == 5 and all(
        (b["extra_info"]["backend"], b["extra_info"]["compute_units"], b["extra_info"]["os"], b["extra_info"]["chip"])
        == ("coreml (CPU_AND_NE)", "CPU_AND_NE", "macOS 15.5", coreml_emulator.CHIP) for b in benchmarks)


def test_cli_on_an_emulated_mac(tmp_path):
    proc = _run(["tests.coreml_emulator", "inspect", "demo", "--json"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["backends"]["coreml"] == "available"
    proc = _run(["tests.coreml_emulator", "run", "--model", "demo", "--tasks", "demo_boolq", "--limit", "4",
                 "--output-dir", tmp_path])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "backend=coreml (CPU_AND_NE)" in proc.stderr and "backend: coreml" in (tmp_path / "summary.md").read_text()
