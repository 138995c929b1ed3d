"""Plan-time rewrites of the op patterns converted transformers repeat in every layer, each into one op, and the
kernels of those fused ops (registered in the one kernel registry of ops.py, which knows nothing of fusion).

A decode step of a small model is hundreds of tiny ops, each costing more in dispatch than in arithmetic, and a
prefill attends over every KV-cache slot. Three patterns (as ANEMLL and our builder emit them) become one op each:

- masked attention: matmul(q, k^T) * scale + mask -> softmax (the op, or exp/reduce_max/reduce_sum/real_div) ->
  matmul(probs, v). The fused op computes only the key slots some row can see: slots the mask sets to -inf in
  every row contribute exactly 0. Results equal the unfused ops up to float32 summation order. Grouped-query
  attention's head repeat (reshape(tile(expand_dims(kv)))) joins the pattern: KV heads are read, not copied.
- rotary embedding: x * cos + concat(-x[..., h:], x[..., :h]) * sin. Bit-identical.
- mirrored layer norm (ANEMLL's RMSNorm): slice(layer_norm(concat(x, -x)), first half). Bit-identical.

A pattern is fused only when every intermediate is used inside it alone and has the output's dtype; each kernel
keeps every intermediate rounding of the ops it replaces (the interpreter passes `_round` in fp16 mode).

Then projections that read the same input (a layer's q, k and v; its gate and up) are stacked into one conv and a
split: one GEMM and one rounding pass instead of several. The dot products are the same; BLAS may sum them in
another float32 order for the taller matrix.
"""
from __future__ import annotations

import numpy as np

from . import ir
from .fp16 import widen
from .gemm import invariant_products, times_transposed
from .ops import center, f32, op, slices, softmax

# not MIL op names: internal entries of the kernel registry (each kernel returns a newly allocated array)
FUSED_ATTENTION = "ane_eval_masked_attention"
FUSED_ROTARY = "ane_eval_rotary"
FUSED_MIRRORED_NORM = "ane_eval_mirrored_layer_norm"
FUSED_OPS = {FUSED_ATTENTION, FUSED_ROTARY, FUSED_MIRRORED_NORM}


def fuse(ops: list[ir.Op], outputs: list[str]) -> list[ir.Op]:
    """`ops` with every rewrite of REWRITES applied."""
    for rewrite in REWRITES:
        ops = rewrite(ops, outputs)
    return ops


def fuse_patterns(ops: list[ir.Op], outputs: list[str]) -> list[ir.Op]:
    """`ops` with each matched pattern replaced by its fused op, placed where the pattern's last op was."""
    g = _Graph(ops, outputs)
    replaced: dict[int, ir.Op] = {}
    dropped: set[int] = set()
    for op in ops:
        for match in PATTERNS:
            found = match(g, op)
            if found is not None and not any(id(o) in dropped or id(o) in replaced for o in found[1]):
                replaced[id(op)] = found[0]
                dropped.update(id(o) for o in found[1])
                break
    if not replaced:
        return ops
    return [replaced.get(id(o), o) for o in ops if id(o) not in dropped]


