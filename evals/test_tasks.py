"""One test per task of the suite (ids are task names: `pytest evals -k boolq`). Each runs lm-eval on the `ane`
model, writes lm-eval's result files, and checks the metrics against the suite's thresholds and, with
--baseline, against the baseline. A failure prints the verdict table. Under torchrun the documents are split over
the processes; only rank 0 (which gets the gathered results) asserts and writes."""
from __future__ import annotations

import pytest

from ane_eval import gate, runner


def test_task(task_case, ane_session, ane_lm, model, model_info, task_manager):
    name = task_case.name
    try:
        runner.resolve_tasks(task_manager, [name])
        results = runner.evaluate(ane_lm, [name], task_manager, num_fewshot=task_case.num_fewshot,
                                  limit=task_case.limit, apply_chat_template=ane_session.chat,
                                  max_gen_toks=ane_session.max_tokens, seed=ane_session.seed,
                                  model_name=model_info["name"], output_dir=ane_session.output_dir)
    except runner.TaskError as e:
        if ane_session.allow_missing:
            pytest.skip(str(e))
        pytest.fail(str(e), pytrace=False)
    except Exception as e:
        if ane_lm.world_size > 1:  # the other ranks wait in this task's collectives: stop, so theirs fail at once
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            pytest.exit(f"ane-eval: rank {ane_lm.rank}: {name}: {first}", returncode=2)
        raise
    if results is None:  # a rank > 0 under torchrun: its share went to rank 0, which gates and reports
        return
    record = gate.task_record(results, name, limit=task_case.limit, model=model_info,
                              samples=results["samples"].get(name))
    baseline = ane_session.baseline()
    base_record = (baseline or {}).get("tasks", {}).get(name)
    try:
        rows = gate.evaluate_gate(name, record, task_case.thresholds, base_record, ane_session.suite.tolerance,
                                  ane_session.suite.z)
    except gate.GateError as e:
        ane_session.failed = True
        pytest.fail(str(e), pytrace=False)
    if baseline is not None and base_record is None:
        rows[0].notes.append(f"{name}: not in the baseline {ane_session.baseline_path}; no regression check")
    ane_session.rows.extend(rows)
    ane_session.records[name] = record
    if any(r.failed for r in rows):
        ane_session.failed = True
        pytest.fail(f"{name} did not pass:\n{gate.format_table(rows)}", pytrace=False)
