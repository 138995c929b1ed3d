"""Op kernels: one small numpy function per ML Program op, in one registry.

Kernels compute in float32 (integers in their own dtype); the interpreter rounds every output to its declared
dtype afterwards (fp16 emulation), so a kernel never needs to know the precision. Semantics follow the MIL op
definitions in coremltools (`converters/mil/mil/ops/defs`). Kernels return fresh arrays, except the few the
interpreter lists as views (`VIEW_OPS`), which matters for its in-place state updates. Kernels run under
`np.errstate(all="ignore")`, set once per call by the interpreter: overflow to inf and NaN are IEEE results
here, not warnings.
"""
from __future__ import annotations

import functools
import math
import sys

import numpy as np

from .blob import PackedBits, unpack_bits
from .gemm import weight_product

KERNELS: dict = {}
# ops whose outputs may share memory with an input (the interpreter tracks these for in-place state updates)
VIEW_OPS = {"identity", "reshape", "expand_dims", "squeeze", "transpose", "read_state", "slice_update",
            "coreml_update_state"}
# ops whose kernels always return newly allocated results (never an input, a constant or a view of one): the
# interpreter rounds these outputs in place (the fused kernels of fuse.py are all such)
FRESH_OPS = {"add", "sub", "mul", "real_div", "pow", "exp", "log", "sqrt", "rsqrt", "inverse", "sigmoid", "silu",
             "softplus", "gelu", "tanh", "softmax", "layer_norm", "instance_norm", "l2_norm", "linear", "matmul",
             "conv", "scaled_dot_product_attention"}
# ops evaluated once at load time when all inputs are constant (weights decompression and friends)
CONSTEXPR = {"constexpr_lut_to_dense", "constexpr_affine_dequantize", "constexpr_blockwise_shift_scale",
             "constexpr_sparse_to_dense", "constexpr_cast"}


class OpError(ValueError):
    pass


def op(*names):
    def register(fn):
        for n in names:
            KERNELS[n] = fn
        return fn
    return register


def ints(x) -> list[int] | tuple:
    if isinstance(x, tuple):  # constant arguments arrive as tuples of ints (converted once at load)
        return x
    return np.asarray(x).reshape(-1).tolist()


def axes_of(x, rank: int) -> list[int]:
    return [a % rank if rank else 0 for a in ints(x)]


def f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


class StateBuffer:
    """A state's storage: `value` is replaced or updated in place by write_state."""

    def __init__(self, value: np.ndarray):
        self.value = value


# --- state -----------------------------------------------------------------------------------------------------
@op("read_state")
def read_state(input):
    return input.value


@op("write_state")
def write_state(input=None, data=None, state=None, value=None):
    # serialized programs name the inputs (input, data); pymil's builder names them (state, value)
    buffer, new = (input, data) if input is not None else (state, value)
    if new is not buffer.value:
        buffer.value[...] = new
    return None


@op("coreml_update_state")
def coreml_update_state(state, value):
    write_state(state=state, value=value)
    return state.value


# --- elementwise -----------------------------------------------------------------------------------------------
_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "maximum": np.maximum, "minimum": np.minimum,
    "equal": np.equal, "not_equal": np.not_equal, "greater": np.greater, "greater_equal": np.greater_equal,
    "less": np.less, "less_equal": np.less_equal, "logical_and": np.logical_and, "logical_or": np.logical_or,
    "logical_xor": np.logical_xor,
}


def _elementwise(ufunc):
    def kernel(x, y):
        return ufunc(x, y)
    kernel.ufunc = ufunc  # the interpreter calls it directly
    return kernel


for _name, _fn in _BINARY.items():
    KERNELS[_name] = _elementwise(_fn)


@op("real_div")
def real_div(x, y):
    return np.true_divide(f32(x), f32(y))


@op("floor_div")
def floor_div(x, y):
    return np.floor_divide(x, y)


@op("mod")
def mod(x, y):
    return np.mod(x, y)


@op("pow")
def pow_(x, y):
    return np.power(f32(x), f32(y))