class _Graph:
    def __init__(self, ops: list[ir.Op], outputs: list[str]):
        self.consts = {o.outputs[0][0]: o.attributes.get("val") for o in ops if o.type == "const" and o.outputs}
        self.producer = {name: op for op in ops for name, _ in op.outputs}
        self.uses: dict[str, int] = {}
        for op in ops:
            for bindings in op.inputs.values():
                for a in bindings:
                    if a.name is not None:
                        self.uses[a.name] = self.uses.get(a.name, 0) + 1
        for name in outputs:  # a block output is a use outside any pattern
            self.uses[name] = self.uses.get(name, 0) + 1

    def source(self, op: ir.Op, key: str, want: str, dtype: str, uses: int = 1) -> ir.Op | None:
        """The op of type `want` whose output feeds `op`'s input `key`, when that output has `dtype` and is read
        exactly `uses` times (all inside the pattern)."""
        name = op.input_name(key)
        src = self.producer.get(name) if name is not None else None
        if src is None or src.type != want or self.uses.get(name) != uses or _dtype(src) != dtype:
            return None
        return src

    def const(self, op: ir.Op, key: str):
        """The constant bound to an input, or None (absent, or computed at run time)."""
        args = op.inputs.get(key, [])
        if len(args) != 1:
            return None
        return self.consts.get(args[0].name) if args[0].name is not None else args[0].value

    def flag(self, op: ir.Op, key: str) -> bool | None:
        """A boolean input's constant value (False when absent, MIL's default); None when computed at run time."""
        if not op.inputs.get(key):
            return False
        v = self.const(op, key)
        return None if v is None else bool(np.asarray(v).reshape(-1)[0])

    def last_axis(self, op: ir.Op, key: str) -> bool:
        """True when the op works along the last axis only (reductions: keeping the dims)."""
        v = self.const(op, key)
        t = op.outputs[0][1]
        if v is None or not isinstance(t, ir.TensorType) or not t.rank:
            return False
        axes = [int(a) for a in np.asarray(v).reshape(-1)]
        keeps = op.type in ("softmax", "layer_norm", "concat") or self.flag(op, "keep_dims") is True
        return len(axes) == 1 and axes[0] % t.rank == t.rank - 1 and keeps

    def negation_of(self, op: ir.Op | None, x: str) -> bool:
        """op is mul(x, -1) in either operand order."""
        if op is None or op.type != "mul":
            return False
        for this, other in (("x", "y"), ("y", "x")):
            c = self.const(op, other)
            if op.input_name(this) == x and c is not None and np.size(c) == 1 and float(np.ravel(c)[0]) == -1:
                return True
        return False

    def half_slice(self, op: ir.Op | None, x: str, first: bool) -> bool:
        """op is slice_by_index(x) taking the first (or second) half of the last axis and all of the others."""
        if op is None or op.type != "slice_by_index" or op.input_name("x") != x:
            return False
        t = self.producer[x].outputs[0][1] if x in self.producer else None
        args = {k: self.const(op, k) for k in ("begin", "end", "stride", "begin_mask", "end_mask", "squeeze_mask")}
        if not isinstance(t, ir.TensorType) or None in t.shape or args["begin"] is None or args["end"] is None:
            return False
        try:
            index, squeezed = slices(tuple(t.shape), *(_tuple(args[k]) for k in args))
        except (ValueError, IndexError, TypeError):
            return False
        h = t.shape[-1] // 2
        want = slice(0, h) if first else slice(h, t.shape[-1])
        full = [i.indices(d) == (0, d, 1) for i, d in zip(index[:-1], t.shape[:-1])]
        return not squeezed and all(full) and index[-1].indices(t.shape[-1]) == want.indices(t.shape[-1]) \
            and t.shape[-1] % 2 == 0


def _dtype(op: ir.Op) -> str | None:
    t = op.outputs[0][1] if op.outputs else None
    return t.dtype if isinstance(t, ir.TensorType) else None


def _shape(op: ir.Op | None) -> tuple | None:
    t = op.outputs[0][1] if op is not None and op.outputs else None
    return tuple(t.shape) if isinstance(t, ir.TensorType) and None not in t.shape else None


def _tuple(v):
    return None if v is None else tuple(np.asarray(v).reshape(-1).tolist())


def _operands(op: ir.Op, g: _Graph, want: str, dtype: str):
    """For a binary op: (the source op of type `want` feeding one operand, the other operand's bindings)."""
    for this, other in (("x", "y"), ("y", "x")):
        src = g.source(op, this, want, dtype)
        if src is not None and len(op.inputs.get(other, [])) == 1:
            return src, op.inputs[other]
    return None, None


