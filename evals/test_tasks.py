"""One test per task of the suite (ids are task names: `pytest evals -k boolq`). Each runs lm-eval on the `ane`
model, writes lm-eval's result files, and checks the metrics against the suite's thresholds and, with
--baseline, against the baseline (the plugin's `ane_task` helper). A failure prints the verdict table.
Under torchrun the documents are split over the processes; only rank 0 (which gets the gathered results) gates
and writes. Under pytest-xdist (`-n N`) the cases are spread over workers; the controller writes the one report."""
from __future__ import annotations


def test_task(task_case, ane_task):
    ane_task(task_case.name, task_case.thresholds, limit=task_case.limit, num_fewshot=task_case.num_fewshot)
