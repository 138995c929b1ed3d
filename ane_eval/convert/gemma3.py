"""MIL programs of a Gemma 3 text model in ANEMLL 0.3.5's layout.

Follows zkh2016/Anemll@4e77d00 `anemll/models/gemma3_model.py` and `anemll/ane_converter/gemma3_converter.py`:
- norms are Gemma's (1 + w) RMSNorm, four per layer (input, post_attention, pre_feedforward, post_feedforward),
  plus q_norm / k_norm over the head dim; the embeddings are scaled by sqrt(H); the MLP is
  gelu_pytorch_tanh(gate) * up; scores are scaled by query_pre_attn_scalar^-0.5; sliding layers use RoPE base
  `rope_local_base_freq`, full-attention layers `rope_theta` (HF transformers' modeling_gemma3.py, same numerics).
- split cache (GetTransformerStates): `model_model_kv_cache_local` [2·nLocal, Hkv, sliding_window, d] for the
  sliding layers, `model_model_kv_cache_global` [2·nGlobal, Hkv, state_length, d] for the full-attention layers,
  both declared by every chunk (a chunk without a layer of one kind touches that cache with `x + 0·cache[0,0,0,0]`,
  as upstream's wrappers do, so the state is used). K of a layer at its index within its kind, V at n + index.
- `infer` / `prefill` fill the local cache at the absolute position (positions < sliding_window);
  `infer_rotate` shifts it left by one and appends, `prefill_rotate` shifts by the batch and appends
  (_update_kv_local / _update_kv_local_prefill). Global layers always write at current_pos.
- single cache (`single_cache`): one `model_model_kv_cache_0` [2L, Hkv, state_length, d]; no rotate functions.
- `prefill` takes `update_mask` [1, 1, attention_size, B] when built with update_mask_prefill (static KV writes:
  cache·(1 − Σ mask) + mask·kv, _apply_update_mask_batch); otherwise it writes with a dynamic slice at current_pos
  (prefill_dynamic_slice, 0.3.5's default).

Deliberate differences from upstream, where its programs do not compute Gemma 3 (HF's sliding-window mask is
kv > q − sliding_window):
- upstream's prefill_rotate attends its local layers to the already-shifted cache under the all-zero first
  sliding_window mask columns, so a batch row sees later rows and misses the keys the shift dropped; here each row
  attends to [cache before the shift, the batch's own keys] under a constant mask (old slot j visible to row i
  iff j > i; own key k iff k <= i) — the same interface, the attention HF computes.
- upstream's unified cache ignores the window (local layers attend to the whole context); here the local layers add
  a window mask computed from the positions (key slot j visible iff j > position − sliding_window).
"""
from __future__ import annotations

import numpy as np

from .checkpoint import Arch
from .programs import F16, Graph, _i32, _mb

LOCAL_STATE = "model_model_kv_cache_local"
GLOBAL_STATE = "model_model_kv_cache_global"
UNIFIED_STATE = "model_model_kv_cache_0"
FUNCTIONS = ("infer", "infer_rotate", "prefill", "prefill_rotate")  # upstream's combine order; infer is the default
NEG_INF = np.float16(-np.inf)


def gemma_rope_tables(head_dim: int, theta: float, length: int) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    emb = np.outer(np.arange(length, dtype=np.float64), inv_freq)
    emb = np.concatenate([emb, emb], axis=-1)
    return np.cos(emb).astype(F16), np.sin(emb).astype(F16)


def norm_weights(weights: dict) -> dict:
    """Gemma's norms multiply by (1 + w): fold the 1 in once, so the programs multiply by one constant."""
    return {k: (1.0 + v if k.endswith("norm.weight") else v) for k, v in weights.items()}


def cache_slots(arch: Arch, single_cache: bool) -> dict:
    """layer -> (state name, K index, V index) (get_layer_cache_mapping)."""
    if single_cache:
        L = arch.num_layers
        return {i: (UNIFIED_STATE, i, L + i) for i in range(L)}
    local = [i for i, t in enumerate(arch.layer_types) if t == "sliding_attention"]
    glob = [i for i, t in enumerate(arch.layer_types) if t == "full_attention"]
    out = {i: (LOCAL_STATE, n, len(local) + n) for n, i in enumerate(local)}
    out.update({i: (GLOBAL_STATE, n, len(glob) + n) for n, i in enumerate(glob)})
    return out


