"""Running lm-eval tasks on an ANE model and writing lm-eval's own result files (shared by the suite and the CLI)."""
from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path

log = logging.getLogger("ane_eval")


class TaskError(ValueError):
    """An unknown task, or a task whose data cannot be reached: one readable line."""


def task_manager(include_paths=()):
    """lm-eval's TaskManager with the demo tasks and the user's include paths."""
    from lm_eval.tasks import TaskManager

    from .demo.tasks import tasks_dir

    paths = [str(tasks_dir())]
    for p in include_paths:
        if not Path(p).is_dir():
            raise TaskError(f"--include-path {p}: no such directory of task YAMLs")
        paths.append(str(Path(p).resolve()))
    return TaskManager(include_path=paths)


def resolve_tasks(tm, names) -> list[str]:
    """Split comma/space separated names and check each exists, suggesting close matches."""
    wanted = [n for chunk in names for n in str(chunk).replace(",", " ").split() if n]
    if not wanted:
        raise TaskError("no tasks given; pass task names such as demo_boolq or arc_easy")
    known = set(tm.all_tasks)
    unknown = [n for n in wanted if n not in known]
    if unknown:
        parts = []
        for n in unknown:
            close = difflib.get_close_matches(n, known, n=3, cutoff=0.6)
            parts.append(f"{n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise TaskError(f"unknown task {'; '.join(parts)}; list tasks with `lm-eval ls tasks` or add your YAMLs "
                        "with --include-path")
    return wanted


def evaluate(lm, tasks: list[str], tm, *, num_fewshot=None, limit=None, apply_chat_template=False,
             max_gen_toks=None, seed: int = 1234, use_cache: str | None = None,
             bootstrap_iters: int = 1000, output_dir=None, write_samples: bool = True,
             model_name: str = "ane") -> dict:
    """lm_eval.simple_evaluate on the ane model; with `output_dir`, lm-eval's results JSON and per-task samples
    JSONL are written there (by lm-eval's EvaluationTracker, as its CLI does). A task whose dataset cannot be
    reached raises TaskError. Under torchrun, lm-eval splits the documents over the ranks and returns the
    results on rank 0 only: None elsewhere."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker(output_path=str(output_dir)) if output_dir else None
    gen_kwargs = {"max_gen_toks": int(max_gen_toks)} if max_gen_toks else None
    try:
        refuse_unscorable(lm, tasks, tm)
        results = lm_eval.simple_evaluate(
            model=lm, model_args=f"model={model_name}", tasks=list(tasks), task_manager=tm,
            num_fewshot=num_fewshot, limit=limit, apply_chat_template=apply_chat_template,
            fewshot_as_multiturn=bool(apply_chat_template), gen_kwargs=gen_kwargs, log_samples=True,
            bootstrap_iters=bootstrap_iters, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed, use_cache=use_cache, evaluation_tracker=tracker)
    except Exception as e:  # datasets/hub errors have many classes; only data-access failures are translated
        if _is_data_error(e):
            offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
            hint = ("offline mode is on and the dataset is not in the local cache: run once with network access to "
                    "cache it, or use a local task (dataset_path: json)") if offline else "check the dataset path"
            raise TaskError(f"cannot load the data of {', '.join(tasks)}: {str(e).splitlines()[0]} ({hint})") from None
        raise
    if results is not None and getattr(lm, "world_size", 1) > 1:
        restore_document_order(results, tm, bootstrap_iters)
        shots = sorted(t for t, n in (results.get("n-shot") or {}).items() if n)
        if shots:  # lm-eval draws few-shot examples from one seeded stream per rank (lm_eval/api/task.py TODO)
            log.warning("ane: %s: few-shot examples under %d processes differ from a single-process run's "
                        "(lm-eval samples them per rank); metrics agree statistically, not exactly",
                        ", ".join(shots), lm.world_size)
    if tracker is not None and results is not None:  # None: a rank > 0 of a data-parallel run
        _save(results, tracker, write_samples)
    return results


def refuse_unscorable(lm, tasks, tm) -> None:
    """A model without a distribution (an argmax LM head) refuses loglikelihood, multiple-choice and rolling tasks
    before any request of any task runs: lm-eval runs request types one after another, so without this a
    generation task listed first would run before the refusal."""
    if getattr(lm, "has_distribution", True):
        return
    from .harness import SCORED_OUTPUT_TYPES, no_distribution

    loaded = tm.load(list(tasks))["tasks"]
    scored = sorted(n for n, t in loaded.items() if t.OUTPUT_TYPE in SCORED_OUTPUT_TYPES)
    if scored:
        raise no_distribution(lm.model, f"the task(s) {', '.join(scored)}")


def restore_document_order(results: dict, tm, bootstrap_iters: int) -> None:
    """Make a data-parallel run's results those of one process. lm-eval's evaluate() gives rank r the documents
    r, r+W, ... and concatenates the gathered shares rank after rank, so samples come out in another order (and the
    samples' task hashes with them) and sums over documents (perplexities) differ in the last bits; and a rank with
    fewer documents is padded with copies of its last request, whose responses land on that same request (so its
    sample lists them twice). Samples are put back in document order (within each filter, filters in their order)
    with `repeats` responses per request, and each task's metrics are aggregated again from those per-document
    values with lm-eval's own aggregation (the function evaluate() uses; lm-eval is pinned). Group aggregates stay
    lm-eval's, computed from the rank-ordered lists."""
    from collections import defaultdict

    from lm_eval.evaluator_utils import _compute_task_aggregations
    from lm_eval.tasks import get_task_dict

    samples = results.get("samples") or {}
    leaves = [t for t in samples if t in results.get("results", {}) and t not in results.get("groups", {})]
    quiet = logging.getLogger("lm_eval")  # building the tasks again repeats their config warnings
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        tasks = get_task_dict(leaves, tm) if leaves else {}
    finally:
        quiet.setLevel(level)
    for name in samples:
        filters = list(dict.fromkeys(s["filter"] for s in samples[name]))
        samples[name].sort(key=lambda s: (filters.index(s["filter"]), s["doc_id"]))
        repeats = int(results.get("configs", {}).get(name, {}).get("repeats") or 1)
        for s in samples[name]:
            s["resps"] = [r[:repeats] for r in s["resps"]]
        task = tasks.get(name)
        if task is None:
            continue
        raw = defaultdict(list)
        for s in samples[name]:  # the per-document values evaluate() appended, now in document order
            for metric in s["metrics"]:
                raw[(metric, s["filter"])].append(s[metric])
        aggregated, _ = _compute_task_aggregations(task, raw, bootstrap_iters)
        results["results"][name].update(aggregated)


def _is_data_error(e: Exception) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    if names & {"DatasetNotFoundError", "DataFilesNotFoundError", "ConnectionError", "OfflineModeIsEnabled",
                "LocalEntryNotFoundError", "HFValidationError", "EmptyDatasetError"}:
        return True
    text = str(e)
    return isinstance(e, (FileNotFoundError, OSError)) and ("dataset" in text.lower() or "hub" in text.lower())


def _save(results: dict, tracker, write_samples: bool) -> None:
    samples = results.pop("samples", None)
    tracker.save_results_aggregated(results=results, samples=samples)
    for task in results.get("configs", {}):
        if write_samples and samples and task in samples:
            tracker.save_results_samples(task_name=task, samples=samples[task])
    if samples is not None:
        results["samples"] = samples
