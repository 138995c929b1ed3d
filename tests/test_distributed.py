"""Data-parallel evaluation: lm-eval's hooks over torch.distributed (gloo, loopback only), and a torchrun run of
multiple-choice, rolling and generation tasks giving exactly the single-process files."""
from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ane_eval.distributed import DistributedError, Group

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TASKS = "demo_arc_easy,demo_wikitext,demo_qa"  # multiple choice, rolling loglikelihood, generation
LIMIT = "3"  # odd: rank 0 gets 2 documents, rank 1 gets 1 and is padded by lm-eval
VOLATILE = {"date", "total_evaluation_time_seconds"}  # differ between any two runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "MASTER_ADDR": "127.0.0.1", **extra}


def test_single_process_hooks_are_lm_eval_defaults():
    import torch

    g = Group()
    assert (g.rank, g.world_size) == (0, 1)
    t = torch.tensor(7)
    assert g.all_gather(t) is t and g.gather_object({"a": 1}) == [{"a": 1}]  # lm_eval/api/model.py defaults


PEER = textwrap.dedent("""
    import json, sys, torch
    from ane_eval.distributed import DistributedError, Group
    g = Group(timeout=float(sys.argv[1]))
    out = {"gathered": g.all_gather(torch.tensor(g.rank + 3)).tolist(),
           "objects": g.gather_object({"rank": g.rank}, dst=0)}
    g.barrier()
    if g.rank == 1:
        print(json.dumps(out)); sys.exit(0)   # rank 1 leaves: rank 0's next collective must fail, not hang
    try:
        g.barrier()
    except DistributedError as e:
        out["error"] = str(e)
    print(json.dumps(out))
""")


def test_collectives_over_gloo_and_a_lost_rank_is_one_line():
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", PEER, "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=loopback_env(RANK=str(r), WORLD_SIZE="2", MASTER_PORT=port))
             for r in (0, 1)]
    start = time.monotonic()
    outs = [p.communicate(timeout=120) for p in procs]
    elapsed = time.monotonic() - start
    r0, r1 = (json.loads(o.strip().splitlines()[-1]) for o, _ in outs)
    # HFLM semantics: accelerate's gather of a 0-d tensor is one value per rank; gather_object: a list on dst only
    assert r0["gathered"] == r1["gathered"] == [3, 4]
    assert r0["objects"] == [{"rank": 0}, {"rank": 1}] and r1["objects"] is None
    assert "barrier failed" in r0["error"] and "\n" not in r0["error"]
    assert elapsed < 60  # a closed peer fails the collective at once, well before the 20 s timeout


def test_missing_peer_times_out_with_one_line(tmp_path):
    env = loopback_env(RANK="0", WORLD_SIZE="2", MASTER_PORT=str(free_port()))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ane_eval", "run", "--model", "demo", "--tasks", "demo_boolq",
                           "--dist-timeout", "3", "--output-dir", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ane-eval: error:")]
    assert len(errors) == 1 and "init_process_group failed" in errors[0], proc.stderr[-2000:]
    assert time.monotonic() - start < 120
    assert not list(tmp_path.iterdir())


def test_bad_launch_environment_is_one_line():
    os.environ["WORLD_SIZE"], os.environ["RANK"] = "2", "2"
    try:
        with pytest.raises(DistributedError, match="expected 0 <= RANK < WORLD_SIZE"):
            Group()
    finally:
        del os.environ["WORLD_SIZE"], os.environ["RANK"]


def _run_args(out: Path, cache: Path, model="demo") -> list[str]:
    return ["run", "--model", str(model), "--tasks", TASKS, "--limit", LIMIT, "--log-samples",
            "--output-dir", str(out), "--use-cache", str(cache)]


def _files(out: Path) -> dict:
    """Every file of a run, by name without lm-eval's timestamp, the results JSON without what differs anyway."""
    files = {}
    for path in sorted(out.rglob("*")):
        if not path.is_file():
            continue
        name = str(path.relative_to(out))
        stem = name.rsplit("_20", 1)[0] if "/results_" in name or "/samples_" in name else name
        text = path.read_bytes()  # the report's plots are PNG
        if "/results_" in name:
            data = json.loads(text)
            for key in VOLATILE:
                data.pop(key)
            data["config"].pop("use_cache")  # the cache path given on the command line
            text = json.dumps(data, sort_keys=True)
        files[stem] = text
    return files


def test_torchrun_gives_the_single_process_files(demo_dir, tmp_path):
    _assert_torchrun_matches_one_process("demo", tmp_path)


