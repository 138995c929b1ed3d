"""ANELM scores like lm-eval's own HF backend on the same weights (offline demo tasks in lm-eval YAML)."""
from __future__ import annotations

import numpy as np
import pytest

from ane_eval import demo
from ane_eval.demo.tasks import tasks_dir
from ane_eval.harness import ANELM

TASKS = ["demo_boolq", "demo_arc_easy", "demo_hellaswag", "demo_wikitext", "demo_qa"]
LIMIT = 24


def evaluate(lm, tasks=TASKS, limit=LIMIT, **kwargs):
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(tasks_dir())),
                                   limit=limit, log_samples=True, bootstrap_iters=100, random_seed=0,
                                   numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0, **kwargs)


@pytest.fixture(scope="module")
def hf_results():
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(demo.checkpoint_dir()), dtype="float32", max_length=256, batch_size=1, device="cpu")
    return evaluate(lm)


@pytest.fixture(scope="module")
def ane_model(demo_dir):
    import ane_eval
    return ane_eval.load_model(demo_dir, backend="mil", precision="fp32")


@pytest.fixture(scope="module")
def ane_results(ane_model):
    return evaluate(ANELM(model=ane_model))


def responses(results, task):
    """Per document: list of per-request responses, in document order."""
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_loglikelihoods_match_hf(hf_results, ane_results):
    worst = 0.0
    for task in ("demo_boolq", "demo_arc_easy", "demo_hellaswag"):
        for ours, ref in zip(responses(ane_results, task), responses(hf_results, task), strict=True):
            for (a,), (b,) in zip(ours, ref, strict=True):
                worst = max(worst, abs(a[0] - b[0]))
                assert a[1] == b[1], f"{task}: is_greedy differs"
            ref_ll = np.array([r[0][0] for r in ref])
            top2 = np.sort(ref_ll)[-2:]
            if top2[1] - top2[0] > 1e-2:  # a clear winner must be the same choice
                assert np.argmax([r[0][0] for r in ours]) == np.argmax(ref_ll)
    print(f"max |Δ loglikelihood| vs HFLM: {worst:.2e}")
    assert worst <= 1e-2


def test_rolling_loglikelihood_matches_hf(hf_results, ane_results):
    deltas = [abs(a[0][0] - b[0][0]) for a, b in zip(responses(ane_results, "demo_wikitext"),
                                                responses(hf_results, "demo_wikitext"), strict=True)]
    print(f"max |Δ rolling loglikelihood| vs HFLM: {max(deltas):.2e}")
    assert max(deltas) <= 5e-2


def test_greedy_generations_match_hf(hf_results, ane_results):
    ours, ref = responses(ane_results, "demo_qa"), responses(hf_results, "demo_qa")
    assert ours == ref


def test_metrics_match_hf(hf_results, ane_results):
    for task in ("demo_boolq", "demo_arc_easy", "demo_hellaswag"):
        assert ane_results["results"][task]["acc,none"] == hf_results["results"][task]["acc,none"]


def test_fp16_choices_agree(demo_dir, hf_results):
    import ane_eval

    lm = ANELM(model=ane_eval.load_model(demo_dir, backend="mil", precision="fp16"))
    r = evaluate(lm, tasks=["demo_boolq", "demo_arc_easy", "demo_hellaswag"])
    same = total = 0
    for task in ("demo_boolq", "demo_arc_easy", "demo_hellaswag"):
        for ours, ref in zip(responses(r, task), responses(hf_results, task), strict=True):
            same += np.argmax([x[0][0] for x in ours]) == np.argmax([x[0][0] for x in ref])
            total += 1
    assert same / total >= 0.98


def test_prefix_reuse_on_and_off_agree(ane_model):
    on = ANELM(model=ane_model, prefix_reuse=True)
    off = ANELM(model=ane_model, prefix_reuse=False)
    start = ane_model.token_evaluations
    r_on = evaluate(on, tasks=["demo_hellaswag", "demo_boolq"], limit=12)
    used_on = ane_model.token_evaluations - start
    r_off = evaluate(off, tasks=["demo_hellaswag", "demo_boolq"], limit=12)
    used_off = ane_model.token_evaluations - start - used_on
    for task in ("demo_hellaswag", "demo_boolq"):
        for a_doc, b_doc in zip(responses(r_on, task), responses(r_off, task), strict=True):
            for (a,), (b,) in zip(a_doc, b_doc, strict=True):
                assert a[1] == b[1] and abs(a[0] - b[0]) <= 1e-4
    assert used_on < used_off


def test_long_requests_are_left_truncated_like_hf(ane_model):
    """A context longer than the 256-token window: same scores as HFLM, counted as truncated, never -inf."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    context = " ".join(f"Q: What is {i % 10} plus 1?\nA: {i % 10 + 1}" for i in range(60))
    reqs = [Instance("loglikelihood", {}, (context + "\nQ: What is 2 plus 2?\nA:", c), i)
            for i, c in enumerate([" 4", " 5", " 9"])]
    ours = ANELM(model=ane_model)
    assert len(ours.tok_encode(reqs[0].args[0])) > 256
    a = ours.loglikelihood(reqs)
    hf = HFLM(pretrained=str(demo.checkpoint_dir()), dtype="float32", max_length=256, batch_size=1, device="cpu")
    # The converted program holds its RoPE tables in fp16 (as upstream's conversions do); at the last positions
    # of the window that alone moves HF's logprobs by ~1e-2. Compare with HF given the same fp16 tables.
    rotary = hf.model.model.rotary_emb
    exact = rotary.forward
    rotary.forward = lambda x, position_ids, **kw: tuple(t.half().float() for t in exact(x, position_ids, **kw))
    b = hf.loglikelihood(reqs)
    assert ours.truncated == 3
    for (la, ga), (lb, gb) in zip(a, b):
        assert np.isfinite(la) and abs(la - lb) <= 1e-2 and ga == gb


def test_chat_template_run(ane_model):
    lm = ANELM(model=ane_model)
    assert lm.chat_template(True) is not None
    r = evaluate(lm, tasks=["demo_qa"], limit=4, apply_chat_template=True)
    prompt = r["samples"]["demo_qa"][0]["arguments"][0][0]
    assert prompt.startswith("user: Q: ") and prompt.endswith("assistant:")
    assert "demo_qa" in r["results"]


def test_registered_by_name(demo_dir):
    from lm_eval.api.registry import get_model

    import ane_eval  # noqa: F401

    cls = get_model("ane")
    assert cls is ANELM and get_model("hf").__name__ == "HFLM"
    lm = cls.create_from_arg_string(f"model_dir={demo_dir},backend=mil,precision=fp32,prefix_reuse=false")
    assert lm.prefix_reuse is False and lm.max_length == 256
    with pytest.raises(ValueError, match="unknown model_args"):
        cls.create_from_arg_string(f"model_dir={demo_dir},backend=mil,colour=red")


def test_sampling_kwargs(ane_model):
    from lm_eval.api.instance import Instance

    lm = ANELM(model=ane_model, seed=3)
    req = Instance("generate_until", {}, ("Q: What is 2 plus 2?\nA:", {"until": ["\n"], "do_sample": True,
                                                                      "temperature": 0.7, "max_gen_toks": 4}), 0)
    assert isinstance(lm.generate_until([req])[0], str)
    bad = Instance("generate_until", {}, ("Q:", {"until": ["\n"], "do_sample": True, "top_p": 0.9}), 0)
    with pytest.raises(ValueError, match=r"generation kwargs \['top_p'\] are not supported"):
        lm.generate_until([bad])
