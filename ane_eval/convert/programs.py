"""MIL programs with the same numerics as ANEMLL 0.3.4's converted models (ANEMLL-CONTRACT.md §3), plus 0.3.5's
argmax LM head and monolithic model (anemll/ane_converter/llama_converter.py at zkh2016/Anemll 4e77d00e:
`convert_lm_head(argmax_in_model=True)`, `convert_monolithic`).

Linear layers are 1×1 convs on (1, C, 1, T); RMSNorm is layer_norm over [x, −x]; RoPE tables are gathered by
position; the KV cache is one fp16 state of shape (2L, Hkv, S, d) updated with slice_update; the causal mask is an
additive input. Everything is built in fp16 so the conversion inserts no casts of its own.
"""
from __future__ import annotations

import numpy as np

from ..contract import even_split as lm_head_splits  # widths of the logits outputs: V//K, the first V%K one larger
from .checkpoint import Arch

F16 = np.float16
STATE_NAME = "model_model_kv_cache_0"


def _mb():
    from coremltools.converters.mil import Builder as mb
    return mb


def _i32(*values):
    return np.array(values, dtype=np.int32)


def rope_tables(arch: Arch, length: int) -> tuple[np.ndarray, np.ndarray]:
    d = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    freqs = np.outer(np.arange(length, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(F16), np.sin(emb).astype(F16)


class Graph:
    """Helpers emitting the op patterns of the converted models, for one function of one chunk."""

    def __init__(self, arch: Arch, weights: dict[str, np.ndarray], context: int, state_len: int):
        self.a, self.w, self.C, self.S = arch, weights, context, state_len
        self.mb = _mb()

    def param(self, name: str) -> np.ndarray:
        return self.w[name].astype(F16)

    def rmsnorm(self, x, weight: str, T: int):
        mb, H = self.mb, self.a.hidden_size
        doubled = mb.concat(values=[x, mb.mul(x=x, y=F16(-1.0))], axis=-1)
        normed = mb.layer_norm(x=doubled, axes=[-1], epsilon=F16(self.a.rms_norm_eps))
        half = mb.slice_by_index(x=normed, begin=_i32(0, 0, 0), end=_i32(1, T, H))
        return mb.mul(x=half, y=self.param(weight))

    def to_conv_layout(self, x):  # (1, T, H) -> (1, H, 1, T)
        mb = self.mb
        return mb.expand_dims(x=mb.transpose(x=x, perm=[0, 2, 1]), axes=[2])

    def from_conv_layout(self, x):  # (1, H, 1, T) -> (1, T, H)
        mb = self.mb
        return mb.transpose(x=mb.squeeze(x=x, axes=[2]), perm=[0, 2, 1])

    def conv(self, x, weight: str, bias: str | None = None):
        w = self.param(weight)
        kwargs = {"bias": self.param(bias)} if bias and bias in self.w else {}
        return self.mb.conv(x=x, weight=w[:, :, None, None], **kwargs)

    def rope(self, positions, T: int):
        """cos, sin of shape (1, 1, T, d), gathered with the converter's negative-index fix and int16 cast."""
        mb = self.mb
        cos, sin = rope_tables(self.a, self.S)
        idx = mb.select(cond=mb.greater_equal(x=positions, y=np.int32(0)), a=positions,
                        b=mb.add(x=positions, y=np.int32(self.S)))
        idx = mb.cast(x=idx, dtype="int16")
        shape = _i32(1, 1, T, self.a.head_dim)
        return (mb.reshape(x=mb.gather(x=cos, indices=idx, axis=0), shape=shape),
                mb.reshape(x=mb.gather(x=sin, indices=idx, axis=0), shape=shape))

    def rotate(self, x, cos, sin):
        mb, d = self.mb, self.a.head_dim
        x1 = mb.slice_by_index(x=x, begin=_i32(0, 0, 0, 0), end=_i32(0, 0, 0, d // 2),
                               end_mask=[True, True, True, False])
        x2 = mb.slice_by_index(x=x, begin=_i32(0, 0, 0, d // 2), end=_i32(0, 0, 0, d),
                               end_mask=[True, True, True, False])
        rotated = mb.concat(values=[mb.mul(x=x2, y=F16(-1.0)), x1], axis=-1)
        return mb.add(x=mb.mul(x=x, y=cos), y=mb.mul(x=rotated, y=sin))

    def heads(self, x, n: int, T: int, norm: str | None):  # (1, n*d, 1, T) -> (1, n, T, d)
        mb, d = self.mb, self.a.head_dim
        x = mb.transpose(x=mb.reshape(x=x, shape=_i32(1, n, d, T)), perm=[0, 1, 3, 2])
        if norm and norm in self.w:  # Qwen3 q_norm / k_norm over the head dim
            doubled = mb.concat(values=[x, mb.mul(x=x, y=F16(-1.0))], axis=-1)
            normed = mb.layer_norm(x=doubled, axes=[-1], epsilon=F16(self.a.rms_norm_eps))
            x = mb.mul(x=mb.slice_by_index(x=normed, begin=_i32(0, 0, 0, 0), end=_i32(1, n, T, d)),
                       y=self.param(norm))
        return x

    def write_kv(self, state, index: int, value, current_pos, T: int):
        mb, a = self.mb, self.a
        cache = mb.read_state(input=state)
        begin = mb.concat(values=[_i32(index, 0), current_pos, _i32(0)], axis=0)
        end = mb.concat(values=[_i32(index + 1, a.num_kv_heads), mb.add(x=current_pos, y=np.int32(T)),
                                _i32(a.head_dim)], axis=0)
        cache = mb.slice_update(x=cache, update=value, begin=begin, end=end)
        mb.coreml_update_state(state=state, value=cache)

    def read_kv(self, state, index: int):  # the first C slots of one layer's K or V, repeated for GQA
        mb, a = self.mb, self.a
        cache = mb.read_state(input=state)
        kv = mb.slice_by_index(x=cache, begin=_i32(index, 0, 0, 0), end=_i32(index + 1, a.num_kv_heads, self.C, a.head_dim))
        rep = a.num_heads // a.num_kv_heads
        if rep == 1:
            return kv
        kv = mb.tile(x=mb.expand_dims(x=kv, axes=[2]), reps=[1, 1, rep, 1, 1])
        return mb.reshape(x=kv, shape=_i32(1, a.num_heads, self.C, a.head_dim))

    def softmax(self, x):
        mb = self.mb
        if self.a.family == "qwen":
            return mb.softmax(x=x, axis=-1)
        e = mb.exp(x=mb.sub(x=x, y=mb.reduce_max(x=x, axes=[-1], keep_dims=True)))
        return mb.real_div(x=e, y=mb.reduce_sum(x=e, axes=[-1], keep_dims=True))

    def layer(self, i: int, x, positions, mask, current_pos, state, T: int):
        mb, a = self.mb, self.a
        p = f"model.layers.{i}."
        h = self.to_conv_layout(self.rmsnorm(x, p + "input_layernorm.weight", T))
        q = self.heads(self.conv(h, p + "self_attn.q_proj.weight", p + "self_attn.q_proj.bias"), a.num_heads, T,
                       p + "self_attn.q_norm.weight")
        k = self.heads(self.conv(h, p + "self_attn.k_proj.weight", p + "self_attn.k_proj.bias"), a.num_kv_heads, T,
                       p + "self_attn.k_norm.weight")
        v = self.heads(self.conv(h, p + "self_attn.v_proj.weight", p + "self_attn.v_proj.bias"), a.num_kv_heads, T,
                       None)
        cos, sin = self.rope(positions, T)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        self.write_kv(state, i, k, current_pos, T)
        self.write_kv(state, a.num_layers + i, v, current_pos, T)
        keys, values = self.read_kv(state, i), self.read_kv(state, a.num_layers + i)
        scores = mb.mul(x=mb.matmul(x=q, y=keys, transpose_y=True), y=F16(1.0 / np.sqrt(a.head_dim)))
        probs = self.softmax(mb.add(x=scores, y=mask))
        attn = mb.transpose(x=mb.matmul(x=probs, y=values), perm=[0, 2, 1, 3])
        attn = mb.reshape(x=attn, shape=_i32(1, T, a.num_heads * a.head_dim))
        x = mb.add(x=x, y=mb.linear(x=attn, weight=self.param(p + "self_attn.o_proj.weight")))
        h = self.to_conv_layout(self.rmsnorm(x, p + "post_attention_layernorm.weight", T))
        gate = self.conv(h, p + "mlp.gate_proj.weight")
        up = self.conv(h, p + "mlp.up_proj.weight")
        down = self.conv(mb.mul(x=mb.silu(x=gate), y=up), p + "mlp.down_proj.weight")
        return mb.add(x=x, y=self.from_conv_layout(down))


def _stateful_specs(arch: Arch, first, T: int, context: int, state_len: int, prefill: bool) -> list:
    """`first` (the token input), position_ids, causal_mask, current_pos and the KV-cache state."""
    from coremltools.converters.mil.mil import types

    mb = _mb()
    state_shape = (2 * arch.num_layers, arch.num_kv_heads, state_len, arch.head_dim)
    return [first, mb.TensorSpec(shape=(T,) if prefill else (1,), dtype=types.int32),
            mb.TensorSpec(shape=(1, 1, T, context), dtype=types.fp16), mb.TensorSpec(shape=(1,), dtype=types.int32),
            mb.StateTensorSpec(shape=state_shape, dtype=types.fp16)]


def _decoder(g: Graph, x, layers: range, position_ids, causal_mask, current_pos, state, T: int, last: bool,
             prefill: bool, name: str | None = None):
    mb, H = g.mb, g.a.hidden_size
    # infer takes its RoPE index from current_pos; position_ids is declared but unused, as upstream
    positions = position_ids if prefill else current_pos
    for i in layers:
        x = g.layer(i, x, positions, causal_mask, current_pos, state, T)
    if last and prefill:  # upstream returns row 0 un-normed: prefill output is never used for logits
        return mb.slice_by_index(x=x, begin=_i32(0, 0, 0), end=_i32(1, 1, H), **({"name": name} if name else {}))
    if last:
        x = g.rmsnorm(x, "model.norm.weight", T)
    return mb.identity(x=x, name=name) if name else x


def ffn_program(arch: Arch, weights, layers: range, T: int, context: int, state_len: int, last: bool,
                prefill: bool):
    """One function of one FFN chunk: `infer` (T = 1) or `prefill` (T = compiled batch)."""
    import coremltools as ct
    from coremltools.converters.mil.mil import types

    mb = _mb()
    first = mb.TensorSpec(shape=(1, T, arch.hidden_size), dtype=types.fp16)

    @mb.program(input_specs=_stateful_specs(arch, first, T, context, state_len, prefill),
                opset_version=ct.target.iOS18)
    def program(hidden_states, position_ids, causal_mask, current_pos, model_model_kv_cache_0):
        g = Graph(arch, weights, context, state_len)
        return _decoder(g, hidden_states, layers, position_ids, causal_mask, current_pos, model_model_kv_cache_0, T,
                        last, prefill, name="output_hidden_states")

    return program


def monolithic_program(arch: Arch, weights, T: int, context: int, state_len: int, prefill: bool, parts: int,
                       argmax: bool):
    """One function of a monolithic model (llama_converter.convert_monolithic): input_ids -> embeddings -> every
    layer -> LM head. `prefill` returns the logits of row 0 (un-normed, never used) and never the argmax
    ("argmax_in_model and not is_prefill")."""
    import coremltools as ct
    from coremltools.converters.mil.mil import types

    mb = _mb()
    table = weights["model.embed_tokens.weight"].astype(F16)
    first = mb.TensorSpec(shape=(1, T), dtype=types.int32)

    @mb.program(input_specs=_stateful_specs(arch, first, T, context, state_len, prefill),
                opset_version=ct.target.iOS18)
    def program(input_ids, position_ids, causal_mask, current_pos, model_model_kv_cache_0):
        g = Graph(arch, weights, context, state_len)
        x = mb.gather(x=table, indices=input_ids, axis=0)
        x = _decoder(g, x, range(arch.num_layers), position_ids, causal_mask, current_pos, model_model_kv_cache_0,
                     T, True, prefill)
        return _lm_head_outputs(mb, x, _lm_head_weight(arch, weights), parts, argmax and not prefill)

    return program


def embeddings_program(arch: Arch, weights):
    import coremltools as ct
    from coremltools.converters.mil.mil import get_new_symbol, types

    mb = _mb()
    table = weights["model.embed_tokens.weight"].astype(F16)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, get_new_symbol()), dtype=types.int32)],
                opset_version=ct.target.iOS18)
    def program(input_ids):
        return mb.gather(x=table, indices=input_ids, axis=0, name="hidden_states")

    return program




