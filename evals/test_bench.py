"""Timing reports (pytest-benchmark): load time, prefill and decode tokens/s, time to first token, mean latency
per loglikelihood request. Compare runs with --benchmark-json / --benchmark-compare-fail (see README)."""
from __future__ import annotations

import time

import pytest

PROMPT = "The quick brown fox jumps over the lazy dog. " * 8


def _describe(extra_info: dict, m, ane_session) -> dict:
    from ane_eval.backends import chip_name, os_name
    from ane_eval.bundle import file_set

    extra_info.update({
        "backend": m.backend_impl.describe(), "compute_units": ane_session.compute_units if m.backend == "coreml"
        else "cpu (numpy)", "precision": m.precision if m.backend == "mil" else "fp16 (CoreML)",
        "chip": chip_name(), "os": os_name(), "model": m.name, "files": file_set(m.bundle),
        "context": m.context_length, "batch": m.batch_size})
    return extra_info


@pytest.fixture()
def info(benchmark, ane_model, ane_session):
    return _describe(benchmark.extra_info, ane_model, ane_session)


def _prompt(model, n):
    ids = model.tokenizer.encode(PROMPT)
    while len(ids) < n:
        ids += ids
    return ids[:n]


def test_load_time(benchmark, ane_session, model_loader):
    """The session's own load, timed: the first in the process (a Mac compiles every package; the OS file cache may
    be warm). Loading a second copy beside the session's would double the memory of a large model."""
    if model_loader.model is not None:
        pytest.skip("the session's model was loaded before this test; run test_load_time first (or alone) to time "
                    "the load")
    benchmark.pedantic(model_loader.load, rounds=1, iterations=1)
    _describe(benchmark.extra_info, model_loader.model, ane_session)


def test_prefill_throughput(benchmark, info, model):
    ids = _prompt(model, min(4 * model.batch_size, model.context_length))

    def run():
        model.reset()
        model.prefill(ids)
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    info["tokens"] = len(ids)
    if benchmark.stats:
        info["prefill_tokens_per_s"] = len(ids) / benchmark.stats.stats.mean


def test_decode_throughput(benchmark, info, model):
    ids = _prompt(model, 16)
    steps = min(32, model.context_length - len(ids))

    def run():
        model.reset()
        model.prefill(ids[:-1])
        tok, pos = ids[-1], len(ids) - 1
        for _ in range(steps):
            tok = model.next_token(tok, pos)  # greedy, for logits and argmax heads alike
            pos += 1
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    info["decode_steps"] = steps


def test_time_to_first_token(benchmark, info, model):
    ids = _prompt(model, min(2 * model.batch_size, model.context_length - 1))

    def run():
        model.reset()
        model.prefill(ids[:-1])
        return model.next_token(ids[-1], len(ids) - 1)
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    info["prompt_tokens"] = len(ids)


def test_loglikelihood_latency(benchmark, info, ane_lm, model):
    from lm_eval.api.instance import Instance

    if not ane_lm.has_distribution:
        pytest.skip("an argmax LM head scores no loglikelihoods")

    context = "Question: Which word completes the sentence? The sky is\nAnswer:"
    reqs = [Instance("loglikelihood", {}, (context, f" {c}"), i) for i, c in enumerate(["blue", "green", "loud"])]

    def run():
        model.reset()
        t = time.perf_counter()
        ane_lm.loglikelihood(reqs, disable_tqdm=True)
        return time.perf_counter() - t
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    info["requests"] = len(reqs)
