"""Data-parallel speed-up: wall time of one `ane-eval run` on 1 process and under torchrun on 2 (loopback), on the
same task set. Both include process start and model load, as a user sees them. The ratio lands in extra_info;
nothing asserts on time (the cores may be shared: on 2 cores expect < 2x).
    .venv/bin/pytest tests/bench/test_distributed_bench.py -m slow --benchmark-enable -s
"""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.test_distributed import TORCHRUN, free_port, loopback_env

TASKS = "demo_boolq,demo_arc_easy,demo_wikitext,demo_qa"
LIMIT = "20"


def _run(tmp_path, name: str, launcher: list[str], limit: str = LIMIT) -> float:
    out = tmp_path / name
    start = time.perf_counter()
    proc = subprocess.run([*launcher, "-m", "ane_eval", "run", "--model", "demo", "--tasks", TASKS, "--limit", limit,
                           "--output-dir", str(out)], capture_output=True, text=True, env=loopback_env())
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    return elapsed


@pytest.mark.slow
def test_two_processes_vs_one(benchmark, demo_dir, tmp_path):
    two = [*TORCHRUN, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    _run(tmp_path, "warm-up", [sys.executable], limit="1")  # first-use costs (datasets' cache) hit neither side
    one_s = _run(tmp_path, "one", [sys.executable])
    two_s = benchmark.pedantic(lambda: _run(tmp_path, "two", two), rounds=1, iterations=1)
    benchmark.extra_info.update({"tasks": TASKS, "limit": int(LIMIT), "one_process_s": round(one_s, 2),
                                 "two_processes_s": round(two_s, 2), "speedup": round(one_s / two_s, 3)})
    print(f"\n1 process {one_s:.1f} s, 2 processes {two_s:.1f} s: {one_s / two_s:.2f}x")
