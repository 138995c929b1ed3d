"""A model directory's card: parts, interfaces, metadata, consistency verdicts, ops, LUT bits, size.

Read from the specs only (no weights are decompressed), so it works on any machine and on broken directories.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from . import contract, memory
from .backends import auto_backend, coreml_available
from .bundle import Bundle, discover, load_tokenizer


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _program_facts(path: Path) -> dict:
    """Op histogram per function, LUT bits and parameter count (dequantized element count, deduplicated)."""
    from .mil import frontends, ir

    program = frontends.load(path)
    ops, bits, params = {}, set(), {}
    for name, fn in program.functions.items():
        ops[name] = dict(Counter(o.type for o in fn.block.operations if o.type != "const").most_common())
        produced = {}
        for o in fn.block.operations:
            for out_name, _ in o.outputs:
                produced[out_name] = o
        consumed_by_constexpr = set()
        for o in fn.block.operations:
            if o.type.startswith("constexpr_"):
                for args in o.inputs.values():
                    consumed_by_constexpr.update(a.name for a in args if a.name)
        for o in fn.block.operations:
            if o.type == "constexpr_lut_to_dense":
                # the LUT is an input (a name or inline), or in the older text form an attribute
                lut_arg = o.inputs.get("lut", [ir.Arg(value=o.attributes.get("lut"))])[0]
                lut = produced.get(lut_arg.name) if lut_arg.name else None
                lut_val = lut.attributes.get("val") if lut else lut_arg.value
                shape = lut_val.type.shape if isinstance(lut_val, ir.BlobRef) else getattr(lut_val, "shape", ())
                if len(shape) >= 2:
                    bits.add(int(math.log2(shape[-2] if len(shape) > 2 else shape[0])))
            is_weight = (o.type.startswith("constexpr_") or (
                o.type == "const" and isinstance(o.attributes.get("val"), ir.BlobRef)
                and o.outputs[0][0] not in consumed_by_constexpr))
            if is_weight:
                t = o.outputs[0][1]
                # the same weight in several functions: one stored blob (a decompression: the blobs it reads)
                refs = [a.value for args in o.inputs.values() for a in args if isinstance(a.value, ir.BlobRef)]
                refs += [produced[a.name].attributes.get("val") for args in o.inputs.values() for a in args
                         if a.name in produced and produced[a.name].type == "const"]
                refs = sorted(str(r.offset) for r in refs if isinstance(r, ir.BlobRef))
                key = str(o.attributes["val"].offset) if o.type == "const" else (o.type, *refs) if refs else \
                    (o.type, o.outputs[0][0])
                params[key] = math.prod(d or 0 for d in t.shape)
    return {"ops": ops, "lut_bits": sorted(bits), "parameters": sum(params.values())}


def model_card(model_dir) -> dict:
    model_dir = Path(model_dir)
    backend = auto_backend()[0]
    bundle: Bundle = discover(model_dir, backend=backend)
    described = contract.describe_parts(bundle)
    layout = bundle.layout
    card = {"directory": str(model_dir), "name": bundle.name, "architecture": bundle.architecture,
            "meta": bundle.meta, "layout": {"version": layout.version, "model_type": layout.model_type,
                                            "prefill": layout.prefill_rule, "head": _head(bundle, described),
                                            "sliding_window": layout.sliding_window,
                                            "kv_caches": _kv_caches(described, layout)},
            "parts": [], "backends": _backends()}
    for role, path in contract.part_paths(bundle).items():
        label = role
        if role.startswith("chunk"):  # chunkNN, or chunkNN_rot for a split-rotate companion
            number, _, rot = role[5:].partition("_")
            label = f"chunk {int(number)}" + (" (rotate functions)" if rot else "")
        entry = {"role": label, "file": path.name, "size_bytes": _size(path)}
        part = described[role]
        entry["metadata"] = {k: v for k, v in part.metadata.items() if k.startswith("com.anemll")}
        entry["functions"] = {name: {kind: [{"name": f.name, "shape": list(f.shape), "dtype": f.dtype,
                                             **({"shapes": [list(s) for s in f.shapes]} if f.shapes else {})}
                                            for f in getattr(sig, kind)]
                                     for kind in ("inputs", "outputs", "states")}
                              for name, sig in part.functions.items()}
        entry.update(_program_facts(path))
        card["parts"].append(entry)
    card["parameters"] = sum(p.get("parameters", 0) for p in card["parts"])
    card["size_bytes"] = sum(p["size_bytes"] for p in card["parts"])
    resident = {precision: memory.model_resident_bytes(bundle, described, precision) for precision in ("fp16", "fp32")}
    for entry, role in zip(card["parts"], contract.part_paths(bundle)):
        entry["resident_bytes"] = {precision: r[role] for precision, r in resident.items()}
    card["resident_bytes"] = {precision: {"weights": r["total"] - r["state"], "state": r["state"], "total": r["total"]}
                              for precision, r in resident.items()}
    card["available_bytes"] = memory.available_bytes()
    try:
        tokenizer_size = len(load_tokenizer(bundle))
        card["tokenizer_size"] = tokenizer_size
        geometry = contract.cross_check(bundle, described, tokenizer_size)
        card["consistency"] = {"ok": True, "context_length": geometry.context_length,
                               "batch_size": geometry.batch_size, "hidden_size": geometry.hidden_size,
                               "state_shape": list(geometry.state_shape or ()),
                               "states": {k: list(v) for k, v in (geometry.states or {}).items()},
                               "vocab_size": sum(geometry.logits_widths)}
    except ValueError as e:
        card["consistency"] = {"ok": False, "problems": str(e)}
    return card


def _head(bundle, described: dict) -> str:
    """Which LM head the model has, from the program's outputs (meta.yaml's argmax_in_model for compiled parts)."""
    part = described.get(contract.MONOLITHIC) or described.get("lm_head")
    fn = "infer" if contract.MONOLITHIC in described else None
    names = {f.name for f in part.signature(fn).outputs} if part is not None else set()
    if set(contract.ARGMAX_OUTPUTS) <= names or (part is None and bundle.layout.argmax_in_model):
        return "argmax"
    return "logits"


def _kv_caches(described: dict, layout) -> list[dict]:
    """The KV caches the programs declare, [2·layers, Hkv, positions, d] each, and which layers they hold: Gemma 3's
    split caches (gemma3_converter.py: `_local` for the sliding-window layers, `_global` for the full-attention
    ones), or one cache for every layer (0.3.4, and Gemma 3 with single_cache)."""
    states = {}
    for (_, _, kind, name), (shape, _) in contract.declared_interface(described).items():
        if kind == "states" and shape:
            states.setdefault(name, list(shape))
    rotates = any(fn.endswith("_rotate") for part in described.values() for fn in part.functions)
    caches = []
    for name, shape in sorted(states.items()):
        kind = ("local" if name.endswith("_local") else "global" if name.endswith("_global")
                else "unified" if layout.sliding_window else "whole model")
        kv_layout = len(shape) == 4  # anything else is declared, shown, and left to the consistency check
        caches.append({"name": name, "shape": shape, "kind": kind, "layers": shape[0] // 2 if kv_layout else None,
                       "positions": shape[2] if kv_layout else None, "rotates": kind == "local" and rotates})
    return caches


CACHE_KINDS = {"local": "local (sliding-window layers)", "global": "global (full-attention layers)",
               "whole model": "one cache for every layer",
               "unified": "unified (sliding-window and full-attention layers)"}


def _format_cache(c: dict, sliding_window) -> str:
    text = f"{c['name']} {tuple(c['shape'])}: {CACHE_KINDS[c['kind']]}"
    if c["layers"] is not None:
        text += f", layers {c['layers']}, positions {c['positions']}"
    if c["rotates"]:
        text += f", shifted past the window of {sliding_window} by infer_rotate / prefill_rotate"
    return text


HEADS = {"argmax": "argmax (argmax_idx/argmax_val per vocabulary chunk: greedy generation only, no loglikelihoods)",
         "logits": "logits (a distribution: every task type)"}


def _backends() -> dict:
    ok, why = coreml_available()
    return {"mil": "available (portable runtime)", "coreml": "available" if ok else f"unavailable: {why}"}


def format_card(card: dict) -> str:
    lines = [f"{card['name']}  ({card['architecture']})  {card['directory']}"]
    c = card["consistency"]
    if c["ok"]:
        lines.append(f"consistency: OK  context {c['context_length']}, prefill batch {c['batch_size']}, hidden "
                     f"{c['hidden_size'] or '-'}, vocab {c['vocab_size']} (tokenizer {card.get('tokenizer_size')}), "
                     + ", ".join(f"state {name} {tuple(shape)}" for name, shape in c["states"].items()))
    else:
        lines.append(f"consistency: FAILED  {c['problems']}")
    lay = card["layout"]
    lines.append(f"layout: ANEMLL {lay['version'] or '?'} {lay['model_type']}, prefill {lay['prefill']}; "
                 f"LM head: {HEADS[lay['head']]}")
    if lay["kv_caches"]:
        lines.append("KV cache: " + "; ".join(_format_cache(c, lay["sliding_window"]) for c in lay["kv_caches"]))
    lines.append(f"parameters: {card['parameters']:,}   size on disk: {card['size_bytes'] / 2**20:.1f} MiB")
    r16, r32 = card["resident_bytes"]["fp16"], card["resident_bytes"]["fp32"]
    available = card["available_bytes"]
    lines.append(f"resident in the portable runtime: {r16['total'] / 2**20:.1f} MiB in fp16 mode (weights "
                 f"{r16['weights'] / 2**20:.1f} + KV cache {r16['state'] / 2**20:.1f}; "
                 f"{r16['weights'] / max(card['parameters'], 1):.2f} bytes per parameter), "
                 f"{r32['total'] / 2**20:.1f} MiB in fp32 mode; available here: "
                 + (f"{available / 2**20:.0f} MiB" if available is not None else "unknown"))
    if card["meta"]:
        lines.append("meta.yaml: " + ", ".join(f"{k}={v}" for k, v in card["meta"].items()))
    for p in card["parts"]:
        lut = f"LUT {'/'.join(map(str, p['lut_bits']))}-bit" if p.get("lut_bits") else "fp16 (no LUT)"
        lines.append(f"\n[{p['role']}] {p['file']}  {p['size_bytes'] / 2**20:.2f} MiB  {lut}  "
                     f"{p.get('parameters', 0):,} params  resident {p['resident_bytes']['fp16'] / 2**20:.2f} MiB "
                     "(fp16 mode)")
        if p.get("metadata"):
            lines.append("  metadata: " + ", ".join(f"{k.split('.')[-1]}={v}" for k, v in p["metadata"].items()))
        for fname, io in p.get("functions", {}).items():
            lines.append(f"  function {fname}:")
            for kind in ("inputs", "outputs", "states"):
                for f in io[kind]:
                    shape = " | ".join(str(tuple(s)) for s in f["shapes"]) if f.get("shapes") else str(tuple(f["shape"]))
                    lines.append(f"    {kind[:-1]:6} {f['name']:24} {shape:22} {f['dtype']}")
            ops = p.get("ops", {}).get(fname, {})
            if ops:
                lines.append("    ops: " + ", ".join(f"{k}×{v}" for k, v in ops.items()))
    lines.append("\nbackends: " + "; ".join(f"{k}: {v}" for k, v in card["backends"].items()))
    return "\n".join(lines)
