"""ane-eval: evaluate and regression-gate LLMs converted for the Apple Neural Engine (ANEMLL layout).

    import ane_eval
    m = ane_eval.load_model(model_dir, backend="auto", precision="fp16")
    m.reset(); m.prefill(token_ids); logits = m.infer(token_ids[-1], len(token_ids) - 1)
"""
__version__ = "0.1.0"


def load_model(model_dir, backend: str = "auto", precision: str = "fp16", compute_units: str = "CPU_AND_NE"):
    from .model import load_model as _load

    return _load(model_dir, backend=backend, precision=precision, compute_units=compute_units)