_UNARY = {
    "abs": np.abs, "ceil": np.ceil, "floor": np.floor, "round": np.round, "sign": np.sign, "sin": np.sin,
    "cos": np.cos, "tan": np.tan, "asin": np.arcsin, "acos": np.arccos, "atan": np.arctan, "sinh": np.sinh,
    "cosh": np.cosh, "tanh": np.tanh, "exp2": np.exp2, "square": np.square, "logical_not": np.logical_not,
}
for _name, _fn in _UNARY.items():
    KERNELS[_name] = (lambda fn: lambda x: fn(x))(_fn)


@op("exp")
def exp(x):
    return np.exp(f32(x))


@op("log")
def log(x, epsilon=1e-45):
    return np.log(f32(x) + np.float32(epsilon))


@op("sqrt")
def sqrt(x):
    return np.sqrt(f32(x))


@op("rsqrt")
def rsqrt(x, epsilon=1e-12):
    return 1.0 / np.sqrt(f32(x) + np.float32(epsilon))


@op("inverse")
def inverse(x, epsilon=1e-4):
    return 1.0 / (f32(x) + np.float32(epsilon))


@op("erf")
def erf(x):
    return _erf(f32(x))


def _erf(x):
    # Abramowitz-Stegun 7.1.26 is too coarse for fp32 parity; use math.erf elementwise through frompyfunc
    return np.vectorize(math.erf, otypes=[np.float32])(x)


@op("clip")
def clip(x, alpha, beta):
    return np.clip(f32(x), np.float32(alpha), np.float32(beta))


@op("relu")
def relu(x):
    return np.maximum(f32(x), 0)


@op("relu6")
def relu6(x):
    return np.clip(f32(x), 0, 6)


@op("leaky_relu")
def leaky_relu(x, alpha=0.01):
    x = f32(x)
    return np.where(x >= 0, x, x * np.float32(alpha))


@op("elu")
def elu(x, alpha=1.0):
    x = f32(x)
    return np.where(x > 0, x, np.float32(alpha) * (np.exp(x) - 1))


@op("sigmoid")
def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-f32(x)))


@op("silu")
def silu(x):
    x = f32(x)
    d = np.negative(x)  # x / (1 + exp(-x)) in one array: an FFN's prefill batch is megabytes
    np.exp(d, out=d)
    d += np.float32(1)
    return np.divide(x, d, out=d)


@op("softplus")
def softplus(x):
    return np.logaddexp(0, f32(x))