def state_shapes(arch: Arch, state_len: int, single_cache: bool) -> dict:
    Hkv, d = arch.num_kv_heads, arch.head_dim
    if single_cache:
        return {UNIFIED_STATE: (2 * arch.num_layers, Hkv, state_len, d)}
    n_local = sum(t == "sliding_attention" for t in arch.layer_types)
    n_global = arch.num_layers - n_local
    return {LOCAL_STATE: (2 * n_local, Hkv, arch.sliding_window, d),
            GLOBAL_STATE: (2 * n_global, Hkv, state_len, d)}


class GemmaGraph(Graph):
    """One function of one chunk: `kind` is one of FUNCTIONS; `attention` the causal mask width."""

    def __init__(self, arch: Arch, weights, attention: int, state_len: int, kind: str, T: int, single_cache: bool,
                 states: dict, update_mask=None):
        super().__init__(arch, weights, attention, state_len)
        self.kind, self.T, self.single, self.states, self.update_mask = kind, T, single_cache, states, update_mask
        self.slots = cache_slots(arch, single_cache)
        self.rotating = kind.endswith("_rotate")

    def rope_for(self, positions, theta: float):
        mb, T, d = self.mb, self.T, self.a.head_dim
        cos, sin = gemma_rope_tables(d, theta, 2 * self.S)
        idx = mb.cast(x=mb.select(cond=mb.greater_equal(x=positions, y=np.int32(0)), a=positions,
                                  b=mb.add(x=positions, y=np.int32(2 * self.S))), dtype="int16")
        shape = _i32(1, 1, T, d)
        return (mb.reshape(x=mb.gather(x=cos, indices=idx, axis=0), shape=shape),
                mb.reshape(x=mb.gather(x=sin, indices=idx, axis=0), shape=shape))

    def slice_rows(self, cache, index: int, begin: int, end: int):  # one layer's K or V, slots begin..end-1
        a = self.a
        return self.mb.slice_by_index(x=cache, begin=_i32(index, 0, begin, 0),
                                      end=_i32(index + 1, a.num_kv_heads, end, a.head_dim))

    def write_masked(self, state, index: int, value, length: int):
        """Static write of a batch: cache·(1 − Σ_t mask) + Σ_t mask[:, t]·value[t] (_apply_update_mask_batch)."""
        mb = self.mb
        mask = mb.slice_by_index(x=self.update_mask, begin=_i32(0, 0, 0, 0), end=_i32(1, 1, length, self.T))
        cache = mb.read_state(input=state)
        old = self.slice_rows(cache, index, 0, length)
        placed = mb.matmul(x=mask, y=value)  # (1, 1, length, T) @ (1, Hkv, T, d) -> (1, Hkv, length, d)
        keep = mb.sub(x=F16(1.0), y=mb.reduce_sum(x=mask, axes=[-1], keep_dims=True))
        new = mb.add(x=mb.mul(x=old, y=keep), y=placed)
        a = self.a
        cache = mb.slice_update(x=cache, update=new, begin=_i32(index, 0, 0, 0),
                                end=_i32(index + 1, a.num_kv_heads, length, a.head_dim))
        mb.coreml_update_state(state=state, value=cache)
        return new  # attend to this, not to a re-read (see write_shifted)

    def write_shifted(self, state, index: int, value):
        """Local rotation: drop the oldest T slots, append `value` (_update_kv_local / _update_kv_local_prefill);
        returns (the rows before the shift, the rows after). Callers attend to these values, never to a second read
        of the state: coremltools' common-subexpression pass merges every read_state of a state into one, so a
        slice "after the write" would become the slice before it."""
        mb, a, sw = self.mb, self.a, self.a.sliding_window
        cache = mb.read_state(input=state)
        before = self.slice_rows(cache, index, 0, sw)
        kept = self.slice_rows(cache, index, self.T, sw)
        after = mb.concat(values=[kept, value], axis=2)
        cache = mb.slice_update(x=cache, update=after, begin=_i32(index, 0, 0, 0),
                                end=_i32(index + 1, a.num_kv_heads, sw, a.head_dim))
        mb.coreml_update_state(state=state, value=cache)
        return before, after

    def repeat(self, kv, length: int):
        a, mb = self.a, self.mb
        rep = a.num_heads // a.num_kv_heads
        if rep == 1:
            return kv
        kv = mb.tile(x=mb.expand_dims(x=kv, axes=[2]), reps=[1, 1, rep, 1, 1])
        return mb.reshape(x=kv, shape=_i32(1, a.num_heads, length, a.head_dim))

    def window_mask(self, positions, mask):
        """Unified cache only: hide key slots at or before position − sliding_window."""
        mb, T, A = self.mb, self.T, self.C
        pos = mb.reshape(x=mb.sub(x=positions, y=np.int32(self.a.sliding_window)), shape=_i32(1, 1, T, 1))
        visible = mb.greater(x=np.arange(A, dtype=np.int32).reshape(1, 1, 1, A), y=pos)
        return mb.add(x=mask, y=mb.select(cond=visible, a=np.zeros((1, 1, T, A), F16),
                                          b=np.full((1, 1, T, A), NEG_INF)))

    def keys_values(self, i: int, k, v, positions, mask, current_pos):
        """Write layer i's new K/V into its cache; returns (keys, values, mask) to attend with."""
        mb, a, T = self.mb, self.a, self.T
        state_name, ki, vi = self.slots[i]
        state = self.states[state_name]
        local = a.layer_types[i] == "sliding_attention"
        sw = a.sliding_window
        if local and not self.single and self.rotating:
            (old_k, new_k), (old_v, new_v) = self.write_shifted(state, ki, k), self.write_shifted(state, vi, v)
            if T == 1:  # infer_rotate: the shifted cache holds the window; every slot is visible
                local_mask = mb.slice_by_index(x=mask, begin=_i32(0, 0, 0, 0), end=_i32(1, 1, 1, sw))
                return new_k, new_v, local_mask, sw
            rows, cols = np.arange(T)[:, None], np.arange(sw + T)[None, :]
            visible = np.where(cols < sw, cols > rows, cols - sw <= rows)
            const_mask = np.where(visible, F16(0), NEG_INF).astype(F16)[None, None]
            return (mb.concat(values=[old_k, k], axis=2), mb.concat(values=[old_v, v], axis=2), const_mask, sw + T)
        length = sw if (local and not self.single) else self.C
        if length < self.C:
            mask = mb.slice_by_index(x=mask, begin=_i32(0, 0, 0, 0), end=_i32(1, 1, T, length))
        elif local:
            mask = self.window_mask(positions, mask)
        if self.update_mask is not None:
            return self.write_masked(state, ki, k, length), self.write_masked(state, vi, v, length), mask, length
        self.write_kv(state, ki, k, current_pos, T)
        self.write_kv(state, vi, v, current_pos, T)
        cache = mb.read_state(input=state)
        return self.slice_rows(cache, ki, 0, length), self.slice_rows(cache, vi, 0, length), mask, length

    def gemma_layer(self, i: int, x, positions, mask, current_pos):
        mb, a, T = self.mb, self.a, self.T
        p = f"model.layers.{i}."
        local = a.layer_types[i] == "sliding_attention"
        h = self.to_conv_layout(self.rmsnorm(x, p + "input_layernorm.weight", T))
        q = self.heads(self.conv(h, p + "self_attn.q_proj.weight"), a.num_heads, T, p + "self_attn.q_norm.weight")
        k = self.heads(self.conv(h, p + "self_attn.k_proj.weight"), a.num_kv_heads, T, p + "self_attn.k_norm.weight")
        v = self.heads(self.conv(h, p + "self_attn.v_proj.weight"), a.num_kv_heads, T, None)
        cos, sin = self.rope_for(positions, a.rope_local_theta if local else a.rope_theta)
        q, k = self.rotate_half(q, cos, sin), self.rotate_half(k, cos, sin)
        keys, values, mask, length = self.keys_values(i, k, v, positions, mask, current_pos)
        keys, values = self.repeat(keys, length), self.repeat(values, length)
        scores = mb.mul(x=mb.matmul(x=q, y=keys, transpose_y=True), y=F16(a.query_pre_attn_scalar ** -0.5))
        probs = mb.softmax(x=mb.add(x=scores, y=mask), axis=-1)
        attn = mb.transpose(x=mb.matmul(x=probs, y=values), perm=[0, 2, 1, 3])
        attn = mb.reshape(x=attn, shape=_i32(1, T, a.num_heads * a.head_dim))
        attn = self.from_conv_layout(self.conv(self.to_conv_layout(attn), p + "self_attn.o_proj.weight"))
        x = mb.add(x=x, y=self.rmsnorm(attn, p + "post_attention_layernorm.weight", T))
        h = self.to_conv_layout(self.rmsnorm(x, p + "pre_feedforward_layernorm.weight", T))
        gate = mb.gelu(x=self.conv(h, p + "mlp.gate_proj.weight"), mode="TANH_APPROXIMATION")
        down = self.conv(mb.mul(x=gate, y=self.conv(h, p + "mlp.up_proj.weight")), p + "mlp.down_proj.weight")
        return mb.add(x=x, y=self.rmsnorm(self.from_conv_layout(down), p + "post_feedforward_layernorm.weight", T))

    rotate_half = Graph.rotate


