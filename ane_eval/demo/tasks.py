"""The demo's offline lm-eval tasks, shaped like boolq, arc_easy, hellaswag, wikitext and short-answer QA, plus
harder variants the demo model partly fails (longer two-person passages, multi-step sums, distractor endings).

Data: JSONL files shipped in ane_eval/demo/data/ (regenerate with `python -m ane_eval.demo.tasks`; a test
checks they match the generator). Task YAMLs are written at run time into the cache with absolute data paths —
the same `dataset_path: json` form users write for their own local tasks.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import yaml

from . import HERE, cache_root, world

DATA_DIR = HERE / "data"
SIZES = {"boolq": (400, 40), "arc_easy": (300, 40), "hellaswag": (300, 40), "qa": (200, 40), "wikitext": (40, 0),
         "boolq_long": (150, 40), "arith_steps": (150, 40), "hellaswag_distract": (150, 40)}
MAKERS = {"boolq": world.boolq_item, "arc_easy": world.arc_item, "hellaswag": world.hellaswag_item,
          "qa": world.qa_item, "wikitext": world.wikitext_item, "boolq_long": world.boolq_long_item,
          "arith_steps": world.arith_steps_item, "hellaswag_distract": world.hellaswag_distract_item}
SEED = 2024  # evaluation data: a different stream from the training corpus's

_MC = {"output_type": "multiple_choice", "test_split": "test", "fewshot_split": "train"}
ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}
TASKS = {
    "demo_boolq": {**_MC, "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:", "doc_to_target": "label",
                   "doc_to_choice": ["no", "yes"], "metric_list": [ACC]},
    "demo_arc_easy": {**_MC, "doc_to_text": "Question: {{question}}\nAnswer:",
                      "doc_to_target": "{{choices.label.index(answerKey)}}", "doc_to_choice": "{{choices.text}}",
                      "metric_list": [ACC, ACC_NORM]},
    "demo_hellaswag": {**_MC, "doc_to_text": "{{ctx}}", "doc_to_target": "{{label}}", "doc_to_choice": "{{endings}}",
                       "metric_list": [ACC, ACC_NORM]},
    "demo_wikitext": {"output_type": "loglikelihood_rolling", "test_split": "test", "doc_to_text": "",
                      "doc_to_target": "{{page}}",
                      "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                                      {"metric": "bits_per_byte"}]},
    "demo_qa": {"output_type": "generate_until", "test_split": "test", "fewshot_split": "train",
                "doc_to_text": "Q: {{question}}\nA:", "doc_to_target": "{{answer}}",
                "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": 8},
                "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                             {"function": "take_first"}]}],
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]},
}
# The harder items keep the field names of the shape they extend, so they reuse its prompt and metrics.
TASKS.update({"demo_boolq_long": TASKS["demo_boolq"], "demo_arith_steps": TASKS["demo_arc_easy"],
              "demo_hellaswag_distract": TASKS["demo_hellaswag"]})


def generate(kind: str, split: str) -> list[dict]:
    test_n, train_n = SIZES[kind]
    rng = random.Random(f"{SEED}-{kind}-{split}")
    return [MAKERS[kind](rng) for _ in range(test_n if split == "test" else train_n)]


def write_data(out: Path = DATA_DIR) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for kind, (_, train_n) in SIZES.items():
        for split in ("test", "train") if train_n else ("test",):
            with open(out / f"{kind}_{split}.jsonl", "w") as fh:
                for item in generate(kind, split):
                    fh.write(json.dumps(item) + "\n")


def task_configs() -> dict[str, dict]:
    configs = {}
    for name, cfg in TASKS.items():
        kind = name.removeprefix("demo_")
        files = {"test": str(DATA_DIR / f"{kind}_test.jsonl")}
        if SIZES[kind][1]:
            files["train"] = str(DATA_DIR / f"{kind}_train.jsonl")
        configs[name] = {"task": name, "tag": ["ane_eval_demo"], "dataset_path": "json",
                         "dataset_kwargs": {"data_files": files}, **cfg, "metadata": {"version": 1.0}}
    return configs


def tasks_dir() -> Path:
    """A directory of the demo task YAMLs for lm-eval's TaskManager(include_path=...)."""
    configs = task_configs()
    text = {name: yaml.safe_dump(cfg, sort_keys=False) for name, cfg in configs.items()}
    digest = hashlib.sha256(json.dumps(text, sort_keys=True).encode()).hexdigest()[:12]
    out = cache_root() / f"demo-tasks-{digest}"
    if not out.is_dir():
        out.mkdir(parents=True, exist_ok=True)
        for name, body in text.items():
            (out / f"{name}.yaml").write_text(body)
    return out


if __name__ == "__main__":
    write_data()
    print(f"wrote {DATA_DIR}")
