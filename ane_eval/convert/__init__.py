"""Hugging Face checkpoint → ANEMLL-layout model directory (`.mlpackage` parts, meta.yaml, tokenizer), on any OS.

    python -m ane_eval.convert CHECKPOINT OUT [--context-length 512] [--batch-size 64] [--num-chunks 1] ...
        [--argmax] [--monolithic] [--meta-version 0.3.5]

Used for the demo model and test fixtures; mirrors what ANEMLL 0.3.4's converter produces (ANEMLL-CONTRACT.md),
except that inputs upstream silently mangled are refused. `--argmax` (an LM head returning the argmax of each
vocabulary chunk), `--monolithic` (one file: embeddings + layers + LM head) and `--meta-version 0.3.5` write
ANEMLL 0.3.5's layout (zkh2016/Anemll 4e77d00e: anemll/ane_converter/llama_converter.py,
anemll/utils/combine_models.py, anemll/utils/generate_meta_yaml.py).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import CheckpointError, read_arch, read_weights
from . import gemma3
from .programs import (STATE_NAME, embeddings_program, ffn_program, lm_head_program, lm_head_splits,
                       monolithic_program)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")
ANEMLL_VERSION = "0.3.4"  # the layout written by default
GEMMA3_ANEMLL_VERSION = "0.3.5"  # Gemma 3 exists only in 0.3.5's layout (its default here)
VERSIONS = ("0.3.4", "0.3.5")
LUT_GROUP = 8  # output channels sharing one LUT (ANEMLL's per-grouped-channel palettization)


class BuildError(ValueError):
    """A checkpoint/option combination the builder refuses (one readable line)."""


@dataclass
class BuildOptions:
    context_length: int = 512
    batch_size: int = 64
    num_chunks: int = 1
    split_lm_head: int | None = None  # default: 8 for Llama, 16 for Qwen
    lut_ffn: int | None = None
    lut_lmhead: int | None = None
    lut_embeddings: int | None = None
    # how the LUTs are made (coremltools OpPalettizerConfig mode): "kmeans", as ANEMLL converts (slow: ~2 h for a
    # 1B model on one core), or "uniform" (evenly spaced levels; the same file format and load work, minutes)
    lut_mode: str = "kmeans"
    state_length: int | None = None  # default: the context length
    prefix: str | None = None  # default: the architecture family
    name: str | None = None
    argmax: bool = False  # 0.3.5 --argmax: the LM head returns argmax_idx/argmax_val per vocabulary chunk
    monolithic: bool = False  # 0.3.5 monolithic model: one file with infer and prefill
    meta_version: str | None = None  # meta.yaml layout; default 0.3.4, or 0.3.5 when argmax/monolithic ask for it
    extra_meta: dict = field(default_factory=dict)
    # Gemma 3 (ANEMLL 0.3.5): one unified cache instead of local + global; rotate functions in separate `_rot`
    # files; prefill writes through an update_mask input instead of a dynamic slice
    single_cache: bool = False
    split_rotate: bool = False
    update_mask_prefill: bool = False
    # test-only: upstream refuses contexts below 256 (the ANE's minimum state size); tiny test models may go lower,
    # the programs' structure is the same
    allow_small_context: bool = False

    @property
    def version(self) -> str:
        return self.meta_version or ("0.3.5" if self.argmax or self.monolithic else ANEMLL_VERSION)


def check_options(arch, opts: BuildOptions) -> None:
    """Refuse what upstream silently mangled: every problem in one message."""
    problems = []
    L, N, V, K = arch.num_layers, opts.num_chunks, arch.vocab_size, opts.split_lm_head
    if N < 1 or L % N:
        problems.append(f"{L} layers cannot be split evenly into {N} chunks (upstream silently dropped "
                        f"{L % N if N > 0 else L} layer(s)); choose --num-chunks dividing {L}")
    if K < 1 or (arch.family == "llama" and V % K):
        problems.append(f"vocabulary {V} is not divisible by split_lm_head {K} (upstream's Llama head dropped the "
                        f"last {V % K if K > 0 else V} rows); choose a split dividing {V}")
    if opts.batch_size < 1 or opts.context_length < opts.batch_size or opts.context_length % opts.batch_size:
        problems.append(f"context length {opts.context_length} is not a positive multiple of batch size "
                        f"{opts.batch_size}; prefill batches must tile the context exactly")
    if opts.state_length is not None and opts.state_length < opts.context_length:
        problems.append(f"state length {opts.state_length} is shorter than context length {opts.context_length}")
    for key in ("lut_ffn", "lut_lmhead", "lut_embeddings"):
        bits = getattr(opts, key)
        if bits is not None and bits not in (1, 2, 3, 4, 6, 8):
            problems.append(f"{key}={bits}: palettization supports 1, 2, 3, 4, 6 or 8 bits")
    if opts.lut_mode not in ("kmeans", "uniform"):
        problems.append(f"lut_mode={opts.lut_mode!r}: LUTs are made by 'kmeans' or 'uniform'")
    # coremltools silently leaves a weight unpalettized when its output channels do not split into LUT groups,
    # which would make the lut_* names lie: refuse instead
    if (opts.lut_lmhead or (opts.monolithic and opts.lut_ffn)) and K >= 1:  # a monolithic head takes lut_ffn
        widths = sorted({w for w in lm_head_splits(V, K) if w % LUT_GROUP})
        if widths:
            problems.append(f"LM head parts of width {widths} cannot be palettized in groups of {LUT_GROUP} "
                            f"channels; choose split_lm_head so that every part's width is a multiple of {LUT_GROUP}")
    if opts.lut_ffn:
        dims = {"hidden": arch.hidden_size, "q": arch.num_heads * arch.head_dim,
                "kv": arch.num_kv_heads * arch.head_dim, "intermediate": arch.intermediate_size}
        odd = [f"{k} {v}" for k, v in dims.items() if v % LUT_GROUP]
        if odd:
            problems.append(f"FFN weights with {', '.join(odd)} output channels cannot be palettized in groups of "
                            f"{LUT_GROUP}")
    if opts.lut_embeddings and V % LUT_GROUP:
        problems.append(f"embeddings of {V} rows cannot be palettized in groups of {LUT_GROUP}")
    if opts.version not in VERSIONS:
        problems.append(f"meta version {opts.version!r}: choose one of {', '.join(VERSIONS)}")
    elif (opts.argmax or opts.monolithic) and opts.version != "0.3.5":
        problems.append("argmax heads and monolithic models are ANEMLL 0.3.5 layouts; drop --meta-version "
                        f"{opts.version}")
    if opts.monolithic and (opts.lut_lmhead or opts.lut_embeddings):
        problems.append("a monolithic model takes one LUT for all its weights (upstream's lut_bits): use --lut-ffn "
                        "only")
    if arch.num_heads % arch.num_kv_heads:
        problems.append(f"{arch.num_heads} attention heads are not a multiple of {arch.num_kv_heads} KV heads")
    if arch.family == "gemma3":
        problems += _gemma3_problems(arch, opts)
    elif opts.single_cache or opts.split_rotate or opts.update_mask_prefill:
        problems.append("single_cache, split_rotate and update_mask_prefill apply to Gemma 3 models only")
    if problems:
        raise BuildError("; ".join(problems))


MIN_GEMMA3_CONTEXT = 256  # gemma3_converter.py MIN_ANE_STATE_SIZE


def _gemma3_problems(arch, opts: BuildOptions) -> list[str]:
    problems = []
    C, B, sw = opts.context_length, opts.batch_size, arch.sliding_window
    if C < MIN_GEMMA3_CONTEXT and not opts.allow_small_context:
        problems.append(f"context length {C} is below {MIN_GEMMA3_CONTEXT}, the ANE's minimum state size "
                        "(upstream refuses it too)")
    if C < sw:
        problems.append(f"context length {C} is shorter than the sliding window {sw}; convert with a context of at "
                        f"least {sw}")
    if C > sw and not opts.single_cache and (B > sw or sw % B):
        problems.append(f"prefill batch {B} must divide the sliding window {sw}: prefill_rotate shifts the local "
                        "cache by whole batches")
    if opts.single_cache and opts.split_rotate:
        problems.append("single_cache has no rotate functions, so it cannot be split_rotate")
    if opts.split_rotate and C <= sw:
        problems.append(f"split_rotate needs rotate functions, which exist only when the context exceeds the "
                        f"sliding window {sw}")
    if opts.state_length is not None and opts.state_length != C:
        problems.append("Gemma 3 models are built with state_length = context_length")
    if opts.version != GEMMA3_ANEMLL_VERSION:
        problems.append(f"Gemma 3 exists only in ANEMLL's {GEMMA3_ANEMLL_VERSION} layout; drop --meta-version "
                        f"{opts.version}")
    if opts.monolithic or opts.argmax:
        problems.append("Gemma 3 builds here are chunked with a logits head: drop --monolithic/--argmax")
    return problems


def _lut(bits: int | None) -> str:
    return f"_lut{bits}" if bits else ""


def part_names(prefix: str, opts: BuildOptions) -> dict:
    n = opts.num_chunks
    return {
        # combine_models.combine_monolithic: {prefix}_monolithic_full[_lutN]
        "monolithic": f"{prefix}_monolithic_full{_lut(opts.lut_ffn)}",
        "embeddings": f"{prefix}_embeddings{_lut(opts.lut_embeddings)}",
        "ffn": f"{prefix}_FFN_PF{_lut(opts.lut_ffn)}",
        "chunks": [f"{prefix}_FFN_PF{_lut(opts.lut_ffn)}_chunk_{i:02d}of{n:02d}" for i in range(1, n + 1)],
        "lm_head": f"{prefix}_lm_head{_lut(opts.lut_lmhead)}",
    }


def _convert(program, bits: int | None, inputs=None, weight_ops=("conv", "linear"), mode: str = "kmeans"):
    """Convert a MIL program; with `bits`, palettize the weights feeding `weight_ops` (only those: the RoPE tables
    and other constants stay fp16, as in upstream's models) with LUTs made by `mode` (BuildOptions.lut_mode)."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    # only the saved file is needed: on a Mac a loaded model would be compiled and loaded here, and again by
    # palettize_weights (which reloads with skip_model_load=mlmodel.__proxy__ is None)
    model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT16, inputs=inputs, skip_model_load=True)
    if bits:
        cfg = cto.OpPalettizerConfig(nbits=bits, mode=mode, granularity="per_grouped_channel",
                                     group_size=LUT_GROUP)
        model = cto.palettize_weights(model, cto.OptimizationConfig(op_type_configs={op: cfg for op in weight_ops}))
    return model


