"""The embedded demo model: a ~1M-parameter Llama trained on a synthetic world (see world.py, train.py).

    from ane_eval import demo
    demo.checkpoint_dir()   # the shipped Hugging Face checkpoint
    demo.model_dir()        # its ANEMLL-layout directory, built on first use and cached

The cache key covers the checkpoint, the builder's source and the build options, so a change to any of them
rebuilds. Cache location: $ANE_EVAL_CACHE, else $XDG_CACHE_HOME/ane-eval, else ~/.cache/ane-eval.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_OPTIONS = {"context_length": 256, "batch_size": 32, "num_chunks": 2, "split_lm_head": 8}


def checkpoint_dir() -> Path:
    return HERE / "checkpoint"


def cache_root() -> Path:
    if os.environ.get("ANE_EVAL_CACHE"):
        return Path(os.environ["ANE_EVAL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ane-eval"


def fingerprint(options: dict) -> str:
    """Hash of everything the built directory depends on."""
    from importlib.metadata import version

    h = hashlib.sha256()
    for f in sorted(checkpoint_dir().iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    for f in sorted((HERE.parent / "convert").glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    h.update(repr(sorted(options.items())).encode())
    h.update(version("coremltools").encode())
    return h.hexdigest()[:16]


def model_dir(lut: int | None = None, **overrides) -> Path:
    """The demo model in the ANEMLL layout (fp16, or `lut`-bit palettized FFN and LM head); built once, cached."""
    options = dict(BUILD_OPTIONS, **overrides)
    if lut:
        options.update(lut_ffn=lut, lut_lmhead=lut)
    name = "demo" + (f"-lut{lut}" if lut else "")
    out = cache_root() / f"{name}-{fingerprint(options)}"
    if (out / "meta.yaml").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same directory
        if not (out / "meta.yaml").is_file():
            from ..convert import BuildOptions, build

            build(checkpoint_dir(), out, BuildOptions(name=f"ane-eval-demo{'-lut' + str(lut) if lut else ''}"
                                                      f"-ctx{options['context_length']}", **options))
    return out