def _attention(g: _Graph, out: ir.Op):
    """out = matmul(probs, v) ending masked softmax attention."""
    if out.type != "matmul" or g.flag(out, "transpose_x") is not False or g.flag(out, "transpose_y") is not False:
        return None
    dtype = _dtype(out)
    probs = g.producer.get(out.input_name("x"))
    if probs is None:
        return None
    internal = []
    if probs.type == "softmax":
        if g.source(out, "x", "softmax", dtype) is None or not g.last_axis(probs, "axis"):
            return None
        scores = g.source(probs, "x", "add", dtype)
        internal += [probs]
    elif probs.type == "real_div":
        e = g.source(probs, "x", "exp", dtype, uses=2)
        z = g.source(probs, "y", "reduce_sum", dtype)
        if g.source(out, "x", "real_div", dtype) is None or e is None or z is None \
                or z.input_name("x") != e.outputs[0][0] or not g.last_axis(z, "axes"):
            return None
        d = g.source(e, "x", "sub", dtype)
        m = g.source(d, "y", "reduce_max", dtype) if d is not None else None
        if m is None or not g.last_axis(m, "axes"):
            return None
        scores = g.source(d, "x", "add", dtype, uses=2)
        if scores is None or m.input_name("x") != scores.outputs[0][0]:
            return None
        internal += [probs, e, z, d, m]
    else:
        return None
    if scores is None:
        return None
    scaled, mask = _operands(scores, g, "mul", dtype)
    raw, scale = _operands(scaled, g, "matmul", dtype) if scaled is not None else (None, None)
    if raw is None or g.flag(raw, "transpose_x") is not False or g.flag(raw, "transpose_y") is None:
        return None
    internal += [scores, scaled, raw]
    key, value, groups = raw.inputs["y"], out.inputs["y"], 1
    query, keys = g.producer.get(raw.input_name("x") or ""), g.producer.get(raw.input_name("y") or "")
    q_shape, k_shape = _shape(query), _shape(keys)
    if g.flag(raw, "transpose_y") and q_shape and k_shape and len(q_shape) == 4 and q_shape[:2] == k_shape[:2]:
        # grouped-query attention: read the KV heads without repeating them
        k_repeat, v_repeat = _head_repeat(g, raw, "y"), _head_repeat(g, out, "y")
        if k_repeat and v_repeat and k_repeat[1] == v_repeat[1]:
            (key, groups, k_ops), (value, _, v_ops) = k_repeat, v_repeat
            internal += k_ops + v_ops
    fused = ir.Op(type=FUSED_ATTENTION, outputs=list(out.outputs),
                  inputs={"query": raw.inputs["x"], "key": key, "value": value, "scale": scale, "mask": mask},
                  attributes={"name": out.name, "transpose_key": g.flag(raw, "transpose_y"),
                              "softmax_op": probs.type == "softmax", "groups": groups})
    return fused, internal


def _head_repeat(g: _Graph, op: ir.Op, key: str):
    """(bindings of x, r, the ops) when op's input `key` is reshape(tile(expand_dims(x, axes=[2]), reps (1,1,r,1,1)))
    from x (B, KV, S, D) to (B, KV*r, S, D): each KV head repeated for r query heads, as a converted model writes
    grouped-query attention."""
    name = op.input_name(key)
    reshape = g.producer.get(name) if name is not None else None
    if reshape is None or reshape.type != "reshape" or g.uses.get(name) != 1:
        return None
    tile = g.source(reshape, "x", "tile", _dtype(reshape))
    expand = g.source(tile, "x", "expand_dims", _dtype(reshape)) if tile is not None else None
    if expand is None or len(expand.inputs.get("x", [])) != 1:
        return None
    shapes = [_shape(o) for o in (g.producer.get(expand.input_name("x") or ""), expand, tile, reshape)]
    if None in shapes or len(shapes[0]) != 4:
        return None
    (b, kv, s, d), reps = shapes[0], _tuple(g.const(tile, "reps"))
    r = shapes[2][2] if len(shapes[2]) == 5 else 0
    if shapes[1] != (b, kv, 1, s, d) or reps != (1, 1, r, 1, 1) or shapes[3] != (b, kv * r, s, d) or r < 2:
        return None
    return expand.inputs["x"], r, [reshape, tile, expand]