def gemma3_ffn_program(arch: Arch, weights, layers: range, kind: str, batch: int, attention: int, state_len: int,
                       last: bool, single_cache: bool, update_mask_prefill: bool):
    """One function of one FFN chunk (kind in FUNCTIONS)."""
    import coremltools as ct
    from coremltools.converters.mil.mil import types

    mb = _mb()
    H = arch.hidden_size
    prefill = kind.startswith("prefill")
    T = batch if prefill else 1
    shapes = state_shapes(arch, state_len, single_cache)
    specs = {"hidden_states": mb.TensorSpec(shape=(1, T, H), dtype=types.fp16),
             "position_ids": mb.TensorSpec(shape=(T,) if prefill else (1,), dtype=types.int32),
             "causal_mask": mb.TensorSpec(shape=(1, 1, T, attention), dtype=types.fp16),
             "current_pos": mb.TensorSpec(shape=(1,), dtype=types.int32)}
    with_update_mask = prefill and update_mask_prefill and kind == "prefill"  # upstream: not for prefill_rotate
    if with_update_mask:
        specs["update_mask"] = mb.TensorSpec(shape=(1, 1, attention, T), dtype=types.fp16)
    for name, shape in shapes.items():
        specs[name] = mb.StateTensorSpec(shape=shape, dtype=types.fp16)
    names = list(specs)

    def body(*args):
        env = dict(zip(names, args))
        states = {n: env[n] for n in shapes}
        g = GemmaGraph(arch, weights, attention, state_len, kind, T, single_cache, states,
                       update_mask=env.get("update_mask"))
        positions = env["position_ids"] if prefill else env["current_pos"]  # infer: RoPE index from current_pos
        x = env["hidden_states"]
        for i in layers:
            x = g.gemma_layer(i, x, positions, env["causal_mask"], env["current_pos"])
        used = {g.slots[i][0] for i in layers}
        for name in shapes:  # upstream's "touch both caches" so that every declared state is used
            if name not in used:
                cell = mb.slice_by_index(x=mb.read_state(input=states[name]), begin=_i32(0, 0, 0, 0),
                                         end=_i32(1, 1, 1, 1))
                x = mb.add(x=x, y=mb.reshape(x=mb.mul(x=cell, y=F16(0.0)), shape=_i32(1, 1, 1)))
        if last and prefill:  # upstream returns row 0 un-normed: prefill output is never used for logits
            return mb.slice_by_index(x=x, begin=_i32(0, 0, 0), end=_i32(1, 1, H), name="output_hidden_states")
        if last:
            x = g.rmsnorm(x, "model.norm.weight", T)
        return mb.identity(x=x, name="output_hidden_states")

    return mb.program(input_specs=list(specs.values()), opset_version=ct.target.iOS18)(_named(body, names))


def _named(body, names):
    """coremltools names a program's inputs after its function's parameters (`__code__.co_varnames`): wrap `body`
    in a function whose parameters are the input names (identifiers from this module, never from the model)."""
    assert all(n.isidentifier() for n in names)
    scope = {"body": body}
    exec(f"def program({', '.join(names)}):\n    return body({', '.join(names)})\n", scope)  # noqa: S102
    return scope["program"]


def gemma3_embeddings_program(arch: Arch, weights):
    """gather · sqrt(H) (EmbeddingsWrapper: the scale lives in the embeddings part)."""
    import coremltools as ct
    from coremltools.converters.mil.mil import get_new_symbol, types

    mb = _mb()
    table = weights["model.embed_tokens.weight"].astype(F16)
    scale = F16(np.float32(arch.hidden_size) ** 0.5)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, get_new_symbol()), dtype=types.int32)],
                opset_version=ct.target.iOS18)
    def program(input_ids):
        return mb.mul(x=mb.gather(x=table, indices=input_ids, axis=0), y=scale, name="hidden_states")

    return program