def _assert_torchrun_matches_one_process(model, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([sys.executable, "-m", "ane_eval", *_run_args(one, tmp_path / "c1" / "cache", model)],
                            capture_output=True, text=True, env=loopback_env(), timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    logs = tmp_path / "logs"
    multi = subprocess.run([*TORCHRUN, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                            str(free_port()), "--redirects", "3", "--log-dir", str(logs), "-m", "ane_eval",
                            *_run_args(two, tmp_path / "c2" / "cache", model)],
                           capture_output=True, text=True, env=loopback_env(), timeout=600)
    assert multi.returncode == 0, multi.stderr[-2000:]
    a, b = _files(one), _files(two)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], f"{name} differs between 1 and 2 processes"
    samples = [ln for name in a if "samples_" in name for ln in a[name].decode().splitlines()]
    assert len(samples) == 3 * int(LIMIT)
    # --use-cache: lm-eval keeps one cache per rank
    assert sorted(p.name for p in (tmp_path / "c2").iterdir()) == ["cache_rank0.db", "cache_rank1.db"]
    # rank 1 prints nothing (no errors happened)
    rank1 = [Path(p) for p in glob.glob(str(logs / "**" / "1" / "std*.log"), recursive=True)]
    assert rank1 and all(_noise_free(p.read_text()) == "" for p in rank1), [p.read_text()[:500] for p in rank1]


def _noise_free(text: str) -> str:
    # coremltools prints this on import on Linux (NOTES.md: harmless), before any ane-eval code runs
    return "\n".join(ln for ln in text.splitlines() if "_MLModelProxy" not in ln and "_MLCPU" not in ln).strip()


def _suite(out: Path, *extra: str, launcher=(sys.executable,), model="demo") -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, "-m", "pytest", "evals", "-q", "-p", "no:cacheprovider", "-k", "test_task",
                           "--model-dir", str(model), "--tasks", "demo_boolq,demo_wikitext", "--limit", "2",
                           "--output-dir", str(out), "--update-baseline", *extra], capture_output=True, text=True, env=loopback_env(),
                          timeout=600, cwd=Path(__file__).parents[1])


def test_xdist_workers_report_every_task_once(demo_dir, tmp_path):
    """`pytest evals -n 2`: the controller's summary, baseline and table are the single-process ones."""
    _assert_xdist_matches_one_process("demo", tmp_path)


def _assert_xdist_matches_one_process(model, tmp_path):
    one, two = _suite(tmp_path / "one", model=model), _suite(tmp_path / "two", "-n", "2", model=model)
    assert one.returncode == 0 and two.returncode == 0, (one.stdout[-1500:], two.stdout[-1500:])
    for name in ("summary.md", "baseline.json"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text(), name

    def table(out: str) -> list[str]:
        return [ln for ln in out.splitlines() if ln.startswith("demo_")]

    assert table(two.stdout) == table(one.stdout) and len({ln.split()[0] for ln in table(two.stdout)}) == 2


@pytest.mark.slow
def test_torchrun_suite_gates_on_rank_0(demo_dir, tmp_path):
    """`torchrun -m pytest evals`: documents split, rank 0's summary and baseline are the single-process ones."""
    two = [*TORCHRUN, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    one, split = _suite(tmp_path / "one"), _suite(tmp_path / "two", launcher=two)
    assert one.returncode == 0 and split.returncode == 0, (one.stdout[-1500:], split.stdout[-1500:])
    for name in ("summary.md", "baseline.json"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text(), name
    assert split.stdout.count("ane-eval: summary written") == 1  # rank 1 neither gates nor reports


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Qwen2 (qkv bias, fp16) and Qwen3 (q/k norm, LUT4) as the converter builds them, at the demo's geometry (the
    Llama case is the demo itself)."""
    from ane_eval import demo
    from ane_eval.convert import BuildOptions, build

    from .conftest import write_checkpoint

    root = tmp_path_factory.mktemp("converted")
    out = {}
    for kind, extra, lut in (("qwen2", {"bias": True}, None), ("qwen3", {"qk_norm": True}, 4)):
        ckpt = write_checkpoint(root / f"{kind}-ckpt", model_type=kind, layers=2, seed=5, **extra)
        out[kind] = build(ckpt, root / kind, BuildOptions(**{**demo.BUILD_OPTIONS, "lut_ffn": lut, "lut_lmhead": lut}))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_converted_models_split_like_one_process(converted, kind, tmp_path):
    """The same two checks as above on converted Qwen models: torchrun `run` files and `pytest evals -n 2`."""
    _assert_torchrun_matches_one_process(converted[kind], tmp_path / "run")
    _assert_xdist_matches_one_process(converted[kind], tmp_path / "suite")


@pytest.mark.parametrize("backend, warned", [("auto", True), ("mil", False)])
def test_parallel_workers_on_coreml_are_warned(backend, warned):
    """On a Mac (emulated: tests/coreml_emulator.py) `-n 2` workers share one Neural Engine: the controller warns;
    on the portable runtime it does not. --collect-only: the warning comes at configure time, no model is loaded."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.coreml_emulator", "evals", "-n", "2",
                           "--backend", backend, "--collect-only", "-q", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, env=loopback_env(), timeout=300, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stdout[-1500:]
    assert ("-n 2 on CoreML: the processes share this Mac's one Neural Engine" in proc.stdout) is warned
