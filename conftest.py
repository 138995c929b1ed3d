"""Root conftest: pytest reads command-line options only from here (or a plugin), so the evals/ suite's options
live here. See evals/conftest.py for the fixtures and README "The evals suite" for usage."""
import os

# Offline by default: nothing in the suite may reach a hub at test time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser):
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
    g.addoption("--output-dir", default="results", help="where results, samples, summary and baseline go")
    g.addoption("--baseline", default=None, help="baseline JSON to gate regressions against")
    g.addoption("--update-baseline", action="store_true",
                help="write the baseline (to --baseline, else OUTPUT_DIR/baseline.json) if the run passed")
    g.addoption("--dist-timeout", type=float, default=None,
                help="under torchrun: seconds every collective may wait (default 3600 or $ANE_EVAL_DIST_TIMEOUT)")
    g.addoption("--allow-missing-data", action="store_true",
                help="skip (instead of fail) tasks whose dataset cannot be reached")
