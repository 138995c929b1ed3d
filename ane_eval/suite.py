"""Suite files: which tasks to run, with their few-shot count, limit, metric thresholds and include paths.

    tasks:
      - name: boolq
        num_fewshot: 0
        limit: 500
        thresholds: {acc: 0.6}                 # a number is a floor for higher-is-better metrics
      - name: wikitext
        thresholds: {word_perplexity: {max: 30}}
    include_paths: [my_tasks]                  # relative to the suite file
    tolerance: 0.01                            # regression floor (absolute), or {metric: value}
    relative_tolerance: 0.01                   # perplexity-type metrics: smallest rise that counts (relative)
    z: 1.96                                    # regression statistic multiplier
    fidelity:                                  # with `pytest evals --reference REF` (the source checkpoint)
      text: [fidelity.txt]                     # relative to the suite file
      max_tokens: 512                          # one infer per scored token
      thresholds: {mean_kld: {max: 0.05}, top1_agreement: 0.95}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .gate import DEFAULT_RELATIVE_TOLERANCE, DEFAULT_TOLERANCE, DEFAULT_Z

# ane_eval/evals is the repository's evals/ (a symlink in the clone, the package ane_eval.evals when installed)
SUITES_DIR = Path(__file__).resolve().parent / "evals" / "suites"


class SuiteError(ValueError):
    pass


@dataclass
class TaskSpec:
    name: str
    num_fewshot: int | None = None
    limit: int | float | None = None
    thresholds: dict = field(default_factory=dict)


@dataclass
class Suite:
    path: Path | None
    tasks: list[TaskSpec]
    include_paths: list[Path] = field(default_factory=list)
    tolerance: float | dict = DEFAULT_TOLERANCE
    z: float = DEFAULT_Z
    relative_tolerance: float | dict = DEFAULT_RELATIVE_TOLERANCE
    fidelity: dict = field(default_factory=dict)  # text (paths relative to the suite file), max_tokens, thresholds

    def spec(self, name: str) -> TaskSpec:
        return next((t for t in self.tasks if t.name == name), TaskSpec(name))


def load_suite(path) -> Suite:
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SuiteError(f"{path}: no such suite file") from None
    except yaml.YAMLError as e:
        raise SuiteError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), list):
        raise SuiteError(f"{path}: a suite file needs a `tasks:` list (see ane_eval/suite.py)")
    tasks = []
    for i, t in enumerate(doc["tasks"]):
        if isinstance(t, str):
            t = {"name": t}
        if not isinstance(t, dict) or "name" not in t:
            raise SuiteError(f"{path}: tasks[{i}] needs a name")
        unknown = set(t) - {"name", "num_fewshot", "limit", "thresholds"}
        if unknown:
            raise SuiteError(f"{path}: tasks[{i}] ({t['name']}) has unknown keys {sorted(unknown)}")
        tasks.append(TaskSpec(str(t["name"]), t.get("num_fewshot"), t.get("limit"), dict(t.get("thresholds") or {})))
    includes = [(path.parent / p).resolve() for p in doc.get("include_paths") or []]
    return Suite(path, tasks, includes, doc.get("tolerance", DEFAULT_TOLERANCE), float(doc.get("z", DEFAULT_Z)),
                 doc.get("relative_tolerance", DEFAULT_RELATIVE_TOLERANCE), _fidelity(path, doc.get("fidelity")))


def _fidelity(path: Path, section) -> dict:
    """The `fidelity:` section (used with `pytest evals --reference REF`): text files, max_tokens, thresholds."""
    if section is None:
        return {}
    if not isinstance(section, dict) or set(section) - {"text", "max_tokens", "thresholds"}:
        raise SuiteError(f"{path}: fidelity: takes text (files), max_tokens and thresholds, e.g. "
                         "{text: [a.txt], max_tokens: 512, thresholds: {mean_kld: {max: 0.05}, top1_agreement: 0.95}}")
    texts = section.get("text") or []
    texts = [texts] if isinstance(texts, str) else list(texts)
    return {"text": [(path.parent / t).resolve() for t in texts], "max_tokens": section.get("max_tokens"),
            "thresholds": dict(section.get("thresholds") or {})}


def default_suite(model_is_demo: bool) -> Path:
    return SUITES_DIR / ("demo.yaml" if model_is_demo else "default.yaml")
