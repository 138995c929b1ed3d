"""Plan-time rewrite: masked softmax attention as one op that skips the key slots the mask removes.

A converted model attends over every slot of its KV cache (the context length) for every query row, and masks
the slots past the current position with -inf. Slots masked in every row contribute exactly nothing (exp(-inf) is
0), so `attention` computes the same ops on the live prefix only: during a 256-token prefill of a 512-slot cache,
less than a third of the scores. The rewrite matches

    scores = matmul(q, k, transpose_y) * scale + mask
    probs  = softmax(scores)   or   exp(scores - reduce_max(scores)) / reduce_sum(exp(...))
    out    = matmul(probs, v)

with every intermediate used only inside the pattern and of the output's dtype, and keeps every intermediate
rounding. Results equal the unfused ops up to float32 summation order (the sums run over fewer zeros).
"""
from __future__ import annotations

import numpy as np

from . import ir

FUSED_ATTENTION = "ane_eval_masked_attention"  # not a MIL op name: the kernel registry's internal entry


def fuse_attention(ops: list[ir.Op], outputs: list[str]) -> list[ir.Op]:
    """`ops` with each matched attention pattern replaced by one FUSED_ATTENTION op (at the final matmul's place)."""
    consts = {o.outputs[0][0]: o.attributes.get("val") for o in ops if o.type == "const" and o.outputs}
    producer = {name: op for op in ops for name, _ in op.outputs}
    uses: dict[str, list[ir.Op]] = {}
    for op in ops:
        for bindings in op.inputs.values():
            for a in bindings:
                if a.name is not None:
                    uses.setdefault(a.name, []).append(op)
    for name in outputs:
        uses.setdefault(name, []).append(None)  # a block output is a use outside any pattern

    replaced: dict[int, ir.Op] = {}
    dropped: set[int] = set()
    for op in ops:
        match = _match(op, producer, uses, consts)
        if match is not None:
            fused, internal = match
            if any(id(o) in dropped for o in internal):
                continue
            replaced[id(op)] = fused
            dropped.update(id(o) for o in internal)
    if not replaced:
        return ops
    return [replaced.get(id(o), o) for o in ops if id(o) not in dropped or id(o) in replaced]


def _match(out_op: ir.Op, producer, uses, consts):
    """(fused op, the pattern's other ops) when `out_op` is matmul(probs, v) ending the pattern, else None."""
    if out_op.type != "matmul" or _flag(out_op, "transpose_x", consts) is not False \
            or _flag(out_op, "transpose_y", consts) is not False:
        return None
    dtype = out_op.outputs[0][1].dtype if isinstance(out_op.outputs[0][1], ir.TensorType) else None
    chain: list[ir.Op] = []

    def single(op, key, want, n_uses=1):
        """The op of type `want` feeding op's input `key`, used only n_uses times (all inside the pattern)."""
        args = op.inputs.get(key, [])
        if len(args) != 1 or args[0].name is None:
            return None
        src = producer.get(args[0].name)
        if src is None or src.type != want or len(uses.get(args[0].name, [])) != n_uses:
            return None
        t = src.outputs[0][1]
        if not isinstance(t, ir.TensorType) or t.dtype != dtype:
            return None
        chain.append(src)
        return src

    probs = _producer_of(out_op, "x", producer)
    if probs is None:
        return None
    if probs.type == "softmax":
        if not _last_axis(probs, "axis", consts) or single(out_op, "x", "softmax") is None:
            return None
        scores = single(probs, "x", "add")
    elif probs.type == "real_div":
        if single(out_op, "x", "real_div") is None:
            return None
        e = single(probs, "x", "exp", n_uses=2)
        z = single(probs, "y", "reduce_sum")
        if e is None or z is None or _arg_name(z, "x") != e.outputs[0][0] or not _last_axis(z, "axes", consts):
            return None
        d = single(e, "x", "sub")
        if d is None:
            return None
        m = single(d, "y", "reduce_max")
        if m is None or not _last_axis(m, "axes", consts):
            return None
        scores = single(d, "x", "add", n_uses=2)
        if scores is None or _arg_name(m, "x") != scores.outputs[0][0]:
            return None
    else:
        return None
    if scores is None:
        return None
    # scores = add(mul(matmul(q, k), scale), mask), either operand order
    scaled, mask = _split(scores, "mul", producer)
    if scaled is None or len(uses.get(scaled.outputs[0][0], [])) != 1 or scaled.outputs[0][1].dtype != dtype:
        return None
    chain.append(scaled)
    raw, scale = _split(scaled, "matmul", producer)
    if raw is None or len(uses.get(raw.outputs[0][0], [])) != 1 or raw.outputs[0][1].dtype != dtype:
        return None
    transpose_key = _flag(raw, "transpose_y", consts)
    if _flag(raw, "transpose_x", consts) is not False or transpose_key is None:
        return None
    chain.append(raw)
    inputs = {"query": raw.inputs["x"], "key": raw.inputs["y"], "value": out_op.inputs["y"], "scale": scale,
              "mask": mask}
    fused = ir.Op(type=FUSED_ATTENTION, inputs=inputs, outputs=list(out_op.outputs),
                  attributes={"name": out_op.name, "transpose_key": transpose_key,
                              "softmax_op": probs.type == "softmax"})
    return fused, chain


def _producer_of(op, key, producer):
    args = op.inputs.get(key, [])
    return producer.get(args[0].name) if len(args) == 1 and args[0].name is not None else None


def _arg_name(op, key):
    args = op.inputs.get(key, [])
    return args[0].name if len(args) == 1 else None


def _split(op, want: str, producer):
    """For a binary op: (the operand produced by an op of type `want`, the other operand's bindings)."""
    for this, other in (("x", "y"), ("y", "x")):
        src = _producer_of(op, this, producer)
        if src is not None and src.type == want and len(op.inputs.get(other, [])) == 1:
            return src, op.inputs[other]
    return None, None


def _const(op, key, consts):
    """The constant bound to an input, or None (absent, or computed at run time)."""
    args = op.inputs.get(key, [])
    if len(args) != 1:
        return None
    return consts.get(args[0].name) if args[0].name is not None else args[0].value


def _flag(op, key, consts) -> bool | None:
    """A boolean input's constant value (False when absent, MIL's default); None when computed at run time."""
    if not op.inputs.get(key):
        return False
    v = _const(op, key, consts)
    return None if v is None else bool(np.asarray(v).reshape(-1)[0])


def _last_axis(op, key, consts) -> bool:
    """True when the op reduces over (or normalizes along) the last axis only, keeping the dims."""
    v = _const(op, key, consts)
    t = op.outputs[0][1]
    if v is None or not isinstance(t, ir.TensorType) or not t.rank:
        return False
    axes = [int(a) for a in np.asarray(v).reshape(-1)]
    keeps = op.type == "softmax" or _flag(op, "keep_dims", consts) is True
    return len(axes) == 1 and axes[0] % t.rank == t.rank - 1 and keeps