def _rotary(g: _Graph, out: ir.Op):
    """out = add(mul(x, cos), mul(concat(mul(x[..., h:], -1), x[..., :h]), sin))."""
    if out.type != "add":
        return None
    dtype = _dtype(out)
    for a_key, b_key in (("x", "y"), ("y", "x")):
        a = g.source(out, a_key, "mul", dtype)
        b = g.source(out, b_key, "mul", dtype)
        if a is None or b is None:
            continue
        rot, sin = _operands(b, g, "concat", dtype)
        if rot is None or not g.last_axis(rot, "axis") or g.flag(rot, "interleave") is not False:
            continue
        parts = rot.inputs.get("values", [])
        if len(parts) != 2 or parts[0].name is None or parts[1].name is None:
            continue
        neg, x1 = g.producer.get(parts[0].name), g.producer.get(parts[1].name)
        if neg is None or x1 is None or g.uses.get(parts[0].name) != 1 or g.uses.get(parts[1].name) != 1:
            continue
        x = x1.input_name("x")
        x2 = g.producer.get(neg.input_name("x") or "")
        x2_name = x2.outputs[0][0] if x2 is not None else None
        if not (g.half_slice(x1, x, first=True) and g.negation_of(neg, x2_name) and g.uses.get(x2_name) == 1
                and g.half_slice(x2, x, first=False) and _dtype(neg) == _dtype(x1) == _dtype(x2) == dtype):
            continue
        for this, other in (("x", "y"), ("y", "x")):
            if a.input_name(this) == x and len(a.inputs.get(other, [])) == 1:
                fused = ir.Op(type=FUSED_ROTARY, outputs=list(out.outputs), attributes={"name": out.name},
                              inputs={"x": a.inputs[this], "cos": a.inputs[other], "sin": sin})
                return fused, [a, b, rot, neg, x1, x2]
    return None


def _mirrored_norm(g: _Graph, out: ir.Op):
    """out = slice_by_index(layer_norm(concat(x, mul(x, -1)), last axis), first half): ANEMLL's RMSNorm."""
    if out.type != "slice_by_index":
        return None
    dtype = _dtype(out)
    norm = g.source(out, "x", "layer_norm", dtype)
    if norm is None or not g.last_axis(norm, "axes") or norm.inputs.get("gamma") or norm.inputs.get("beta"):
        return None
    doubled = g.source(norm, "x", "concat", dtype)
    if doubled is None or not g.last_axis(doubled, "axis") or g.flag(doubled, "interleave") is not False:
        return None
    parts = doubled.inputs.get("values", [])
    if len(parts) != 2 or parts[0].name is None or parts[1].name is None:
        return None
    neg = g.producer.get(parts[1].name)
    if g.uses.get(parts[1].name) != 1 or not g.negation_of(neg, parts[0].name) or _dtype(neg) != dtype \
            or not g.half_slice(out, norm.outputs[0][0], first=True):
        return None
    fused = ir.Op(type=FUSED_MIRRORED_NORM, outputs=list(out.outputs), attributes={"name": out.name},
                  inputs={"x": [parts[0]], **({"epsilon": norm.inputs["epsilon"]} if "epsilon" in norm.inputs else {})})
    return fused, [norm, doubled, neg]


PATTERNS = (_attention, _rotary, _mirrored_norm)