def _lm_head_weight(arch: Arch, weights) -> np.ndarray:
    key = "model.embed_tokens.weight" if arch.tie_word_embeddings or "lm_head.weight" not in weights else "lm_head.weight"
    return weights[key].astype(F16)


def _lm_head_outputs(mb, hidden_states, full: np.ndarray, parts: int, argmax: bool) -> tuple:
    """logits1..K (1, 1, width) from (1, 1, H); with `argmax`, per vocabulary chunk the local index of its largest
    logit and that logit instead, as llama_converter's LMHeadWrapper(argmax_mode=True): torch.argmax(keepdim) cast
    to int32, torch.gather of the value, both concatenated over chunks and squeezed to [K]. Ties resolve to the
    first index, within a chunk and (on the host) across chunks, like an argmax over the concatenated logits."""
    widths = lm_head_splits(full.shape[0], parts)
    starts = np.cumsum([0] + widths)
    x = mb.expand_dims(x=mb.transpose(x=hidden_states, perm=[0, 2, 1]), axes=[2])  # (1, H, 1, 1)
    logits = []
    for i, width in enumerate(widths):
        w = full[starts[i]:starts[i + 1]][:, :, None, None]
        logits.append(mb.reshape(x=mb.conv(x=x, weight=w), shape=_i32(1, 1, width),
                                 **({} if argmax else {"name": f"logits{i + 1}"})))
    if not argmax:
        return tuple(logits)
    idx = [mb.reduce_argmax(x=chunk, axis=-1, keep_dims=True) for chunk in logits]  # (1, 1, 1) int32
    val = [mb.gather_along_axis(x=chunk, indices=i, axis=-1) for chunk, i in zip(logits, idx)]
    k = _i32(len(widths))
    return (mb.reshape(x=mb.concat(values=idx, axis=-1), shape=k, name="argmax_idx"),
            mb.reshape(x=mb.concat(values=val, axis=-1), shape=k, name="argmax_val"))


def lm_head_program(arch: Arch, weights, parts: int, argmax: bool = False):
    import coremltools as ct
    from coremltools.converters.mil.mil import types

    mb = _mb()
    full = _lm_head_weight(arch, weights)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 1, arch.hidden_size), dtype=types.fp16)],
                opset_version=ct.target.iOS18)
    def program(hidden_states):
        return _lm_head_outputs(mb, hidden_states, full, parts, argmax)

    return program