def _save_with_metadata(model_or_path, path: Path, metadata: dict) -> None:
    import coremltools as ct

    model = model_or_path
    if isinstance(model_or_path, (str, Path)):  # save_multifunction drops user metadata: reload, set, save
        model = ct.models.MLModel(str(model_or_path), skip_model_load=True)
    for k, v in metadata.items():
        model.user_defined_metadata[k] = str(v)
    model.save(str(path))


@contextlib.contextmanager
def _quiet():
    """coremltools prints a progress bar per graph pass; silence them during the build only (the caller's own
    progress bars, e.g. lm-eval's, must keep working afterwards)."""
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before


def build(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, options: BuildOptions | None = None,
          **overrides) -> Path:
    """Convert `checkpoint` into an ANEMLL-layout directory at `out_dir` (written atomically); returns the path."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    opts = options or BuildOptions()
    for k, v in overrides.items():
        setattr(opts, k, v)
    arch = read_arch(checkpoint)
    if opts.split_lm_head is None:
        opts.split_lm_head = 16 if arch.family in ("qwen", "gemma3") else 8
    if arch.family == "gemma3" and opts.meta_version is None:
        opts.meta_version = GEMMA3_ANEMLL_VERSION
    check_options(arch, opts)
    with _quiet():
        return _build(checkpoint, out_dir, opts, arch)


def _build(checkpoint: Path, out_dir: Path, opts: BuildOptions, arch) -> Path:
    if platform.system() != "Darwin":  # "Failed to load _MLModelProxy" & co: CoreML cannot run here, by design
        logging.getLogger("coremltools").setLevel(logging.ERROR)
    import coremltools as ct
    import numpy as np

    weights = read_weights(checkpoint)
    if arch.family == "gemma3":
        weights = gemma3.norm_weights(weights)
    prefix = opts.prefix or arch.family
    names = part_names(prefix, opts)
    C, B, N = opts.context_length, opts.batch_size, opts.num_chunks
    S = max(opts.state_length or C, C)
    per_chunk = arch.num_layers // N
    common = {"com.anemll.context_length": C, "com.anemll.num_chunks": N, "com.anemll.info": f"ane-eval builder, "
              f"ANEMLL {opts.version} layout, {arch.model_type}"}
    widths = lm_head_splits(arch.vocab_size, opts.split_lm_head)
    head_md = {}
    if opts.version == "0.3.5":  # metadata.AddMetadata: written for the LM head (part 3) and monolithic models
        head_md = {"com.anemll.vocab_size": arch.vocab_size,
                   "com.anemll.lm_head_chunk_sizes": ",".join(map(str, widths)),
                   **({"com.anemll.argmax_in_model": "true"} if opts.argmax else {})}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out_dir.parent))
    try:
        if opts.monolithic:
            programs = {fn: monolithic_program(arch, weights, T, C, S, fn == "prefill", opts.split_lm_head, opts.argmax)
                        for fn, T in (("infer", 1), ("prefill", B))}
            _save_multifunction(tmp, programs, opts.lut_ffn, opts.lut_mode, tmp / f"{names['monolithic']}.mlpackage",
                                {"com.anemll.context_length": C, "com.anemll.info": common["com.anemll.info"],
                                 "com.anemll.batch_size": B, "com.anemll.lut_bits": opts.lut_ffn or "none",
                                 "com.anemll.functions": ",".join(programs), **head_md})
            _finish(tmp, out_dir, opts, arch, names, checkpoint)
            return out_dir
        emb_input = ct.TensorType(name="input_ids", dtype=np.int32,
                                  shape=ct.EnumeratedShapes(shapes=[[1, 1], [1, B]], default=[1, 1]))
        emb_program = (gemma3.gemma3_embeddings_program if arch.family == "gemma3" else embeddings_program)
        model = _convert(emb_program(arch, weights), opts.lut_embeddings, inputs=[emb_input],
                         weight_ops=("gather",), mode=opts.lut_mode)
        _save_with_metadata(model, tmp / f"{names['embeddings']}.mlpackage",
                            {**common, "com.anemll.lut_bits": opts.lut_embeddings or "none"})

        for c in range(N):
            layers = range(c * per_chunk, (c + 1) * per_chunk)
            last = c == N - 1
            programs = {fn: _ffn_function(arch, weights, layers, fn, opts, last) for fn in _functions(arch, opts)}
            chunk_md = {**common, "com.anemll.batch_size": B, "com.anemll.chunk_no": c + 1,
                        "com.anemll.lut_bits": opts.lut_ffn or "none"}
            # combine_models.py: one file with every function (combine_chunks_gemma3), or with split_rotate two,
            # `_chunk_NNofMM` (infer + prefill) and `_chunk_NNofMM_rot` (infer_rotate + prefill_rotate)
            groups = {"": list(programs)}
            if opts.split_rotate:
                groups = {"": [f for f in programs if not f.endswith("_rotate")],
                          "_rot": [f for f in programs if f.endswith("_rotate")]}
            for suffix, fns in groups.items():
                _save_multifunction(tmp, {fn: programs[fn] for fn in fns}, opts.lut_ffn, opts.lut_mode,
                                    tmp / f"{names['chunks'][c]}{suffix}.mlpackage", chunk_md)

        model = _convert(lm_head_program(arch, weights, opts.split_lm_head, argmax=opts.argmax), opts.lut_lmhead,
                         mode=opts.lut_mode)
        _save_with_metadata(model, tmp / f"{names['lm_head']}.mlpackage",
                            {**common, "com.anemll.lut_bits": opts.lut_lmhead or "none", **head_md})
        _finish(tmp, out_dir, opts, arch, names, checkpoint)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _save_multifunction(tmp: Path, programs: dict, bits: int | None, mode: str, out: Path, metadata: dict) -> None:
    """One file with a function per program (the first, `infer` or `infer_rotate`, the default), as combine_models
    does with ct.utils.save_multifunction; each function is palettized before the merge (the merge dedupes
    weights)."""
    import coremltools as ct

    parts = {}
    for fn, prog in programs.items():
        parts[fn] = tmp / f"{fn}.mlpackage"
        _convert(prog, bits, mode=mode).save(str(parts[fn]))
    desc = ct.utils.MultiFunctionDescriptor()
    for fn, path in parts.items():
        desc.add_function(str(path), src_function_name="main", target_function_name=fn)
    desc.default_function_name = next(iter(parts))
    merged = tmp / "merged.mlpackage"
    ct.utils.save_multifunction(desc, str(merged))
    _save_with_metadata(merged, out, metadata)
    for path in (*parts.values(), merged):
        shutil.rmtree(path)


def _finish(tmp: Path, out_dir: Path, opts: BuildOptions, arch, names: dict, checkpoint: Path) -> None:
    """meta.yaml, tokenizer and config stub next to the parts, then the directory moved into place."""
    _write_meta(tmp / "meta.yaml", opts, arch, names, checkpoint)
    for f in TOKENIZER_FILES:
        if (checkpoint / f).is_file():
            shutil.copy2(checkpoint / f, tmp / f)
    _write_stub_config(tmp / "config.json", arch)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def _functions(arch, opts: BuildOptions) -> list[str]:
    if arch.family != "gemma3":
        return ["infer", "prefill"]
    # rotate functions only when the context exceeds the window (convert_model.sh), never with a single cache
    rotate = opts.context_length > arch.sliding_window and not opts.single_cache
    return [f for f in gemma3.FUNCTIONS if rotate or not f.endswith("_rotate")]


def _ffn_function(arch, weights, layers: range, fn: str, opts: BuildOptions, last: bool):
    C, B = opts.context_length, opts.batch_size
    S = max(opts.state_length or C, C)
    if arch.family == "gemma3":
        return gemma3.gemma3_ffn_program(arch, weights, layers, fn, B, C, S, last, opts.single_cache,
                                         opts.update_mask_prefill)
    T = B if fn == "prefill" else 1
    return ffn_program(arch, weights, layers, T, C, S, last, prefill=(fn == "prefill"))


def _gemma3_meta(opts: BuildOptions, arch, names: dict) -> dict:
    """The keys generate_meta_yaml.py (0.3.5) adds for a chunked Gemma 3 conversion (`ffn` with the chunk suffix,
    vocab_size and lm_head_chunk_sizes come from the 0.3.5 chunked keys): update_mask_prefill replaces
    prefill_dynamic_slice when asked."""
    chunk1 = names["chunks"][0]
    meta = {}
    if opts.split_rotate:
        meta.update({"split_rotate": True, "pf": f"{chunk1}_rot.mlmodelc"})
    meta["sliding_window"] = arch.sliding_window
    if opts.update_mask_prefill:
        meta["update_mask_prefill"] = True
    if opts.single_cache:
        meta["single_cache"] = True
    return meta


def _write_meta(path: Path, opts: BuildOptions, arch, names: dict, checkpoint: Path) -> None:
    import yaml

    info = {"name": opts.name or f"anemll-{checkpoint.name}-ctx{opts.context_length}"
                    + ("-monolithic" if opts.monolithic else ""),
            "version": opts.version,
            "description": f"{arch.model_type} converted by ane-eval's builder into the ANEMLL layout",
            "architecture": "gemma3_text" if arch.family == "gemma3" else arch.family}
    if opts.monolithic:
        info["model_type"] = "monolithic"
    params = _meta_params(opts, arch, names)
    if arch.family == "gemma3":
        params.update(_gemma3_meta(opts, arch, names))
        if opts.update_mask_prefill:
            params.pop("prefill_dynamic_slice", None)
    meta = {"model_info": {**info, "parameters": {**params, **opts.extra_meta}}}
    text = yaml.safe_dump(meta, sort_keys=False)
    if arch.family == "gemma3":  # 0.3.5 appends the conversion parameters as comments (generate_conversion_comments)
        text += ("\n# " + "=" * 77 + "\n# Conversion Parameters (for troubleshooting)\n# " + "=" * 77 + "\n"
                 f"# context_length: {opts.context_length}\n# batch_size: {opts.batch_size}\n"
                 f"# num_chunks: {opts.num_chunks}\n# converter: ane-eval\n")
    path.write_text(text)


def _meta_params(opts: BuildOptions, arch, names: dict) -> dict:
    """meta.yaml's parameters as upstream's generate_meta_yaml.py writes them. 0.3.4: `ffn` without the chunk
    suffix. 0.3.5 (chunked `main`, `generate_monolithic_meta`): `ffn` with the first chunk's suffix, `vocab_size`
    and `lm_head_chunk_sizes`, `argmax_in_model` when asked, `prefill_dynamic_slice` on (its default; these
    programs write the KV cache at any `current_pos`); a monolithic model has `lut_bits`, `monolithic_model` and
    `functions` instead of the part names."""
    lut = lambda b: b if b else "none"  # noqa: E731
    base = {"context_length": opts.context_length, "batch_size": opts.batch_size}
    new = opts.version == "0.3.5"
    head = {"split_lm_head": opts.split_lm_head}
    if new:
        head.update({**({"argmax_in_model": True} if opts.argmax else {}), "vocab_size": arch.vocab_size,
                     "lm_head_chunk_sizes": lm_head_splits(arch.vocab_size, opts.split_lm_head),
                     "prefill_dynamic_slice": True})
    if opts.monolithic:
        return {**base, "lut_bits": lut(opts.lut_ffn), "model_prefix": opts.prefix or arch.family,
                "monolithic_model": f"{names['monolithic']}.mlmodelc", **head, "functions": ["infer", "prefill"]}
    return {**base, "lut_embeddings": lut(opts.lut_embeddings), "lut_ffn": lut(opts.lut_ffn),
            "lut_lmhead": lut(opts.lut_lmhead), "num_chunks": opts.num_chunks,
            "model_prefix": opts.prefix or arch.family,
            # upstream names the compiled parts
            "embeddings": f"{names['embeddings']}.mlmodelc", "lm_head": f"{names['lm_head']}.mlmodelc",
            "ffn": f"{names['chunks'][0] if new else names['ffn']}.mlmodelc", **head}


def _write_stub_config(path: Path, arch) -> None:
    import json

    # the original checkpoint's geometry, under Hugging Face's key names: the contract's expected shapes come from
    # here and meta.yaml, independently of what the converted parts declare (contract.expected_geometry). 0.3.5's
    # Gemma 3 conversions write a stub saying "llama" (observed on a real run): kept, drivers must trust meta.yaml
    # and the programs; the Gemma 3 stub also records layer_types (which layers use the sliding-window cache)
    doc = {"model_type": "llama" if arch.family == "gemma3" else arch.model_type, "architectures": ["AnemllModel"],
           "vocab_size": arch.vocab_size, "hidden_size": arch.hidden_size, "num_hidden_layers": arch.num_layers,
           "num_attention_heads": arch.num_heads, "num_key_value_heads": arch.num_kv_heads, "head_dim": arch.head_dim}
    if arch.family == "gemma3":
        doc.update({"sliding_window": arch.sliding_window, "layer_types": list(arch.layer_types)})
    path.write_text(json.dumps(doc, indent=2) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ane_eval.convert", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    for f in ("context_length", "batch_size", "num_chunks", "split_lm_head", "lut_ffn", "lut_lmhead",
              "lut_embeddings", "state_length"):
        ap.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(BuildOptions, f))
    for f in ("single_cache", "split_rotate", "update_mask_prefill"):
        ap.add_argument("--" + f.replace("_", "-"), action="store_true", help="Gemma 3 only")
    ap.add_argument("--prefix")
    ap.add_argument("--lut-mode", choices=("kmeans", "uniform"), default="kmeans",
                    help="how LUTs are made (default kmeans, as ANEMLL; uniform: evenly spaced levels, much faster)")
    ap.add_argument("--argmax", action="store_true", help="LM head returns argmax_idx/argmax_val (ANEMLL 0.3.5)")
    ap.add_argument("--monolithic", action="store_true", help="one file: embeddings + layers + LM head (0.3.5)")
    ap.add_argument("--meta-version", choices=VERSIONS, help="meta.yaml layout (default 0.3.4, or 0.3.5 with "
                    "--argmax/--monolithic)")
    args = vars(ap.parse_args(argv))
    checkpoint, out = args.pop("checkpoint"), args.pop("out")
    try:
        print(build(checkpoint, out, BuildOptions(**args)))
    except (BuildError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["build", "BuildOptions", "BuildError", "CheckpointError", "STATE_NAME", "lm_head_splits", "part_names"]