def stack_projections(ops: list[ir.Op], outputs: list[str]) -> list[ir.Op]:
    """Pointwise convs reading one input, each with a stored weight of its own, become one conv over the weights
    stacked along the output channels and a split into the original outputs, placed where the first conv was."""
    g = _Graph(ops, outputs)
    siblings: dict[tuple, list[ir.Op]] = {}
    for op in ops:
        key = _projection_key(g, op)
        if key is not None:
            siblings.setdefault(key, []).append(op)
    placed: dict[int, list[ir.Op]] = {}
    dropped: set[int] = set()
    for group in siblings.values():
        if len(group) < 2:
            continue
        weights = [g.producer[o.input_name("weight")] for o in group]
        refs = tuple(w.attributes["val"] for w in weights)
        rows = [r.type.shape[0] for r in refs]
        first, out_type = group[0], group[0].outputs[0][1]
        stacked = f"ane_eval_stacked_{first.outputs[0][0]}"
        w_type = ir.TensorType(refs[0].type.dtype, (sum(rows),) + tuple(refs[0].type.shape[1:]))
        y_type = ir.TensorType(out_type.dtype, (out_type.shape[0], sum(rows)) + tuple(out_type.shape[2:]))
        placed[id(first)] = [
            ir.Op("const", {}, [(stacked + "_weight", w_type)],
                  {"name": stacked + "_weight", "val": ir.StackedBlobs(refs, w_type)}),
            ir.Op("conv", {**first.inputs, "weight": [ir.Arg(name=stacked + "_weight")]}, [(stacked, y_type)],
                  {"name": stacked}),
            ir.Op("split", {"x": [ir.Arg(name=stacked)], "axis": [ir.Arg(value=np.int32(1))],
                            "split_sizes": [ir.Arg(value=np.array(rows, np.int32))]},
                  [o.outputs[0] for o in group], {"name": stacked + "_split"})]
        dropped.update(id(o) for o in group + weights)
    out = []
    for o in ops:
        if id(o) in placed:
            out += placed[id(o)]
        elif id(o) not in dropped:
            out.append(o)
    return out


def _projection_key(g: _Graph, op: ir.Op) -> tuple | None:
    """What sibling projections share (input, weight layout, settings), for a 1x1 stride-1 ungrouped conv without
    bias whose weight is a stored constant read by it alone; None for any other op."""
    if op.type != "conv" or op.input_name("x") is None or "bias" in op.inputs or len(op.outputs) != 1:
        return None
    name = op.input_name("weight")
    weight = g.producer.get(name) if name is not None else None
    ref = weight.attributes.get("val") if weight is not None and weight.type == "const" else None
    out = op.outputs[0][1]
    if not isinstance(ref, ir.BlobRef) or ref.type.dtype not in ("fp16", "fp32") or g.uses.get(name) != 1 \
            or len(ref.type.shape) < 3 or any(d != 1 for d in ref.type.shape[2:]) \
            or not isinstance(out, ir.TensorType) or out.rank < 2:
        return None
    settings = {k: g.const(op, k) for k in op.inputs if k not in ("x", "weight")}
    if any(v is None for v in settings.values()) or str(settings.get("pad_type", "valid")) == "custom" \
            or int(np.asarray(settings.get("groups", 1))) != 1 \
            or any(s != 1 for s in np.asarray(settings.get("strides", 1)).reshape(-1)):
        return None
    return (op.input_name("x"), ref.type.dtype, tuple(ref.type.shape[1:]), out.dtype,
            tuple(sorted((k, repr(np.asarray(v).tolist())) for k, v in settings.items())))


REWRITES = (fuse_patterns, stack_projections)


