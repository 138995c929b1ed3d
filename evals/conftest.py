"""Fixtures of the evals suite: the model loaded once per session, state reset for every test, the suite's tasks
as parametrized cases, and the session's report (markdown summary, baseline) written at the end.

Scaling out: under torchrun every process runs every test and lm-eval splits each task's documents over them
(ANELM's data-parallel hooks); rank 0 gates and reports. Under pytest-xdist (`-n N`) the task cases are spread over
workers; each worker hands its rows and records to the controller (xdist's workeroutput), which writes the one
summary, baseline and table."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from ane_eval import gate
from ane_eval.suite import Suite, TaskSpec, default_suite, load_suite


class Session:
    """Settings from the command line plus what the run accumulates for the report."""

    def __init__(self, config):
        opt = config.getoption
        self.model_arg = opt("model_dir")
        self.is_demo = self.model_arg == "demo"
        self.backend, self.precision, self.compute_units = opt("backend"), opt("precision"), opt("compute_units")
        self.output_dir = Path(opt("output_dir"))
        self.baseline_path = opt("baseline")
        self.update_baseline = opt("update_baseline")
        self.allow_missing = opt("allow_missing_data")
        self.limit, self.num_fewshot = opt("limit"), opt("num_fewshot")
        if self.limit is not None and float(self.limit).is_integer():
            self.limit = int(self.limit)
        self.seed, self.max_tokens, self.chat = opt("seed"), opt("max_tokens"), opt("apply_chat_template")
        suite_path = opt("suite") or default_suite(self.is_demo)
        self.suite: Suite = load_suite(suite_path)
        self.include_paths = [*self.suite.include_paths, *map(Path, opt("include_path"))]
        names = opt("tasks")
        if names:
            self.tasks = [self.suite.spec(n.strip()) for n in names.replace(",", " ").split()]
        else:
            self.tasks = list(self.suite.tasks)
        self.rows: list = []
        self.records: dict = {}
        self.failed = False
        self._baseline = None
        self.dist_timeout = opt("dist_timeout")

    def baseline(self):
        """The baseline to gate against; None when there is none yet and this run is to create it."""
        if self._baseline is None and self.baseline_path:
            if Path(self.baseline_path).exists() or not self.update_baseline:
                self._baseline = gate.load_baseline(self.baseline_path)
        return self._baseline


def pytest_configure(config):
    config.addinivalue_line("markers", "ane_task(name): an lm-eval task case of the evals suite")
    _warn_shared_engine(config)


def _warn_shared_engine(config) -> None:
    """Parallel processes on CoreML share the Mac's one Neural Engine: they queue for it (or fail busy)."""
    workers = config.getoption("numprocesses", None) or 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if (workers or local > 1) and not _is_worker(config) and _uses_coreml(config):
        count = f"-n {workers}" if workers else f"{local} torchrun processes"
        config.issue_config_time_warning(pytest.PytestConfigWarning(
            f"ane-eval: {count} on CoreML: the processes share this Mac's one Neural Engine, so they wait for "
            "each other (or fail with 'resource busy'); expect little speed-up"), stacklevel=2)


def _uses_coreml(config) -> bool:
    backend = config.getoption("backend")
    if backend != "auto":
        return backend == "coreml"
    from ane_eval.backends import coreml_available

    return bool(coreml_available()[0])


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")  # set by xdist on its workers


def _session(config) -> Session:
    if not hasattr(config, "_ane_session"):
        config._ane_session = Session(config)
    return config._ane_session


def pytest_generate_tests(metafunc):
    if "task_spec" in metafunc.fixturenames:
        specs = _session(metafunc.config).tasks
        metafunc.parametrize("task_spec", specs, ids=[t.name for t in specs])
    if "tensor_key" in metafunc.fixturenames:
        try:
            expected, declared = _contract_view(metafunc.config)
        except (ValueError, OSError) as e:  # reported by the test, in one line, not as a collection traceback
            metafunc.parametrize("tensor_key", [str(e).splitlines()[0]], ids=["model-unavailable"])
            return
        keys = sorted(set(expected) | set(declared))
        metafunc.parametrize("tensor_key", keys, ids=["-".join(k) for k in keys])


def _contract_view(config) -> tuple[dict, dict]:
    """(expected, declared) tensor interfaces of the model directory, from its specs alone (no model load), so
    the contract tests can be parametrized one per part, function and tensor at collection time."""
    s = _session(config)
    if not hasattr(s, "contract_view"):
        s.contract_view = _read_contract_view(s)
    return s.contract_view


