"""The evals suite as a pytest plugin (entry point `pytest11`): its command-line options, the fixtures a test
needs to evaluate an ANE model, and the run's report (summary.md, report.html, baseline) at the end.

After `pip install ane-eval`, from any directory:

    pytest --pyargs ane_eval.evals --model-dir DIR -k boolq     # the suite itself
    pytest my_checks.py --model-dir DIR                         # your own tests, with these fixtures:

    def test_boolq_floor(ane_task):
        record = ane_task("boolq", limit=200, thresholds={"acc": 0.7})   # fails the test below the floor
    def test_logits(ane_model):                                          # loaded once per session
        ane_model.reset(); ane_model.infer(1, 0)

Fixtures: `ane_session` (settings), `ane_model_dir`, `ane_model`, `ane_model_info`, `ane_lm` (lm-eval model),
`ane_task_manager`, `ane_task` (run one lm-eval task, gate it, add it to the report).
In a clone of the repository the root conftest.py loads this module under the same name, so pytest registers it
(and its options) once whether or not the package is installed.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from . import gate
from .suite import Suite, default_suite, load_suite


def offline_defaults() -> None:
    """Nothing in the suite may reach a hub at test time (set before HF libraries are imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def add_options(parser) -> None:
    g = parser.getgroup("ane-eval", "ane-eval suite (pytest evals)")
    g.addoption("--model-dir", default="demo", help="ANEMLL model directory (default: the embedded demo model)")
    g.addoption("--backend", default="auto", choices=["auto", "coreml", "mil"], help="runtime (default: auto)")
    g.addoption("--precision", default="fp16", choices=["fp16", "fp32"], help="portable runtime numerics")
    g.addoption("--compute-units", default="CPU_AND_NE", help="CoreML compute units (default CPU_AND_NE)")
    g.addoption("--tasks", default=None, help="comma-separated task names (default: the suite's tasks)")
    g.addoption("--suite", default=None, help="suite YAML (default: evals/suites/demo.yaml for the demo model, "
                                               "default.yaml otherwise)")
    g.addoption("--include-path", action="append", default=[], help="directory of task YAMLs (repeatable)")
    g.addoption("--limit", type=float, default=None, help="documents per task (overrides the suite)")
    g.addoption("--num-fewshot", type=int, default=None, help="few-shot examples (overrides the suite)")
    g.addoption("--batch-size", default="1", help="accepted for compatibility; ANE models run requests serially")
    g.addoption("--seed", type=int, default=1234, help="random seed for few-shot sampling and generation")
    g.addoption("--max-tokens", type=int, default=None, help="max tokens to generate (generation tasks)")
    g.addoption("--apply-chat-template", action="store_true", help="format prompts with the model's chat template")
    g.addoption("--output-dir", default="results",
                help="where results, samples, summary.md, report.html and baseline go")
    g.addoption("--baseline", default=None, help="baseline JSON to gate regressions against")
    g.addoption("--update-baseline", action="store_true",
                help="write the baseline (to --baseline, else OUTPUT_DIR/baseline.json) if the run passed")
    g.addoption("--dist-timeout", type=float, default=None,
                help="under torchrun: seconds every collective may wait (default 3600 or $ANE_EVAL_DIST_TIMEOUT)")
    g.addoption("--allow-missing-data", action="store_true",
                help="skip (instead of fail) tasks whose dataset cannot be reached")
    # fidelity against the source model (ane_eval/fidelity.py; evals/test_fidelity.py, tasks' source columns)
    g.addoption("--reference", default=None, metavar="REF",
                help="the source Hugging Face checkpoint (adds test_fidelity and runs every task on it with "
                     "lm-eval's HF backend, cached) or a reference file from `ane-eval fidelity --save-reference`")
    g.addoption("--fidelity-text", action="append", default=[], metavar="FILE",
                help="text scored by test_fidelity (repeatable; default: the suite's fidelity: text)")
    g.addoption("--fidelity-max-tokens", type=int, default=None,
                help="tokens scored by test_fidelity, one infer each (default: the suite's fidelity: max_tokens)")


def pytest_addoption(parser):
    add_options(parser)


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
        self.dist_timeout = opt("dist_timeout")
        suite_path = opt("suite") or default_suite(self.is_demo)
        self.suite: Suite = load_suite(suite_path)
        self.include_paths = [*self.suite.include_paths, *map(Path, opt("include_path"))]
        names = opt("tasks")
        if names:
            self.tasks = [self.suite.spec(n.strip()) for n in names.replace(",", " ").split()]
        else:
            self.tasks = list(self.suite.tasks)
        self.reference_arg = opt("reference")
        fid = self.suite.fidelity
        self.fidelity_texts = [Path(t) for t in opt("fidelity_text")] or fid.get("text", [])
        self.fidelity_max_tokens = opt("fidelity_max_tokens") or fid.get("max_tokens")
        self.fidelity_thresholds = fid.get("thresholds", {})
        self.rows: list = []
        self.records: dict = {}
        # For the report: a reference model's value per task and metric, and per-token KL divergences, when a
        # fidelity run provides them (report.ReportData documents the shapes).
        self.reference: dict = {}
        self.kld: list = []
        self.failed = False
        self.backend_used = self.backend  # replaced by what `auto` resolved to once the model loads
        self._baseline = None

    def baseline(self):
        """The baseline to gate against; None when there is none yet and this run is to create it."""
        if self._baseline is None and self.baseline_path:
            if Path(self.baseline_path).exists() or not self.update_baseline:
                self._baseline = gate.load_baseline(self.baseline_path)
        return self._baseline


def session_of(config) -> Session:
    if not hasattr(config, "_ane_session"):
        config._ane_session = Session(config)
    return config._ane_session


@pytest.fixture(scope="session")
def ane_session(request) -> Session:
    return session_of(request.config)


@pytest.fixture(scope="session")
def ane_model_dir(ane_session) -> Path:
    from .model import resolve_model

    return resolve_model(ane_session.model_arg)


def _stop(error: Exception):
    """A model that cannot be loaded stops the session with one line, not a traceback per test."""
    pytest.exit(f"ane-eval: {str(error).splitlines()[0]}", returncode=2)


class ModelLoader:
    """The session's model, loaded once, on first use: the first load in the process is the one test_load_time
    times (a Mac compiles every package then), and no second copy is ever loaded beside it."""

    def __init__(self, session: Session, model_dir: Path):
        self.session, self.model_dir, self.model = session, model_dir, None

    def load(self):
        from .model import load_model

        if self.model is None:
            s = self.session
            try:
                self.model = load_model(self.model_dir, backend=s.backend, precision=s.precision,
                                        compute_units=s.compute_units)
            except (ValueError, OSError, RuntimeError) as e:
                _stop(e)
            s.backend_used = self.model.backend_impl.describe()  # what `auto` resolved to, for the report
        return self.model


@pytest.fixture(scope="session")
def ane_model_loader(ane_session, ane_model_dir) -> ModelLoader:
    return ModelLoader(ane_session, ane_model_dir)


@pytest.fixture(scope="session")
def ane_model(ane_model_loader):
    """Loaded once per session (loading compiles/plans every part)."""
    return ane_model_loader.load()


@pytest.fixture(scope="session")
def ane_model_info(ane_model):
    from .bundle import model_info

    return model_info(ane_model.bundle)


@pytest.fixture(scope="session")
def ane_lm(ane_model, ane_session):
    from .harness import ANELM

    return ANELM(model=ane_model, seed=ane_session.seed, dist_timeout=ane_session.dist_timeout)


@pytest.fixture(scope="session")
def ane_task_manager(ane_session):
    from .runner import task_manager

    return task_manager(ane_session.include_paths)


@pytest.fixture(scope="session")
def ane_reference(ane_session):
    """The --reference (checkpoint or stored file), loaded once; None without --reference."""
    if not ane_session.reference_arg:
        return None
    from . import fidelity

    try:
        return fidelity.load_reference(ane_session.reference_arg)
    except fidelity.FidelityError as e:
        _stop(e)


@pytest.fixture(scope="session")
def ane_source_lm(ane_reference, ane_model, ane_session):
    """lm-eval's own HF backend on the reference checkpoint (None without one), with the model's context as its
    max_length so requests truncate and roll identically, and the cache path for lm-eval's CachingLM (keyed by
    the checkpoint's files: a rerun on the same checkpoint costs no model call)."""
    if ane_reference is None or ane_reference.stored:
        return None
    import hashlib

    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    ref = ane_reference
    tokenizer = AutoTokenizer.from_pretrained(ref.path, local_files_only=True, trust_remote_code=False)
    lm = HFLM(pretrained=ref.model, tokenizer=tokenizer, batch_size=1, max_length=ane_model.context_length)
    h = hashlib.sha256(f"{ane_model.context_length} fp32 {ref.device}".encode())
    for f in sorted(p for p in ref.path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(ref.path)} {st.st_size} {st.st_mtime_ns}".encode())
    return lm, str(ane_session.output_dir / "source-cache" / f"{ref.path.name}-{h.hexdigest()[:16]}")


@pytest.fixture()
def ane_task(ane_session, ane_lm, ane_model, ane_model_info, ane_task_manager, ane_source_lm):
    """`ane_task(name, thresholds=None, limit=None, num_fewshot=None) -> record`: runs the lm-eval task on the
    model (from a reset state), writes lm-eval's result files, gates it against the thresholds and the session's
    baseline, adds it to the summary and report, and fails the test with the verdict table if it did not pass.
    Under torchrun the task's documents are split over the processes: only rank 0 (which gets the gathered results)
    gates, reports and returns the record; the other ranks return None."""
    from . import runner
    from .harness import NoDistributionError

    s = ane_session

    def run(name: str, thresholds: dict | None = None, limit=None, num_fewshot=None) -> dict:
        ane_model.reset()
        settings = dict(num_fewshot=num_fewshot, limit=limit, apply_chat_template=s.chat,
                        max_gen_toks=s.max_tokens, seed=s.seed)
        try:
            runner.resolve_tasks(ane_task_manager, [name])
            results = runner.evaluate(ane_lm, [name], ane_task_manager, model_name=ane_model_info["name"],
                                      output_dir=s.output_dir, **settings)
            # the same requests through lm-eval's HF backend on the source checkpoint (--reference), cached
            source = None if ane_source_lm is None or results is None else runner.evaluate(
                ane_source_lm[0], [name], ane_task_manager, use_cache=ane_source_lm[1], **settings)
        except runner.TaskError as e:
            if s.allow_missing:
                pytest.skip(str(e))
            pytest.fail(str(e), pytrace=False)
        except NoDistributionError as e:  # an argmax LM head: the task is refused, never scored wrongly
            refused = str(e)
        except Exception as e:
            if ane_lm.world_size > 1:  # the other ranks wait in this task's collectives: stop, so theirs fail at once
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                pytest.exit(f"ane-eval: rank {ane_lm.rank}: {name}: {first}", returncode=2)
            raise
        else:
            refused = None
        finally:
            ane_model.reset()
        if refused:
            pytest.fail(refused, pytrace=False)
        if results is None:  # a rank > 0 under torchrun: its share went to rank 0, which gates and reports
            return None
        record = gate.task_record(results, name, limit=limit, model=ane_model_info,
                                  samples=results["samples"].get(name))
        baseline = s.baseline()
        base_record = (baseline or {}).get("tasks", {}).get(name)
        try:
            rows = gate.evaluate_gate(name, record, thresholds, base_record, s.suite.tolerance, s.suite.z,
                                      relative_tolerance=s.suite.relative_tolerance)
        except gate.GateError as e:
            s.failed = True
            pytest.fail(str(e), pytrace=False)
        if source is not None:
            source_record = gate.task_record(source, name, limit=limit, samples=source["samples"].get(name))
            gate.against_source(rows, record, source_record)
            s.reference[name] = {r.metric: r.source for r in rows if r.source is not None}
        if baseline is not None and base_record is None:
            rows[0].notes.append(f"{name}: not in the baseline {s.baseline_path}; no regression check")
        s.rows.extend(rows)
        s.records[name] = record
        if any(r.failed for r in rows):
            s.failed = True
            pytest.fail(f"{name} did not pass:\n{gate.format_table(rows)}", pytrace=False)
        return record

    return run


def _benchmarks(config) -> list[dict]:
    """This session's pytest-benchmark results as in its JSON (stats are empty under --benchmark-disable).
    pytest-benchmark keeps them on config._benchmarksession (its own hooks read it there; no public accessor)."""
    bs = getattr(config, "_benchmarksession", None)
    return [b.as_dict(include_data=False) for b in getattr(bs, "benchmarks", []) if b]


@pytest.hookimpl(trylast=True)  # after other plugins' configure: one may set up the platform (tests.coreml_emulator)
def pytest_configure(config):
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
    from .backends import coreml_available

    return bool(coreml_available()[0])


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")  # set by pytest-xdist on its workers


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """On the pytest-xdist controller: take what a worker's tests produced (its rows, records, reference values
    and KL divergences), so the controller writes one summary, report and baseline for every worker's tasks."""
    out = getattr(node, "workeroutput", {}).get("ane_eval")
    if not out:
        return
    s = session_of(node.config)
    s.rows.extend(gate.Row(**row) for row in out["rows"])
    s.records.update(out["records"])
    s.reference.update(out["reference"])
    s.kld.extend(out["kld"])
    s.failed = s.failed or out["failed"]
    s.backend_used = out["backend_used"]


def _hand_to_controller(config, s: Session) -> None:
    """On a pytest-xdist worker: its results go to the controller (workeroutput travels over execnet, so plain
    lists, dicts, floats and strings only)."""
    if s.rows or s.kld:
        config.workeroutput["ane_eval"] = {
            "rows": [dict(r.__dict__) for r in s.rows], "records": s.records, "reference": s.reference,
            "kld": [float(x) for x in s.kld], "failed": s.failed, "backend_used": s.backend_used}


def pytest_sessionfinish(session, exitstatus):
    s = getattr(session.config, "_ane_session", None)
    if _is_worker(session.config):  # the controller writes the report, once, for every worker's tasks
        if s is not None:
            _hand_to_controller(session.config, s)
        return
    if s is None or not s.rows:
        return
    # the suite's order, however the workers finished (rows of other tests, e.g. fidelity, first, as in one process)
    order = {t.name: i for i, t in enumerate(s.tasks)}
    s.rows.sort(key=lambda r: order.get(r.task, -1))
    s.records = dict(sorted(s.records.items(), key=lambda kv: order.get(kv[0], -1)))
    from .report import ReportData, write_report

    model = s.records and next(iter(s.records.values())).get("model", {}) or {}
    data = ReportData(s.rows, s.records, model, s.backend_used, baseline=(s.baseline() or {}).get("tasks"),
                      reference=s.reference, kld=s.kld, benchmarks=_benchmarks(session.config))
    page, images = write_report(s.output_dir, data)
    summary = gate.write_summary(s.output_dir / "summary.md", s.rows, model, s.backend_used, images)
    lines = [f"ane-eval: summary written to {summary}, report to {page}"]
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