# --- the fused ops' kernels, next to the patterns they replace ----------------------------------------------------
@op(FUSED_ATTENTION)
def masked_attention(query, key, value, scale, mask, transpose_key=True, softmax_op=False, groups=1, _round=None):
    """The attention pattern `fuse` replaces, on the key slots some row can see: slots the mask sets to -inf in
    every row add exactly 0. With `groups` > 1, key and value hold the KV heads, each serving `groups`
    consecutive query heads. `_round` is the intermediates' rounding (the interpreter passes it in fp16 mode),
    applied where the unfused ops' outputs were rounded; it may round in place, so it only sees arrays made
    here. In fp16 mode, on the fp16 KV state, the products are the project's GEMM's (gemm.invariant_products): a
    row's scores and output are the same bits alone (a decode step) as among a prefill batch's rows."""
    r = _round or _same
    q, m = f32(query), f32(mask)
    slots = key.shape[-2] if transpose_key else key.shape[-1]
    live = _live_slots(m, slots)
    if live < slots:
        key = key[..., :live, :] if transpose_key else key[..., :live]
        value, m = value[..., :live, :], m[..., :live]
    own = _round is not None and key.dtype == value.dtype == np.float16 and q.ndim == 4 and invariant_products()
    if own:  # fp16 mode, the fp16 KV state: the project's GEMM, the same sums whatever the batch (gemm.py)
        scores = _per_kv_head(q, key if transpose_key else key.swapaxes(-1, -2), groups)
    else:
        keys_t = widen(key).swapaxes(-1, -2) if transpose_key else widen(key)  # (..., D, live slots)
        values = widen(value)  # keys and values are usually slices of the fp16 KV state
        if groups > 1:  # (B, KV, groups, T, D) against (B, KV, 1, D, S): per head the products of repeated heads
            b, h, t, _ = q.shape
            q, keys_t, values = q.reshape(b, h // groups, groups, t, -1), keys_t[:, :, None], values[:, :, None]
        scores = np.matmul(q, keys_t)
        if groups > 1:
            scores = scores.reshape(b, h, t, -1)
    # scores, then exponentials, are rewritten in place where they lie (a 64-row prefill batch's are megabytes:
    # each fresh array cost more than the arithmetic); the values are those of the unfused ops, bit for bit
    scale = f32(scale)
    if np.broadcast_shapes(scores.shape, scale.shape, m.shape) == scores.shape:
        scores = r(scores)
        np.multiply(scores, scale, out=scores)
        scores = r(scores)
        np.add(scores, m, out=scores)
        scores = r(scores)
    else:
        scores = r(r(r(scores) * scale) + m)
    if softmax_op:
        probs = r(softmax(scores, -1))
    else:
        np.subtract(scores, scores.max(-1, keepdims=True), out=scores)
        e = r(scores)
        np.exp(e, out=e)
        e = r(e)
        np.divide(e, r(e.sum(-1, keepdims=True)), out=e)
        probs = r(e)
    if own:
        return _per_kv_head(probs, value.swapaxes(-1, -2), groups)
    if groups == 1:
        return np.matmul(probs, values)
    return np.matmul(probs.reshape(b, h // groups, groups, t, -1), values).reshape(b, h, t, -1)


def _per_kv_head(x, w, groups):
    """x (B, H, T, K) float32 times w (B, H / groups, N, K) fp16, transposed: (B, H, T, N), one GEMM per KV head
    over the rows of its `groups` query heads (one call for all of them)."""
    b, h, t, k = x.shape
    out = times_transposed(x.reshape(b, h // groups, groups * t, k), w)
    return out.reshape(b, h, t, w.shape[-2])


@op(FUSED_ROTARY)
def rotary(x, cos, sin, _round=None):
    """x * cos + rotate_half(x) * sin, rotate_half(x) = concat(-x[..., h:], x[..., :h]) (exact)."""
    r = _round or _same
    x = f32(x)
    h = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    return r(x * f32(cos)) + r(rotated * f32(sin))


@op(FUSED_MIRRORED_NORM)
def mirrored_layer_norm(x, epsilon=1e-5, _round=None):
    """The first half of layer_norm(concat(x, -x)) over the last axis: ANEMLL's RMSNorm, computed as written."""
    r = _round or _same
    x = f32(x)
    doubled = np.concatenate([x, -x], axis=-1)
    centered, std = center(doubled, (x.ndim - 1,), epsilon)
    return r(centered[..., :x.shape[-1]] / std)  # layer_norm's last step, on the kept half only


def _same(x):
    return x


def _live_slots(mask: np.ndarray, slots: int) -> int:
    """1 + the last key slot the mask leaves visible to some row (all slots when the mask broadcasts over them)."""
    if mask.ndim == 0 or mask.shape[-1] != slots:
        return slots
    # NaN counts as visible (it reaches the output either way): only == -inf hides a slot
    visible = np.flatnonzero(mask.reshape(-1, slots).max(axis=0) != -np.inf)
    return int(visible[-1]) + 1 if visible.size else slots
