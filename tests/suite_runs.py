"""Test-only: `pytest evals` on several model directories in one process, one pytest session per directory.

Each session is the suite as a user runs it (`pytest.main(["evals", "--model-dir", DIR, ...])`: its own options,
fixtures, model load and report) and writes a JUnit XML file the tests read the outcomes from. Sharing the process
pays once for what costs more than a tiny model's whole suite: the imports (coremltools, torch, transformers,
lm-eval) and lm-eval's index of its ~10,000 task YAMLs (`TaskManager`, ~13 s here per session). The index is built
once per set of include paths and handed to every session; it is the same index each session would build (lm-eval
loads each task's config afresh from it in `simple_evaluate`), so nothing measured changes.

    python -m tests.suite_runs [--emulated-mac] RUNS.json
        RUNS.json: [{"args": [pytest evals arguments], "junit": "path.xml"}, ...]; each run's exit status is
        written back into it ("exit": 0 all passed, 1 some failed, 2 the session stopped early, ...)
    outcomes("path.xml") -> {"test_contracts.py::test_tensor[...]": ("passed" | "failed" | "skipped", message)}

`--emulated-mac` makes the whole process an emulated Apple silicon Mac first (tests/coreml_emulator.py), so
`--backend auto` resolves to coreml in every session.
"""
from __future__ import annotations

import functools
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '').rsplit('.', 1)[-1]}.py::{case.get('name')}"
        result = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        if result is None:
            out[test_id] = ("passed", "")
        else:
            out[test_id] = ("skipped" if result.tag == "skipped" else "failed",
                            " ".join(filter(None, (result.get("message"), result.text))))
    return out


def main(argv: list[str]) -> int:
    import pytest

    from ane_eval import runner

    if argv[0] == "--emulated-mac":
        from tests import coreml_emulator

        coreml_emulator.activate(pytest.MonkeyPatch())
        argv = argv[1:]
    runs = json.loads(Path(argv[0]).read_text())
    index = functools.lru_cache(maxsize=None)(runner.task_manager)
    runner.task_manager = lambda include_paths=(): index(tuple(include_paths))
    for run in runs:
        run["exit"] = int(pytest.main(["evals", "-q", "-p", "no:cacheprovider", "--junitxml", run["junit"],
                                       *map(str, run["args"])]))
    Path(argv[0]).write_text(json.dumps(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
