"""ane-eval: evaluate and regression-gate LLMs converted for the Apple Neural Engine (ANEMLL layout).

    import ane_eval
    m = ane_eval.load_model(model_dir, backend="auto", precision="fp16")
    m.reset(); m.prefill(token_ids); logits = m.infer(token_ids[-1], len(token_ids) - 1)
"""
import os

__version__ = "0.1.0"

# Ranks other than 0 of a torchrun launch show no progress bars: tqdm reads TQDM_* when it is imported, which
# lm-eval does on import, so this cannot wait for the process group (ane_eval.distributed quiets the logs).
if os.environ.get("RANK", "0") != "0":
    os.environ.setdefault("TQDM_DISABLE", "1")


def load_model(model_dir, backend: str = "auto", precision: str = "fp16", compute_units: str = "CPU_AND_NE"):
    from .model import load_model as _load

    return _load(model_dir, backend=backend, precision=precision, compute_units=compute_units)


def _register_with_lm_eval() -> None:
    """Make `lm_eval ... --model ane` / get_model("ane") work once ane_eval is imported, without importing the
    harness (and torch) now. lm_eval.models is imported first: registering before it hides the built-in models."""
    try:
        import lm_eval.models  # noqa: F401
        from lm_eval.api.registry import model_registry
    except ImportError:  # lm-eval is a dependency; tolerate a partial install of the runtime alone
        return
    if "ane" not in model_registry:
        model_registry.register("ane", target="ane_eval.harness:ANELM")


_register_with_lm_eval()
