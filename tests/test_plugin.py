"""The suite as an installed pytest plugin: a wheel built from this repository (not editable) in a fresh
virtualenv, used from an empty directory — `pytest --pyargs ane_eval.evals` and a user's own test file with the
plugin's fixtures — and, in a clone with the plugin installed, options registered once.

The venv reuses the heavy dependencies of the interpreter running this test through a .pth line naming its
site-packages (a plain path entry: that directory's own .pth files, such as an editable ane_eval's, are not run),
so nothing is downloaded; ane_eval itself comes only from the wheel (checked)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_SKIP = shutil.ignore_patterns(".git", ".venv", ".cache", "__pycache__", "*.egg-info", ".pytest_cache")


def SKIP(directory, names):
    """What a clone holds besides sources; build/, dist/ and results/ only at the top (ane_eval/convert is code)."""
    top = {"build", "dist", "results"} & set(names) if Path(directory) == ROOT else set()
    return set(_SKIP(directory, names)) | top

slow = pytest.mark.slow  # builds a wheel and a venv, runs the suite twice (~1-3 min on 2 cores)


def run(cmd, cwd, timeout=900):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**env, "TQDM_DISABLE": "1"})


def entry_point() -> tuple[str, str]:
    import tomllib

    ((name, target),) = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][
        "pytest11"].items()
    return name, target


@pytest.mark.parametrize("same_name", [True, False], ids=["entry-point-name", "other-name"])
def test_root_conftest_and_entry_point_register_the_options_once(tmp_path, same_name):
    """The plugin installed (an entry point found by importlib.metadata, as pip would write it) plus the clone's
    root conftest: pytest --help works and lists --model-dir once. Under any other entry-point name pytest
    refuses the second registration of the module — what the shared name prevents."""
    name, target = entry_point()
    dist = tmp_path / "installed-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: installed\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(f"[pytest11]\n{name if same_name else 'ane_eval'} = {target}\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "--help", "-p", "no:cacheprovider"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])})
    if same_name:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.count("--model-dir=MODEL_DIR") == 1
    else:
        assert "already registered" in proc.stderr


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("plugin")
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=SKIP)  # build outside the clone: no build/ or egg-info in it
    built = run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index",
                 "-w", tmp / "wheel", "-q"], cwd=src)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp / "wheel").glob("ane_eval-*.whl")
    env = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env], check=True)
    python = env / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q",
                     wheel], cwd=tmp)
    assert installed.returncode == 0, installed.stderr[-2000:]
    where = run([python, "-c", "import ane_eval, ane_eval.evals; print(ane_eval.__file__)"], tmp)
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    return env


@slow
def test_installed_suite_runs_from_an_empty_directory(venv, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run([venv / "bin" / "python", "-m", "pytest", "--pyargs", "ane_eval.evals", "-k", "boolq", "--limit", 40,
                "-p", "no:cacheprovider", "--output-dir", "out"], cwd=empty)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 passed" in proc.stdout and "demo_boolq_long" in proc.stdout
    assert (empty / "out" / "report.html").is_file() and (empty / "out" / "summary.md").is_file()


@slow
def test_users_own_tests_use_the_fixtures(venv, tmp_path):
    (tmp_path / "test_mine.py").write_text('''
import numpy as np

def test_my_floor(ane_task):
    record = ane_task("demo_boolq", {"acc": 0.8}, limit=20)
    assert record["metrics"]["acc,none"]["value"] >= 0.8

def test_my_logits(ane_model, ane_lm):
    ane_model.reset()
    assert np.isfinite(ane_model.infer(1, 0)).all() and ane_lm.eot_token_id is not None

def test_floor_too_high_fails(ane_task):
    ane_task("demo_arith_steps", {"acc": 0.99}, limit=20)
''')
    proc = run([venv / "bin" / "python", "-m", "pytest", "test_mine.py", "-p", "no:cacheprovider", "--output-dir", "out", "-q"],
               cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 failed, 2 passed" in proc.stdout and "demo_arith_steps did not pass" in proc.stdout
    assert "FAIL threshold" in (tmp_path / "out" / "summary.md").read_text()


@slow
def test_clone_with_the_plugin_installed_registers_options_once(venv, tmp_path):
    """The root conftest.py loads the plugin by the entry point's name; pytest skips it, so no 'option names
    already added' error, and --help lists --model-dir once."""
    clone = tmp_path / "clone"
    shutil.copytree(ROOT, clone, symlinks=True, ignore=SKIP)
    proc = run([venv / "bin" / "python", "-m", "pytest", "--help", "-p", "no:cacheprovider"], cwd=clone)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("--model-dir=MODEL_DIR") == 1
    proc = run([venv / "bin" / "python", "-m", "pytest", "evals", "--co", "-q", "-p", "no:cacheprovider"], cwd=clone)
    assert proc.returncode == 0 and "test_task[demo_boolq]" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