def _read_contract_view(s) -> tuple[dict, dict]:
    from ane_eval import contract
    from ane_eval.backends import coreml_available
    from ane_eval.bundle import discover, load_tokenizer
    from ane_eval.cli import resolve_model

    bundle = discover(resolve_model(s.model_arg), backend="coreml" if coreml_available()[0] else "mil")
    parts = contract.describe_parts(bundle)
    geometry = contract.cross_check(bundle, parts, len(load_tokenizer(bundle)))
    return contract.expected_interface(geometry, len(bundle.chunks)), contract.declared_interface(parts)


@pytest.fixture(scope="session")
def contract_view(request) -> tuple[dict, dict]:
    try:
        return _contract_view(request.config)
    except (ValueError, OSError) as e:
        pytest.fail(str(e).splitlines()[0], pytrace=False)


@pytest.fixture(scope="session")
def ane_session(request) -> Session:
    return _session(request.config)


@pytest.fixture(scope="session")
def model_dir(ane_session) -> Path:
    from ane_eval.cli import resolve_model

    return resolve_model(ane_session.model_arg)


def _stop(error: Exception):
    """A model that cannot be loaded stops the session with one line, not a traceback per test."""
    pytest.exit(f"ane-eval: {str(error).splitlines()[0]}", returncode=2)


@pytest.fixture(scope="session")
def ane_model(ane_session, model_dir):
    """Loaded once per session (loading compiles/plans every part)."""
    import ane_eval

    try:
        return ane_eval.load_model(model_dir, backend=ane_session.backend, precision=ane_session.precision,
                                   compute_units=ane_session.compute_units)
    except (ValueError, OSError, RuntimeError) as e:
        _stop(e)


@pytest.fixture(scope="session")
def model_info(ane_model):
    from ane_eval.bundle import model_info as info

    return info(ane_model.bundle)


@pytest.fixture(scope="session")
def ane_lm(ane_model, ane_session):
    from ane_eval.harness import ANELM

    return ANELM(model=ane_model, seed=ane_session.seed, dist_timeout=ane_session.dist_timeout)


@pytest.fixture(scope="session")
def task_manager(ane_session):
    from ane_eval.runner import task_manager as make

    return make(ane_session.include_paths)


@pytest.fixture()
def model(ane_model):
    """The session's model with a clean state: nothing from an earlier test can leak into this one."""
    ane_model.reset()
    yield ane_model
    ane_model.reset()


@pytest.fixture()
def task_case(task_spec: TaskSpec, ane_session: Session):
    """The effective settings of one task case (command line over suite file)."""
    return TaskSpec(task_spec.name,
                    ane_session.num_fewshot if ane_session.num_fewshot is not None else task_spec.num_fewshot,
                    ane_session.limit if ane_session.limit is not None else task_spec.limit,
                    task_spec.thresholds)


def pytest_benchmark_update_machine_info(config, machine_info):
    from ane_eval.backends import chip_name

    machine_info["chip"] = chip_name()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """On the xdist controller: take a worker's rows and records (what its task tests produced)."""
    out = getattr(node, "workeroutput", {}).get("ane_eval")
    if not out:
        return
    s = _session(node.config)
    s.rows.extend(gate.Row(**row) for row in out["rows"])
    s.records.update(out["records"])
    s.failed = s.failed or out["failed"]


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    s = getattr(config, "_ane_session", None)
    if _is_worker(config):  # the controller writes the report, once, for every worker's tasks
        if s is not None and s.rows:
            config.workeroutput["ane_eval"] = {"rows": [dict(r.__dict__) for r in s.rows], "records": s.records,
                                               "failed": s.failed}
        return
    if s is None or not s.rows:
        return
    order = {t.name: i for i, t in enumerate(s.tasks)}  # the suite's order, however workers finished
    s.rows.sort(key=lambda r: order.get(r.task, len(order)))
    s.records = dict(sorted(s.records.items(), key=lambda kv: order.get(kv[0], len(order))))
    model = s.records and next(iter(s.records.values())).get("model", {}) or {}
    summary = gate.write_summary(s.output_dir / "summary.md", s.rows, model, s.backend)
    lines = [f"ane-eval: summary written to {summary}"]
    if s.update_baseline:
        if exitstatus == 0 and not s.failed:
            target = Path(s.baseline_path) if s.baseline_path else s.output_dir / "baseline.json"
            gate.write_baseline(target, s.records, model)
            lines.append(f"ane-eval: baseline written to {target}")
        else:
            lines.append("ane-eval: baseline NOT updated: the run did not pass")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        reporter.write_line(gate.format_table(s.rows))
        for line in lines:
            reporter.write_line(line)
