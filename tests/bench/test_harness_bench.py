"""Scoring algorithms compared: prefix reuse, the naive one (a fresh prefill per request), and upstream's
(K+1 prefills per question: the context, then context + continuation again for every choice).

Measured: model token evaluations (embedding rows pushed through the chunks) and wall time, on a 4-choice task
with long contexts (hellaswag-shaped, 5-shot) and a 2-choice single-token task (boolq-shaped). Ratios land in
pytest-benchmark's extra_info; nothing asserts on time.
    .venv/bin/pytest tests/bench/test_harness_bench.py --benchmark-enable -s
"""
from __future__ import annotations

import time
from itertools import groupby

import pytest

import ane_eval
from ane_eval.harness import ANELM, PrefixCache, log_softmax_at

# token evaluations are counts, not timing noise: asserted (floors below what was measured, see the test);
# wall time is recorded only
TARGETS = {"token_evaluations_vs_upstream": 2.5, "wall_time_vs_upstream": 2.5}


def task_requests(lm, task: str, num_fewshot: int, limit: int):
    """The loglikelihood requests lm-eval builds for a task, tokenized as ANELM does."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from ane_eval.demo.tasks import tasks_dir

    task_obj = get_task_dict([task], TaskManager(include_path=str(tasks_dir())))[task]
    task_obj.set_config(key="num_fewshot", value=num_fewshot)
    task_obj.set_fewshot_seed(seed=0)
    task_obj.build_all_requests(limit=limit, rank=0, world_size=1)
    out = []
    for inst in task_obj.instances:
        context, continuation = inst.args
        ctx, cont = lm._encode_pair(context, continuation)
        out.append(((context, continuation), ctx, cont))
    return out


def upstream_scores(model, requests):
    """Upstream's algorithm: per question one context prefill, then per choice a fresh prefill of context +
    continuation prefix and an infer for every continuation token."""
    results = []
    for _, group in groupby(requests, key=lambda r: tuple(r[1])):
        group = list(group)
        ctx = group[0][1]
        model.reset()
        model.prefill(ctx)
        for _, ctx, cont in group:
            model.reset()
            seq = ctx + cont
            model.prefill(seq[:len(ctx) - 1])
            total = 0.0
            for p in range(len(ctx) - 1, len(seq) - 1):
                total += log_softmax_at(model.infer(seq[p], p), seq[p + 1])
            results.append(total)
    return results


def run_algorithm(model, requests, algorithm: str):
    start_evals, t = model.token_evaluations, time.perf_counter()
    if algorithm == "upstream":
        scores = upstream_scores(model, requests)
    else:
        lm = ANELM(model=model, prefix_reuse=algorithm == "prefix_reuse")
        lm.cache = PrefixCache(model, reuse=lm.prefix_reuse)
        model.reset()
        scores = [s for s, _ in lm._loglikelihood_tokens(requests, disable_tqdm=True)]
    return scores, model.token_evaluations - start_evals, time.perf_counter() - t


# the 2-choice case asserts nothing beyond the ordering the 4-choice case checks too: recorded with -m slow only
@pytest.mark.parametrize("task, shots, limit", [
    pytest.param("demo_hellaswag", 5, 15, id="4-choice-long-context"),
    pytest.param("demo_boolq", 0, 60, id="2-choice-single-token", marks=pytest.mark.slow)])
def test_scoring_algorithms(benchmark, demo_dir, task, shots, limit):
    model = ane_eval.load_model(demo_dir, backend="mil", precision="fp16")
    lm = ANELM(model=model)
    requests = task_requests(lm, task, shots, limit)
    measured = {alg: run_algorithm(model, requests, alg) for alg in ("prefix_reuse", "naive", "upstream")}
    ref = measured["naive"][0]
    for alg, (scores, _, _) in measured.items():  # all three compute the same numbers
        assert max(abs(a - b) for a, b in zip(scores, ref)) < 5e-2, alg
    info = {"task": task, "num_fewshot": shots, "requests": len(requests)}
    for alg, (_, evals, secs) in measured.items():
        info[f"{alg}_token_evaluations"] = evals
        info[f"{alg}_seconds"] = round(secs, 3)
    info["token_evaluation_ratio_vs_upstream"] = measured["upstream"][1] / measured["prefix_reuse"][1]
    info["wall_time_ratio_vs_upstream"] = measured["upstream"][2] / measured["prefix_reuse"][2]
    info["token_evaluation_ratio_vs_naive"] = measured["naive"][1] / measured["prefix_reuse"][1]
    info["targets"] = TARGETS
    assert measured["prefix_reuse"][1] < measured["naive"][1] < measured["upstream"][1]
    if task == "demo_hellaswag":  # measured 4.69 at limit 15 (2.94 at the issue 14 audit); the 2-choice case is recorded
        assert info["token_evaluation_ratio_vs_upstream"] >= TARGETS["token_evaluations_vs_upstream"]
    benchmark.extra_info.update(info)
    benchmark.pedantic(lambda: run_algorithm(model, requests, "prefix_reuse"), rounds=1, iterations=1)
    print("\n" + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))