@op("gelu")
def gelu(x, mode="EXACT"):
    x = f32(x)
    mode = str(mode)
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(np.float32(math.sqrt(2 / math.pi)) * (x + np.float32(0.044715) * x ** 3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * sigmoid(np.float32(1.702) * x)
    return 0.5 * x * (1 + _erf(x / np.float32(math.sqrt(2))))


@op("select")
def select(cond, a, b):
    return np.where(cond, a, b)


@op("cast")
def cast(x, dtype):
    return np.asarray(x)  # the interpreter converts to the declared output dtype (truncation, wrap-around)


@op("identity")
def identity(x):
    return x


# --- reductions and normalization ------------------------------------------------------------------------------
def _reduce(fn):
    def kernel(x, axes=None, keep_dims=False):
        x = np.asarray(x)
        ax = tuple(axes_of(axes, x.ndim)) if axes is not None else None
        return fn(x, axis=ax, keepdims=bool(keep_dims))
    return kernel


KERNELS["reduce_sum"] = _reduce(lambda x, **k: np.sum(f32(x), **k))
KERNELS["reduce_mean"] = _reduce(lambda x, **k: np.mean(f32(x), **k))
KERNELS["reduce_max"] = _reduce(np.max)
KERNELS["reduce_min"] = _reduce(np.min)
KERNELS["reduce_prod"] = _reduce(lambda x, **k: np.prod(f32(x), **k))
KERNELS["reduce_sum_square"] = _reduce(lambda x, **k: np.sum(f32(x) ** 2, **k))
KERNELS["reduce_l1_norm"] = _reduce(lambda x, **k: np.sum(np.abs(f32(x)), **k))
KERNELS["reduce_l2_norm"] = _reduce(lambda x, **k: np.sqrt(np.sum(f32(x) ** 2, **k)))
KERNELS["reduce_log_sum"] = _reduce(lambda x, **k: np.log(np.sum(f32(x), **k)))
KERNELS["reduce_log_sum_exp"] = _reduce(lambda x, **k: _logsumexp(f32(x), **k))


def _logsumexp(x, axis, keepdims):
    m = np.max(x, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


def _arg(fn):
    def kernel(x, axis=-1, keep_dims=False, output_dtype="int32"):
        out = fn(np.asarray(x), axis=int(axis))
        return np.expand_dims(out, int(axis)) if keep_dims else out
    return kernel


KERNELS["reduce_argmax"] = _arg(np.argmax)
KERNELS["reduce_argmin"] = _arg(np.argmin)


@op("softmax")
def softmax(x, axis=-1):
    x = f32(x)
    e = np.exp(x - np.max(x, axis=int(axis), keepdims=True))
    return e / np.sum(e, axis=int(axis), keepdims=True)


@op("layer_norm")
def layer_norm(x, axes=None, gamma=None, beta=None, epsilon=1e-5):
    x = f32(x)
    ax = tuple(axes_of(axes, x.ndim)) if axes is not None else tuple(range(x.ndim))
    centered, std = center(x, ax, epsilon)
    out = centered / std
    if gamma is not None:
        out = out * f32(gamma)
    if beta is not None:
        out = out + f32(beta)
    return out


def center(x, ax, epsilon):
    """layer_norm's x - mean and sqrt(var + epsilon) over the axes `ax`."""
    count = np.float32(math.prod(x.shape[a] for a in ax))
    # np.add.reduce / count is what np.mean computes for float32, without its Python-level overhead
    centered = x - np.add.reduce(x, axis=ax, keepdims=True) / count
    var = np.add.reduce(centered * centered, axis=ax, keepdims=True) / count
    return centered, np.sqrt(var + np.float32(epsilon))


@op("instance_norm")
def instance_norm(x, gamma=None, beta=None, epsilon=1e-5):
    x = f32(x)
    ax = tuple(range(2, x.ndim))
    out = (x - x.mean(axis=ax, keepdims=True)) / np.sqrt(x.var(axis=ax, keepdims=True) + np.float32(epsilon))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if gamma is not None:
        out = out * f32(gamma).reshape(shape)
    if beta is not None:
        out = out + f32(beta).reshape(shape)
    return out


@op("l2_norm")
def l2_norm(x, epsilon=1e-6):
    x = f32(x)  # normalizes over the last three dims, batch-wise over the rest
    return x / np.sqrt(np.sum(x * x, axis=(-3, -2, -1), keepdims=True) + np.float32(epsilon))


# --- linear algebra --------------------------------------------------------------------------------------------
@op("linear")
def linear(x, weight, bias=None, _fp16_values=False):
    weight, x = np.asarray(weight), f32(x)
    rows = x.reshape(-1, x.shape[-1])
    if weight.dtype == np.float16:  # held in its stored precision (gemm.py); `_fp16_values` as there
        out = weight_product(weight, rows.T, _fp16_values)
    else:  # the same operand order as the fp16 weight's blocks: BLAS may sum x @ w.T in another order
        out = f32(weight) @ rows.T
    out = out.T.reshape(x.shape[:-1] + (weight.shape[0],))
    return out + f32(bias) if bias is not None else out


@op("matmul")
def matmul(x, y, transpose_x=False, transpose_y=False):
    x, y = f32(x), f32(y)
    if transpose_x and x.ndim > 1:
        x = np.swapaxes(x, -1, -2)
    if transpose_y and y.ndim > 1:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@op("einsum")
def einsum(values, equation):
    return np.einsum(str(equation), *[f32(v) for v in values])


@op("conv")
def conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1,
         _fp16_values=False):
    x, w = f32(x), np.asarray(weight)
    n_spatial = x.ndim - 2
    if _pointwise(w.shape, tuple(ints(strides or ())), int(groups), str(pad_type)):
        # 1x1 conv (every linear layer of an ANEMLL model): one matmul over the flattened spatial positions
        n, cin = x.shape[:2]
        if n == 1 and w.dtype == np.float16:  # held in its stored precision (gemm.py); `_fp16_values` as there
            out = weight_product(w.reshape(-1, cin), x.reshape(cin, -1), _fp16_values)
            out = out.reshape((1, -1) + x.shape[2:])
        elif n == 1:  # a plain 2-D GEMM: numpy's batched matmul path is several times slower for one batch
            out = (f32(w).reshape(-1, cin) @ x.reshape(cin, -1)).reshape((1, -1) + x.shape[2:])
        else:
            out = np.matmul(f32(w).reshape(-1, cin), x.reshape(n, cin, -1)).reshape((n, -1) + x.shape[2:])
    else:
        w = f32(w)
        k = w.shape[2:]
        strides = ints(strides) if strides is not None else [1] * n_spatial
        dilations = ints(dilations) if dilations is not None else [1] * n_spatial
        x = _pad_conv(x, k, strides, dilations, str(pad_type), pad)
        out = _conv_general(x, w, strides, dilations, int(groups))
    if bias is not None:
        out = out + f32(bias).reshape((1, -1) + (1,) * n_spatial)
    return out


@functools.lru_cache(maxsize=None)
def _pointwise(w_shape, strides, groups, pad_type) -> bool:
    """A 1x1, stride-1, ungrouped conv (cached per layer shape)."""
    return all(s == 1 for s in w_shape[2:] + strides) and groups == 1 and pad_type != "custom"


def _pad_conv(x, k, strides, dilations, pad_type, pad):
    n_spatial = x.ndim - 2
    if pad_type == "valid":
        return x
    widths = []
    for i in range(n_spatial):
        eff = (k[i] - 1) * dilations[i] + 1
        if pad_type == "custom":
            p = ints(pad)
            widths.append((p[2 * i], p[2 * i + 1]))
        else:  # same / same_lower: output size ceil(in / stride)
            size = x.shape[2 + i]
            total = max((math.ceil(size / strides[i]) - 1) * strides[i] + eff - size, 0)
            small, big = total // 2, total - total // 2
            widths.append((small, big) if pad_type == "same" else (big, small))
    return np.pad(x, [(0, 0), (0, 0)] + widths)


def _conv_general(x, w, strides, dilations, groups):
    """Grouped, strided, dilated 1-D/2-D (any-D) convolution via sliding windows and one einsum per group."""
    n_spatial = x.ndim - 2
    k = w.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(
        x, [(k[i] - 1) * dilations[i] + 1 for i in range(n_spatial)], axis=tuple(range(2, x.ndim)))
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + tuple(
        slice(None, None, d) for d in dilations)
    windows = windows[index]  # (N, Cin, *out, *k)
    cin_g, cout_g = w.shape[1], w.shape[0] // groups
    letters = "abcdefgh"[:n_spatial]
    kl = "ijklmnop"[:n_spatial]
    outs = [np.einsum(f"nc{letters}{kl},oc{kl}->no{letters}", windows[:, g * cin_g:(g + 1) * cin_g],
                      w[g * cout_g:(g + 1) * cout_g], optimize=True) for g in range(groups)]
    return np.concatenate(outs, axis=1)


@op("scaled_dot_product_attention")
def scaled_dot_product_attention(query, key, value, attn_mask=None):
    q, k, v = f32(query), f32(key), f32(value)
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) / np.float32(math.sqrt(q.shape[-1]))
    if attn_mask is not None:
        mask = np.asarray(attn_mask)
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + f32(mask)
    return np.matmul(softmax(scores, -1), v)


# --- shapes and indexing ---------------------------------------------------------------------------------------
@op("reshape")
def reshape(x, shape):
    x = np.asarray(x)
    return x.reshape(_reshaped(x.shape, tuple(ints(shape))))


@functools.lru_cache(maxsize=4096)
def _reshaped(shape, target) -> tuple:
    return tuple(shape[i] if s == 0 else s for i, s in enumerate(target))  # 0 keeps the input's dimension


@op("expand_dims")
def expand_dims(x, axes):
    x = np.asarray(x)
    return x.reshape(_expanded(x.shape, tuple(ints(axes))))


@functools.lru_cache(maxsize=None)
def _expanded(shape, axes) -> tuple:
    shape = list(shape)
    rank = len(shape) + len(ints(axes))
    for a in sorted(a % rank for a in ints(axes)):
        shape.insert(a, 1)
    return tuple(shape)


@op("squeeze")
def squeeze(x, axes=None):
    x = np.asarray(x)
    if axes is None:
        return np.squeeze(x)
    return x.reshape(_squeezed(x.shape, tuple(ints(axes))))


@functools.lru_cache(maxsize=None)
def _squeezed(shape, axes) -> tuple:
    drop = set(axes_of(axes, len(shape)))
    if any(shape[a] != 1 for a in drop):
        raise OpError(f"squeeze: axes {ints(axes)} of a tensor of shape {shape} are not all of size 1")
    return tuple(d for i, d in enumerate(shape) if i not in drop)


@op("transpose")
def transpose(x, perm):
    return np.asarray(x).transpose(ints(perm))


@op("tile")
def tile(x, reps):
    x, reps = np.asarray(x), ints(reps)
    repeated = [a for a, r in enumerate(reps) if r != 1]
    if len(reps) == x.ndim and len(repeated) == 1 and x.shape[repeated[0]] == 1:
        return np.repeat(x, reps[repeated[0]], axis=repeated[0])  # one size-1 axis (a grouped-query KV repeat)
    return np.tile(x, reps)


@op("concat")
def concat(values, axis, interleave=False):
    if not interleave:
        return np.concatenate(values, axis=int(axis))
    values = [np.asarray(v) for v in values]
    ax = int(axis) % values[0].ndim
    stacked = np.stack(values, axis=ax + 1)
    shape = list(values[0].shape)
    shape[ax] *= len(values)
    return stacked.reshape(shape)


@op("stack")
def stack(values, axis):
    return np.stack([np.asarray(v) for v in values], axis=int(axis))


@op("split")
def split(x, axis, num_splits=None, split_sizes=None):
    x = np.asarray(x)
    ax = int(axis) % x.ndim
    if split_sizes is None:
        n = int(num_splits)
        if n < 1 or x.shape[ax] % n:
            raise OpError(f"split: axis {ax} of shape {x.shape} does not split into {n} equal parts")
        split_sizes = [x.shape[ax] // n] * n
    lead, start, parts = (slice(None),) * ax, 0, []
    for size in ints(split_sizes):  # plain slicing: np.split spends microseconds in Python per call
        parts.append(x[lead + (slice(start, start + size),)])
        start += size
    if start != x.shape[ax]:
        raise OpError(f"split sizes {list(ints(split_sizes))} do not add up to axis {ax} of shape {x.shape}")
    return tuple(parts)


def slices(shape, begin, end, stride, begin_mask, end_mask, squeeze_mask):
    """(index tuple, squeezed axes) of a slice_by_index/slice_update on a tensor of `shape`."""
    # constant arguments arrive as tuples; begin/end computed at run time (a KV-cache position) as small arrays
    if not isinstance(begin, tuple):
        begin = tuple(ints(begin))
    if not isinstance(end, tuple):
        end = tuple(ints(end))
    try:
        return _make_slices(shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    except TypeError:  # another argument computed at run time: not cacheable
        return _make_slices.__wrapped__(shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)


@functools.lru_cache(maxsize=4096)  # each distinct slice is worked out once
def _make_slices(shape, begin, end, stride, begin_mask, end_mask, squeeze_mask):
    rank = len(shape)
    begin, end = ints(begin), ints(end)
    stride = ints(stride) if stride is not None else [1] * rank
    begin_mask = [bool(b) for b in np.asarray(begin_mask).reshape(-1)] if begin_mask is not None else [False] * rank
    end_mask = [bool(b) for b in np.asarray(end_mask).reshape(-1)] if end_mask is not None else [False] * rank
    squeeze_mask = [bool(b) for b in np.asarray(squeeze_mask).reshape(-1)] if squeeze_mask is not None else [False] * rank
    index, squeezed = [], []
    for i in range(rank):
        if squeeze_mask[i]:
            b = begin[i] % shape[i] if shape[i] else 0
            index.append(slice(b, b + 1))
            squeezed.append(i)
            continue
        b = None if begin_mask[i] else begin[i]
        e = None if end_mask[i] else end[i]
        index.append(slice(b, e, stride[i]))
    return tuple(index), tuple(squeezed)


@op("slice_by_index")
def slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    x = np.asarray(x)
    index, squeezed = slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    out = x[index].copy()  # a copy: the source may be a state buffer that is later updated in place
    return np.squeeze(out, axis=squeezed) if squeezed else out


@op("slice_by_size")
def slice_by_size(x, begin, size):
    x = np.asarray(x)
    begin, size = ints(begin), ints(size)
    index = tuple(slice(b, None if s == -1 else b + s) for b, s in zip(begin, size))
    return x[index].copy()


@op("slice_update")
def slice_update(x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None,
                 _in_place=False):
    x = np.asarray(x)
    out = x if _in_place else x.copy()
    index, squeezed = slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    target_shape = out[index].shape
    update = np.asarray(update)
    if squeezed:
        update = np.expand_dims(update, squeezed)
    if update.shape != target_shape:
        raise OpError(f"slice_update: update of shape {update.shape} does not fit the slice {target_shape} "
                      f"(begin {ints(begin)}, end {ints(end)}) of a tensor of shape {x.shape}")
    out[index] = update
    return out


def _check_indices(indices, size, what):
    idx = np.asarray(indices).astype(np.int64)
    if idx.size and (idx.min() < -size or idx.max() >= size):
        raise OpError(f"{what}: index {int(idx.min()) if idx.min() < -size else int(idx.max())} out of bounds "
                      f"for an axis of size {size}")
    return np.where(idx < 0, idx + size, idx)


@op("gather")
def gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    x = np.asarray(x)
    ax = int(axis) % x.ndim
    if int(batch_dims):
        raise OpError("gather with batch_dims > 0 is not supported")
    try:
        return np.take(x, indices, axis=ax)  # bounds-checked; negative indices count from the end, as in MIL
    except IndexError:
        _check_indices(indices, x.shape[ax], "gather")  # raises the readable error
        raise


@op("gather_along_axis")
def gather_along_axis(x, indices, axis=0, validate_indices=False):
    x = np.asarray(x)
    ax = int(axis) % x.ndim
    return np.take_along_axis(x, _check_indices(indices, x.shape[ax], "gather_along_axis"), axis=ax)


@op("gather_nd")
def gather_nd(x, indices, batch_dims=0, validate_indices=False):
    x, idx = np.asarray(x), np.asarray(indices).astype(np.int64)
    return x[tuple(np.moveaxis(idx, -1, 0))]


@op("band_part")
def band_part(x, lower=-1, upper=-1):
    x = np.asarray(x)
    rows, cols = x.shape[-2:]
    i = np.arange(rows)[:, None]
    j = np.arange(cols)[None, :]
    keep = np.ones((rows, cols), dtype=bool)
    if int(lower) >= 0:
        keep &= (i - j) <= int(lower)
    if int(upper) >= 0:
        keep &= (j - i) <= int(upper)
    return np.where(keep, x, np.zeros((), dtype=x.dtype))


@op("fill")
def fill(shape, value=0.0):
    return np.full(ints(shape), value)


@op("fill_like")
def fill_like(ref_tensor, value=0.0):
    return np.full(np.asarray(ref_tensor).shape, value)


@op("range_1d")
def range_1d(end, start, step):
    return np.arange(np.asarray(start).item(), np.asarray(end).item(), np.asarray(step).item())


@op("shape")
def shape(x):
    return np.array(np.asarray(x).shape, dtype=np.int32)


@op("pad")
def pad(x, pad, mode="constant", constant_val=0.0):
    x = np.asarray(x)
    p = ints(pad)
    n = len(p) // 2
    widths = [(0, 0)] * (x.ndim - n) + [(p[2 * i], p[2 * i + 1]) for i in range(n)]
    mode = str(mode)
    if mode == "constant":
        return np.pad(x, widths, constant_values=np.asarray(constant_val).item())
    return np.pad(x, widths, mode={"reflect": "reflect", "replicate": "edge"}[mode])


@op("topk")
def topk(x, k=1, axis=-1, ascending=False, sort=True, return_indices=True, output_indices_dtype="int32"):
    x = np.asarray(x)
    order = np.argsort(x if ascending else -x, axis=int(axis), kind="stable")
    idx = np.take(order, np.arange(int(k)), axis=int(axis))
    return np.take_along_axis(x, idx, axis=int(axis)), idx.astype(np.int32)


@op("argsort")
def argsort(x, axis=-1, ascending=False):
    x = np.asarray(x)
    return np.argsort(x if ascending else -x, axis=int(axis), kind="stable").astype(np.int32)


# --- weight decompression (evaluated once at load) ------------------------------------------------------------
@op("constexpr_lut_to_dense")
def constexpr_lut_to_dense(indices, lut, shape=None, vector_axis=None):
    # an fp16 table gives fp16 values (the interpreter hands one in for fp16-resident weights: no float32 copy of
    # the weight at load); anything else float32
    lut = np.asarray(lut)
    lut = lut if lut.dtype == np.float16 else f32(lut)
    if shape is not None:  # iOS16 form: flat lut of 2^n values, packed indices, explicit output shape
        out_shape = ints(shape)
        count = int(np.prod(out_shape))
        bits = int(math.log2(lut.shape[0]))
        flat = unpack_bits(np.asarray(indices, dtype=np.uint8).reshape(-1), bits, count)
        return lut[flat.astype(np.int64)].reshape(out_shape)
    # iOS18 form: lut (G_0, ..., G_{r-1}, 2^n, vector_size); group sizes are dims of indices / G_i
    rank = np.ndim(indices)
    groups = lut.shape[:rank]
    vector = lut.shape[-1]
    if vector != 1:
        raise OpError("constexpr_lut_to_dense with vector_size > 1 is not supported")
    if len(lut.shape) != rank + 2 or any(n % g for n, g in zip(np.shape(indices), groups)):
        raise OpError(f"constexpr_lut_to_dense: a lut of shape {lut.shape} does not split indices of shape "
                      f"{np.shape(indices)} into equal groups")
    if rank and all(g == 1 for g in groups[1:]):  # groups of output channels (per_grouped_channel): block by block
        return _lut_by_row_groups(indices, lut.reshape(groups[0], -1))
    idx = np.asarray(indices).astype(np.int64)
    group_idx = []
    for axis in range(rank):
        size = idx.shape[axis] // groups[axis]
        g = np.arange(idx.shape[axis]) // size
        group_idx.append(g.reshape([-1 if a == axis else 1 for a in range(rank)]))
    return lut[tuple(group_idx) + (idx, 0)]


def _lut_by_row_groups(indices, lut: np.ndarray) -> np.ndarray:
    """Each group of consecutive rows (axis 0) looks its indices up in its own table: one small take per group into
    the output, 25x faster than one fancy index over the whole weight (a 1B model's weights decompress at load).
    4-bit indices still packed (blob.PackedBits) are looked up a byte at a time in a table of value pairs."""
    if _on_bytes(indices, lut.shape[0]):
        if lut.shape[1] < 1 << indices.bits:
            raise OpError(f"constexpr_lut_to_dense: {indices.bits}-bit indices need tables of {1 << indices.bits} "
                          f"values, not {lut.shape[1]}")
        # every index is in its table now: the takes below skip numpy's bounds check (mode="clip"), which with
        # out= also buffers the output (np.take's documentation): 1.3 against 1.7-3.0 ns per byte taken
        if indices.bits == 4 and sys.byteorder == "little":
            return _lut_pairs_by_row_groups(indices, lut)
        return _lut_unpacking_by_row_groups(indices, lut)  # other widths: a few groups at a time, no index array
    idx = np.asarray(indices)
    out = np.empty(idx.shape, lut.dtype)
    rows = idx.shape[0] // lut.shape[0]
    for g in range(lut.shape[0]):
        np.take(lut[g], idx[g * rows:(g + 1) * rows], out=out[g * rows:(g + 1) * rows])
    return out


UNPACKED_PER_CALL = 1 << 20  # indices unpacked at a time by _lut_unpacking_by_row_groups (whole groups)


def _on_bytes(indices, groups: int) -> bool:
    """Packed indices whose every group starts on a byte."""
    return (isinstance(indices, PackedBits) and not indices.signed
            and indices.count % groups == 0 and (indices.count // groups * indices.bits) % 8 == 0)


def _lut_unpacking_by_row_groups(indices: "PackedBits", lut: np.ndarray) -> np.ndarray:
    """_lut_by_row_groups over packed indices, unpacked whole groups at a time into a small buffer: a 6-bit LM head
    part's 33M indices never exist as one array (whose memory, freed, glibc would keep in its heap)."""
    out = np.empty(indices.count, lut.dtype)
    per_group = indices.count // lut.shape[0]
    step = max(1, UNPACKED_PER_CALL // per_group)  # groups per unpacking
    group_bytes = per_group * indices.bits // 8
    for first in range(0, lut.shape[0], step):
        last = min(first + step, lut.shape[0])
        idx = unpack_bits(indices.raw[first * group_bytes:last * group_bytes], indices.bits,
                          (last - first) * per_group)
        for g in range(first, last):
            np.take(lut[g], idx[(g - first) * per_group:(g - first + 1) * per_group],
                    out=out[g * per_group:(g + 1) * per_group], mode="clip")
    return out.reshape(indices.shape)


def _lut_pairs_by_row_groups(indices: "PackedBits", lut: np.ndarray) -> np.ndarray:
    """Byte v of packed 4-bit indices holds elements 2i (v & 15) and 2i+1 (v >> 4); little-endian, the two output
    values side by side are one integer of twice the width, lut[v & 15] | lut[v >> 4] << width. So each group's
    256 such pairs are one table, taken by the bytes themselves: no unpacking, half the takes (load time of a LUT4
    1B model: see README Benchmarks)."""
    bits = lut.dtype.itemsize * 8
    code, wide = {16: (np.uint16, np.uint32), 32: (np.uint32, np.uint64)}[bits]
    v = np.arange(256)
    codes = lut.view(code).astype(wide)
    pairs = codes[:, v & 15] | (codes[:, v >> 4] << wide(bits))  # (groups, 256)
    out = np.empty(indices.count, lut.dtype)
    out_pairs = out.view(wide)
    step = indices.count // 2 // lut.shape[0]  # bytes per group
    for g in range(lut.shape[0]):
        np.take(pairs[g], indices.raw[g * step:(g + 1) * step], out=out_pairs[g * step:(g + 1) * step], mode="clip")
    return out.reshape(indices.shape)


@op("constexpr_affine_dequantize")
def constexpr_affine_dequantize(quantized_data, zero_point, scale, axis):
    q = f32(quantized_data)
    shape = [1] * q.ndim
    zp, sc = f32(zero_point), f32(scale)
    if zp.ndim == 1 and zp.size > 1:
        shape[int(axis)] = -1
        zp = zp.reshape(shape)
    if sc.ndim == 1 and sc.size > 1:
        shape = [1] * q.ndim
        shape[int(axis)] = -1
        sc = sc.reshape(shape)
    return (q - zp) * sc


def _expand_blocks(param, shape):
    """Repeat each element of a per-block parameter over its block so it broadcasts against `shape`."""
    p = f32(param)
    for axis, (n, g) in enumerate(zip(shape, p.shape)):
        if g != n:
            p = np.repeat(p, n // g, axis=axis)
    return p


@op("constexpr_blockwise_shift_scale")
def constexpr_blockwise_shift_scale(data, scale, offset=None):
    d = f32(data)
    if offset is not None:
        d = d - _expand_blocks(offset, d.shape)
    return d * _expand_blocks(scale, d.shape)


@op("constexpr_cast")
def constexpr_cast(source_val, output_dtype):
    return np.asarray(source_val)


@op("const")
def const(val):
    return val
