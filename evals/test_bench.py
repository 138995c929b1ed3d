"""Timing reports (pytest-benchmark): load time, prefill and decode tokens/s, time to first token, mean latency
per loglikelihood request. Compare runs with --benchmark-json / --benchmark-compare-fail (see README)."""
from __future__ import annotations

import platform
import time

import pytest

PROMPT = "The quick brown fox jumps over the lazy dog. " * 8


@pytest.fixture()
def info(benchmark, ane_model, ane_session):
    from ane_eval.backends import chip_name

    m = ane_model
    benchmark.extra_info.update({
        "backend": m.backend_impl.describe(), "compute_units": ane_session.compute_units if m.backend == "coreml"
        else "cpu (numpy)", "precision": m.precision if m.backend == "mil" else "fp16 (CoreML)",
        "chip": chip_name(), "os": f"{platform.system()} {platform.release()}", "model": m.name,
        "context": m.context_length, "batch": m.batch_size})
    return benchmark.extra_info


def _prompt(model, n):
    ids = model.tokenizer.encode(PROMPT)
    while len(ids) < n:
        ids += ids
    return ids[:n]


def test_load_time(benchmark, info, model_dir, ane_session):
    import ane_eval

    benchmark.pedantic(lambda: ane_eval.load_model(model_dir, backend=ane_session.backend,
                                                   precision=ane_session.precision,
                                                   compute_units=ane_session.compute_units), rounds=1, iterations=1)


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
