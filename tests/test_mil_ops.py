"""Kernels against reference semantics: coremltools' own `value_inference` where an op has one (the MIL op
definitions' numpy implementation), numpy/torch formulas otherwise."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ane_eval.mil import KERNELS
from ane_eval.mil.interpreter import _coercer, _small_static
from ane_eval.mil.ir import TensorType

rng = np.random.default_rng(0)


def r(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def oracle(op_name: str, **kwargs):
    """The op's value as coremltools computes it while building a program from constants."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    box = {}

    @mb.program(input_specs=[mb.TensorSpec(shape=(1,))], opset_version=ct.target.iOS18)
    def prog(dummy):
        box["out"] = getattr(mb, op_name)(**kwargs)
        return dummy

    out = box["out"]
    if isinstance(out, (tuple, list)):
        return [o.val for o in out]
    assert out.val is not None, f"{op_name} has no value inference"
    return out.val


def _torch_conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    import torch
    import torch.nn.functional as F

    n = x.ndim - 2
    strides, dilations = strides or [1] * n, dilations or [1] * n
    if pad_type == "custom":
        widths = pad
    elif pad_type in ("same", "same_lower"):
        widths = []
        for i in range(n):
            eff = (weight.shape[2 + i] - 1) * dilations[i] + 1
            size = x.shape[2 + i]
            total = max((math.ceil(size / strides[i]) - 1) * strides[i] + eff - size, 0)
            lo, hi = (total // 2, total - total // 2) if pad_type == "same" else (total - total // 2, total // 2)
            widths += [lo, hi]
    else:
        widths = [0] * (2 * n)
    torch_pad = [w for i in reversed(range(n)) for w in (widths[2 * i], widths[2 * i + 1])]  # last dim first
    xt = F.pad(torch.tensor(x), torch_pad)
    fn = F.conv1d if n == 1 else F.conv2d
    b = torch.tensor(bias) if bias is not None else None
    return fn(xt, torch.tensor(weight), b, stride=strides, dilation=dilations, groups=groups).numpy()


def _torch_instance_norm(x, gamma, beta, epsilon):
    import torch

    return torch.nn.functional.instance_norm(torch.tensor(x), weight=torch.tensor(gamma), bias=torch.tensor(beta),
                                             eps=epsilon).numpy()


# ops coremltools cannot evaluate on constants: compared with torch instead
TORCH_REFERENCE = {
    "conv": _torch_conv,
    "instance_norm": _torch_instance_norm,
    "silu": lambda x: __import__("torch").nn.functional.silu(__import__("torch").tensor(x)).numpy(),
}


def run(op_name: str, **kwargs):
    with np.errstate(all="ignore"):  # as the interpreter runs kernels
        return KERNELS[op_name](**kwargs)


X = r(2, 3, 4)
CASES = [
    ("add", dict(x=X, y=r(4))), ("sub", dict(x=X, y=r(3, 1))), ("mul", dict(x=X, y=np.float32(-2.5))),
    ("real_div", dict(x=X, y=r(2, 3, 4) + 3)), ("maximum", dict(x=X, y=r(4))), ("minimum", dict(x=X, y=r(4))),
    ("pow", dict(x=np.abs(X) + 0.1, y=np.float32(1.5))), ("floor_div", dict(x=X * 4, y=np.float32(1.5))),
    ("mod", dict(x=np.abs(X) * 4, y=np.float32(1.5))),
    ("greater_equal", dict(x=X, y=np.float32(0))), ("greater", dict(x=X, y=r(4))), ("less", dict(x=X, y=r(4))),
    ("less_equal", dict(x=X, y=r(4))), ("equal", dict(x=np.array([1, 2, 3], np.int32), y=np.int32(2))),
    ("not_equal", dict(x=np.array([1, 2, 3], np.int32), y=np.int32(2))),
    ("logical_and", dict(x=X > 0, y=X < 1)), ("logical_or", dict(x=X > 0, y=X < -1)),
    ("logical_xor", dict(x=X > 0, y=X < 1)), ("logical_not", dict(x=X > 0)),
    ("exp", dict(x=X)), ("log", dict(x=np.abs(X) + 0.5)), ("sqrt", dict(x=np.abs(X))),
    ("rsqrt", dict(x=np.abs(X) + 0.5)), ("inverse", dict(x=np.abs(X) + 0.5)), ("abs", dict(x=X)),
    ("floor", dict(x=X * 3)), ("ceil", dict(x=X * 3)), ("sign", dict(x=X)), ("sin", dict(x=X)), ("cos", dict(x=X)),
    ("tanh", dict(x=X)), ("sigmoid", dict(x=X)), ("relu", dict(x=X)), ("erf", dict(x=X)), ("square", dict(x=X)),
    ("silu", dict(x=X)), ("softplus", dict(x=X)), ("leaky_relu", dict(x=X, alpha=0.2)), ("elu", dict(x=X, alpha=0.7)),
    ("clip", dict(x=X, alpha=-0.5, beta=0.5)),
    ("gelu", dict(x=X, mode="EXACT")), ("gelu", dict(x=X, mode="TANH_APPROXIMATION")),
    ("gelu", dict(x=X, mode="SIGMOID_APPROXIMATION")),
    ("select", dict(cond=X > 0, a=X, b=r(4))),
    ("reduce_sum", dict(x=X, axes=[-1], keep_dims=True)), ("reduce_mean", dict(x=X, axes=[0, 2])),
    ("reduce_max", dict(x=X, axes=[1])), ("reduce_min", dict(x=X, axes=[-2], keep_dims=True)),
    ("reduce_prod", dict(x=X, axes=[2])), ("reduce_sum_square", dict(x=X, axes=[1])),
    ("reduce_l2_norm", dict(x=X, axes=[2])), ("reduce_l1_norm", dict(x=X, axes=[2])),
    ("reduce_log_sum_exp", dict(x=X, axes=[-1])), ("reduce_argmax", dict(x=X, axis=-1)),
    ("reduce_argmin", dict(x=X, axis=1, keep_dims=True)),
    ("softmax", dict(x=X, axis=-1)), ("softmax", dict(x=X, axis=0)),
    ("layer_norm", dict(x=X, axes=[-1], gamma=r(4), beta=r(4), epsilon=1e-5)),
    ("layer_norm", dict(x=X, axes=[1, 2], epsilon=1e-3)),
    ("instance_norm", dict(x=r(2, 3, 5), gamma=r(3), beta=r(3), epsilon=1e-5)),
    ("l2_norm", dict(x=r(2, 3, 4, 5), epsilon=1e-6)),
    ("linear", dict(x=r(2, 5, 8), weight=r(6, 8), bias=r(6))),
    ("matmul", dict(x=r(2, 3, 4), y=r(2, 4, 5))), ("matmul", dict(x=r(2, 3, 4), y=r(2, 5, 4), transpose_y=True)),
    ("matmul", dict(x=r(4, 3), y=r(1, 4, 5), transpose_x=True)), ("matmul", dict(x=r(4), y=r(4, 3))),
    ("conv", dict(x=r(1, 8, 1, 5), weight=r(6, 8, 1, 1))),
    ("conv", dict(x=r(1, 8, 1, 5), weight=r(6, 8, 1, 1), bias=r(6))),
    ("conv", dict(x=r(2, 4, 9), weight=r(6, 2, 3), groups=2, strides=[2], pad_type="same")),
    ("conv", dict(x=r(1, 4, 7, 6), weight=r(4, 1, 3, 3), groups=4, dilations=[2, 1], pad_type="custom",
                  pad=[1, 2, 0, 1])),
    ("conv", dict(x=r(1, 3, 8, 8), weight=r(5, 3, 3, 2), strides=[2, 3], pad_type="valid")),
    ("conv", dict(x=r(1, 3, 7), weight=r(2, 3, 4), pad_type="same_lower")),
    ("reshape", dict(x=X, shape=[4, -1])), ("expand_dims", dict(x=X, axes=[0, -1])),
    ("squeeze", dict(x=r(1, 3, 1), axes=[0])), ("squeeze", dict(x=r(1, 3, 1))),
    ("transpose", dict(x=X, perm=[2, 0, 1])), ("tile", dict(x=X, reps=[1, 2, 3])),
    ("concat", dict(values=[X, r(2, 3, 2)], axis=-1)),
    ("stack", dict(values=[X, X], axis=1)),
    ("slice_by_index", dict(x=X, begin=[0, 1, 0], end=[2, 3, 4], stride=[1, 1, 2])),
    ("slice_by_index", dict(x=X, begin=[0, -2, 1], end=[0, 0, 0], end_mask=[True, True, True])),
    ("slice_by_index", dict(x=X, begin=[1, 0, 0], end=[2, 3, 4], squeeze_mask=[True, False, False])),
    ("slice_by_index", dict(x=X, begin=[0, 2, 3], end=[2, 0, 0], stride=[1, -1, -1], end_mask=[False, True, True])),
    ("slice_by_size", dict(x=X, begin=[0, 1, 1], size=[2, -1, 2])),
    ("slice_update", dict(x=X, update=r(1, 2, 4), begin=[1, 1, 0], end=[2, 3, 4])),
    ("gather", dict(x=r(10, 4), indices=np.array([[1, 9], [0, 3]], np.int32), axis=0)),
    ("gather", dict(x=r(3, 10), indices=np.array([4, 2, 2], np.int16), axis=-1)),
    ("gather_along_axis", dict(x=r(3, 4), indices=np.array([[0, 3], [1, 1], [2, 0]], np.int32), axis=1)),
    ("band_part", dict(x=r(5, 5), lower=1, upper=0)), ("band_part", dict(x=r(2, 4, 6), lower=-1, upper=2)),
    ("fill", dict(shape=np.array([2, 3], np.int32), value=1.5)),
    ("range_1d", dict(end=np.float32(5), start=np.float32(0.5), step=np.float32(1.5))),
    ("shape", dict(x=X)), ("pad", dict(x=r(2, 3), pad=np.array([1, 2, 0, 1], np.int32), constant_val=0.5)),
    ("pad", dict(x=r(1, 2, 5), pad=np.array([2, 1], np.int32), mode="reflect")),
    ("split", dict(x=r(4, 6), axis=1, num_splits=3)), ("split", dict(x=r(4, 6), axis=1, split_sizes=[1, 5])),
    ("topk", dict(x=r(3, 6), k=2, axis=-1)), ("argsort", dict(x=r(3, 6), axis=-1)),
    ("scaled_dot_product_attention", dict(query=r(1, 2, 3, 4), key=r(1, 2, 5, 4), value=r(1, 2, 5, 4),
                                          attn_mask=r(3, 5))),
    ("scaled_dot_product_attention", dict(query=r(1, 2, 3, 4), key=r(1, 2, 5, 4), value=r(1, 2, 5, 4),
                                          attn_mask=np.tril(np.ones((3, 5), bool)))),
]


@pytest.mark.parametrize("op_name, kwargs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_kernel_matches_reference(op_name, kwargs):
    ours = run(op_name, **kwargs)
    ref = TORCH_REFERENCE[op_name](**kwargs) if op_name in TORCH_REFERENCE else oracle(op_name, **kwargs)
    ours_list = list(ours) if isinstance(ours, tuple) else [ours]
    ref_list = ref if isinstance(ref, list) else [ref]
    for a, b in zip(ours_list, ref_list, strict=True):  # an op that loses an output fails
        np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64),
                                   rtol=2e-5, atol=2e-5)
        assert np.asarray(a).shape == np.asarray(b).shape


def test_fresh_ops_return_new_arrays():
    """The interpreter rounds FRESH_OPS outputs in place: their kernels must never hand back an input or a view of
    one (including the no-op shapes: a 1x1 conv, a product with 1, a one-element reduction)."""
    from ane_eval.mil.fuse import FUSED_ATTENTION, FUSED_MIRRORED_NORM, FUSED_OPS, FUSED_ROTARY
    from ane_eval.mil.ops import FRESH_OPS

    one, eye = np.ones((1, 1), np.float32), np.eye(4, dtype=np.float32)
    cases = [c for c in CASES if c[0] in FRESH_OPS] + [
        ("mul", dict(x=X, y=np.float32(1))), ("add", dict(x=X, y=np.float32(0))), ("matmul", dict(x=X, y=eye)),
        ("conv", dict(x=X[:1, :, :, None], weight=np.eye(3, dtype=np.float32)[:, :, None, None])),
        ("linear", dict(x=X, weight=eye)), ("softmax", dict(x=one)), ("layer_norm", dict(x=one, axes=[0])),
        ("pow", dict(x=X, y=np.float32(1))), (FUSED_ROTARY, dict(x=X, cos=one, sin=one * 0)),
        (FUSED_MIRRORED_NORM, dict(x=X)),
        (FUSED_ATTENTION, dict(query=r(1, 2, 3, 4), key=r(1, 2, 5, 4), value=r(1, 2, 5, 4), scale=np.float32(1),
                               mask=np.zeros((1, 1, 3, 5), np.float32)))]
    assert {c[0] for c in cases} == FRESH_OPS | FUSED_OPS
    for op_name, kwargs in cases:
        out = run(op_name, **kwargs)
        for v in kwargs.values():
            if isinstance(v, np.ndarray):
                assert not np.shares_memory(out, v), op_name


def test_ops_without_value_inference_match_formulas():
    import torch

    x = r(2, 3, 8)
    w = r(6, 4, 3)
    xt = r(1, 8, 12)
    ref = torch.nn.functional.conv1d(torch.tensor(xt), torch.tensor(w), stride=2, padding=2, dilation=2,
                                     groups=2).numpy()
    ours = run("conv", x=xt, weight=w, strides=[2], dilations=[2], groups=2, pad_type="custom", pad=[2, 2])
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    q, k, v = r(1, 2, 3, 4), r(1, 2, 5, 4), r(1, 2, 5, 4)
    mask = np.tril(np.ones((3, 5), bool), 2)
    ref = torch.nn.functional.scaled_dot_product_attention(torch.tensor(q), torch.tensor(k), torch.tensor(v),
                                                           attn_mask=torch.tensor(mask)).numpy()
    np.testing.assert_allclose(run("scaled_dot_product_attention", query=q, key=k, value=v, attn_mask=mask), ref,
                               rtol=1e-5, atol=1e-5)
    # concat interleave as documented (coremltools' value inference ignores the flag)
    a, b = r(3, 2), r(3, 2)
    out = run("concat", values=[a, b], axis=0, interleave=True)
    np.testing.assert_array_equal(out[0::2], a)
    np.testing.assert_array_equal(out[1::2], b)
    silu = run("silu", x=x)
    np.testing.assert_allclose(silu, torch.nn.functional.silu(torch.tensor(x)).numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("in_groups", [1, 3], ids=["per-grouped-channel", "blockwise"])
def test_constexpr_lut_to_dense_grouped_channels(in_groups):
    """iOS18 form as the palettizer writes it: LUT (Cout/8, 1, 1, 1, 2^n, 1), one LUT per 8 output channels (the
    kernel's block-by-block path), and LUTs per input-channel block too (its general path)."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    lut = rng.standard_normal((2, in_groups, 1, 1, 16, 1)).astype(np.float16)
    indices = rng.integers(0, 16, (16, 3, 1, 1)).astype(types.np_uint4_dtype)
    ours = run("constexpr_lut_to_dense", indices=indices.astype(np.uint8), lut=lut.astype(np.float32))
    box = {}

    @mb.program(input_specs=[mb.TensorSpec(shape=(1,))], opset_version=ct.target.iOS18)
    def prog(dummy):
        box["v"] = mb.constexpr_lut_to_dense(indices=indices, lut=lut)
        return dummy

    np.testing.assert_array_equal(ours, box["v"].op.materialized_val_inference().astype(np.float32))
    expected = np.stack([[lut[c // 8, i * in_groups // 3, 0, 0, indices[c, i].astype(int), 0] for i in range(3)]
                         for c in range(16)])
    np.testing.assert_array_equal(ours, expected.astype(np.float32))
    # the indices as the weight file stores them (still packed: looked up byte by byte on the per-grouped-channel
    # path), with a float32 table and with the fp16 one (fp16 results)
    for table in (lut.astype(np.float32), lut):
        got = run("constexpr_lut_to_dense", indices=_packed(indices.astype(np.uint8)), lut=table)
        assert got.dtype == table.dtype
        np.testing.assert_array_equal(got, expected.astype(table.dtype))


def _packed(values: np.ndarray, bits: int = 4):
    """Values as a weight file packs them (LSB first, zero-padded to a byte), still packed (blob.PackedBits)."""
    from ane_eval.mil.blob import PackedBits

    bit_array = ((values.reshape(-1, 1) >> np.arange(bits)) & 1).astype(np.uint8)
    return PackedBits(np.packbits(bit_array.reshape(-1), bitorder="little"), bits, values.size, values.shape)


@pytest.mark.parametrize("bits, shape, groups", [(4, (6, 5), 3), (4, (3, 5), 3), (4, (8, 4), 4), (6, (16, 12), 4),
                                                 (3, (8, 8), 4), (6, (6, 5), 3)])
def test_packed_lut_indices_match_unpacked_ones(bits, shape, groups, monkeypatch):
    """Packed indices give the plain lookup on each path: 4-bit groups starting on a byte through byte-pair tables,
    other widths whose groups start on a byte unpacked a few groups at a time (here one or two per call), the rest
    (odd-sized groups) unpacked whole."""
    from ane_eval.mil import ops

    monkeypatch.setattr(ops, "UNPACKED_PER_CALL", 2 * shape[1] * shape[0] // groups - 1)
    indices = rng.integers(0, 2 ** bits, shape).astype(np.uint8)
    lut = rng.standard_normal((groups, 1, 2 ** bits, 1)).astype(np.float16)
    want = run("constexpr_lut_to_dense", indices=indices, lut=lut)
    np.testing.assert_array_equal(run("constexpr_lut_to_dense", indices=_packed(indices, bits), lut=lut), want)


@pytest.mark.parametrize("bits", [4, 6])
def test_packed_lut_indices_refuse_tables_too_small_for_them(bits):
    """Packed indices are looked up without numpy's bounds check: a table with fewer than 2^bits values (a
    malformed weight file) is refused in one line, never read past."""
    from ane_eval.mil.ops import OpError

    indices = rng.integers(0, 2 ** bits, (8, 4)).astype(np.uint8)
    lut = rng.standard_normal((4, 1, 2 ** bits - 1, 1)).astype(np.float16)
    with pytest.raises(OpError, match=f"{bits}-bit indices need tables of {2 ** bits} values, not {2 ** bits - 1}"):
        run("constexpr_lut_to_dense", indices=_packed(indices, bits), lut=lut)


def test_constexpr_affine_and_blockwise():
    q = rng.integers(-8, 8, (4, 6)).astype(np.int8)
    out = run("constexpr_affine_dequantize", quantized_data=q, zero_point=np.int8(1), scale=np.float32(0.5), axis=0)
    np.testing.assert_array_equal(out, (q.astype(np.float32) - 1) * 0.5)
    scale = r(4, 2)
    offset = r(4, 2)
    out = run("constexpr_blockwise_shift_scale", data=q, scale=scale, offset=offset)
    expected = (q - np.repeat(offset, 3, axis=1)) * np.repeat(scale, 3, axis=1)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_fp16_rounding_overflows_to_inf_and_casts_wrap():
    to_fp16 = _coercer(TensorType("fp16", (3,)), round_fp16=True)
    with np.errstate(all="ignore"):  # as the interpreter runs it
        out = to_fp16(np.array([70000.0, -1e6, 1.0001], np.float32))
    assert np.isposinf(out[0]) and np.isneginf(out[1]) and out[2] == np.float32(np.float16(1.0001))
    keep = _coercer(TensorType("fp16", (1,)), round_fp16=False)
    assert keep(np.array([1.0001], np.float32))[0] == np.float32(1.0001)
    to_int16 = _coercer(TensorType("int16", (3,)), round_fp16=True)
    np.testing.assert_array_equal(to_int16(np.array([40000, -3, 7], np.int32)), np.array([-25536, -3, 7], np.int16))
    to_uint16 = _coercer(TensorType("uint16", (2,)), round_fp16=True)
    np.testing.assert_array_equal(to_uint16(np.array([-1, 5], np.int32)), np.array([65535, 5], np.uint16))
    to_int32 = _coercer(TensorType("int32", (2,)), round_fp16=True)
    np.testing.assert_array_equal(to_int32(np.array([2.7, -2.7], np.float32)), np.array([2, -2], np.int32))
    # float -> int truncates toward zero, then wraps like an integer cast (numpy's float cast does not wrap)
    np.testing.assert_array_equal(to_int16(np.array([40000.7, -3.5, 7.2], np.float32)),
                                  np.array([-25536, -3, 7], np.int16))
    with np.errstate(all="ignore"):  # numpy's own cast gives INT_MIN for both
        np.testing.assert_array_equal(to_int32(np.array([3e9, -3e9], np.float32)),
                                      np.array([3e9 - 2**32, 2**32 - 3e9], np.int64).astype(np.int32))
    # outputs rounded by the compiled function's inline cast: static shapes below SMALL elements only
    assert _small_static(TensorType("fp16", (1, 4))) and not _small_static(TensorType("fp16", (None, 4)))
    assert not _small_static(TensorType("fp16", (1, 1024)))
    # fp32-type outputs (and fp16 ones in fp32 mode) are float32, whatever dtype the kernel returned
    for dtype in ("fp32", "fp64", "bf16", "fp16"):
        out = _coercer(TensorType(dtype, (2,)), round_fp16=dtype != "fp16")(
            np.array([1.0001, 3.0], np.float64))
        assert out.dtype == np.float32 and out[0] == np.float32(1.0001), dtype


def test_gather_refuses_out_of_bounds_indices():
    from ane_eval.mil.ops import OpError

    with pytest.raises(OpError, match="index 10 out of bounds for an axis of size 10"):
        run("gather", x=r(10, 2), indices=np.array([10], np.int32), axis=0)
    # negative indices within range wrap (the converter's select fix makes them positive anyway)
    np.testing.assert_array_equal(run("gather", x=np.arange(5.0), indices=np.array([-1]), axis=0), [4.0])


def test_every_contract_op_has_a_kernel():
    contract_ops = ("read_state write_state slice_update slice_by_index gather select greater_equal cast concat "
                    "layer_norm conv linear matmul mul add sub silu exp reduce_max reduce_sum real_div softmax "
                    "reshape transpose expand_dims squeeze tile identity const constexpr_lut_to_dense").split()
    issue_ops = ("gelu sigmoid relu tanh log sqrt rsqrt pow gather_along_axis slice_by_size split stack logical_and "
                 "band_part fill range_1d shape scaled_dot_product_attention constexpr_affine_dequantize "
                 "constexpr_blockwise_shift_scale instance_norm l2_norm reduce_mean reduce_min").split()
    assert [o for o in contract_ops + issue_ops if o not in KERNELS] == []
    assert math.isclose(float(run("rsqrt", x=np.float32(4.0), epsilon=0.0)), 0.5)


def _isas():
    from ane_eval.mil import _fp16

    return sorted(_fp16.isas())


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("impl", ["round_to_fp16", "round_in_place"])
def test_fast_fp16_rounding_is_bit_exact(monkeypatch, impl, isa):
    """Every code path of the C kernels this CPU has (the plain C one everywhere) rounds as numpy's cast pair."""
    from ane_eval.mil import _fp16, fp16

    monkeypatch.setattr(fp16, "ISA", _fp16.isas()[isa])
    round_to_fp16 = getattr(fp16, impl)
    gen = np.random.default_rng(1)
    x = np.concatenate([
        (gen.standard_normal(200_000) * 10.0 ** gen.integers(-12, 7, 200_000)).astype(np.float32),
        gen.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32),  # any bit pattern
        (gen.integers(-2**14, 2**14, 50_000) * 2.0**-25).astype(np.float32),  # ties among fp16 subnormals
        np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 65504, 65519, 65520, -65520, 1e30, 6.1e-5, 6.103515625e-05,
                  5.96e-8, 2.98e-8, 2.9e-8, 3e-8, 2.9802322e-08, 2.9802326e-08, 1e-40, -1e-45, 2049, 2051, 4097, 0.5,
                  1.0, 1.0, 1.0, 1.0, 1.0, 1.0], np.float32)])  # 7 | size
    with np.errstate(all="ignore"):  # as the interpreter runs it
        ref = x.astype(np.float16).astype(np.float32)
        for arg in (x.reshape(-1, 7).copy(), x[:1003 * 7].reshape(-1, 7).copy()):  # 2-D, as the kernels' outputs;
            got = round_to_fp16(arg)  # and a size that leaves a tail after the vector loops
            n = got.size
            np.testing.assert_array_equal(got.reshape(-1).view(np.uint32)[~np.isnan(ref[:n])],
                                          ref[:n].view(np.uint32)[~np.isnan(ref[:n])])
            assert np.isnan(got.reshape(-1)[np.isnan(ref[:n])]).all()
            assert (got is arg) == (impl == "round_in_place")  # round_in_place overwrites its argument


@pytest.mark.parametrize("isa", _isas())
def test_fp16_widening_is_exact(monkeypatch, isa):
    """Every fp16 bit pattern widens to the float32 numpy's cast gives (each code path, and the small one)."""
    from ane_eval.mil import _fp16, fp16

    monkeypatch.setattr(fp16, "ISA", _fp16.isas()[isa])
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    for x in (every, every[:100], every[:1037], every.reshape(256, 256)[:, ::2]):  # large, small, tail, strided
        got, ref = fp16.widen(x), x.astype(np.float32)
        assert got.dtype == np.float32 and got.shape == x.shape
        np.testing.assert_array_equal(got.view(np.uint32)[~np.isnan(ref)], ref.view(np.uint32)[~np.isnan(ref)])
        assert np.isnan(got[np.isnan(ref)]).all()
        into = np.empty(x.shape, np.float32)
        fp16.widen_into(into, x)
        np.testing.assert_array_equal(into, got)  # NaN where got has NaN, equal values elsewhere


def test_fp16_rounding_of_other_inputs():
    """Inputs are float32 first (a float64 kernel result is rounded as its float32, as the docstring says), every
    path returns float32, and round_in_place rounds copies of arrays it may not overwrite."""
    from ane_eval.mil import fp16

    # 1 + 2**-11 + 2**-40: float64 -> fp16 rounds up; float32 first drops 2**-40, leaving a tie that rounds to even
    v = 1 + 2.0**-11 + 2.0**-40
    for n in (3, 3000):  # both sides of SMALL
        x64 = np.full(n, v)
        for f in (fp16.round_to_fp16, fp16.round_in_place):
            got = f(x64.copy())
            assert got.dtype == np.float32 and (got == 1.0).all(), (f.__name__, n)
    gen = np.random.default_rng(3)
    x = (gen.standard_normal((60, 50)) * 100).astype(np.float32)
    frozen = x.copy()
    frozen.flags.writeable = False
    for arr in (x[:10, :10].copy(), frozen, np.asfortranarray(x), x[:, ::2]):  # small, read-only, F order, strided
        want = arr.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(fp16.round_in_place(arr), want)
    np.testing.assert_array_equal(frozen, x)  # not overwritten, nor x by its strided view


@pytest.mark.parametrize("groups", [1, 2])
def test_fused_attention_rounds_where_the_unfused_ops_do(groups):
    """The fused attention kernel in fp16 mode, bit for bit: the unfused ops written out, each output rounded to
    fp16 (scores, scaled, masked, centred, exponentials, their sum, probabilities), grouped heads as repeated
    ones. The mask hides no slot from every row, so both sum over the same slots."""
    from ane_eval.mil import gemm
    from ane_eval.mil.fp16 import round_to_fp16 as r
    from ane_eval.mil.fuse import masked_attention

    gen = np.random.default_rng(5)
    h, t, s, d = 4, 64, 80, 32
    q = r(gen.standard_normal((1, h, t, d)).astype(np.float32) * 3)
    k, v = (gen.standard_normal((1, h // groups, s, d)).astype(np.float16) for _ in range(2))
    visible = np.arange(s) <= np.arange(t)[:, None] + s - t  # causal; a bias where visible (not just 0): so
    mask = np.where(visible, r(gen.standard_normal((t, s)).astype(np.float32)), -np.inf)[None, None]  # masking rounds
    scale = np.float32(0.3)  # not a power of two: scaling rounds too

    def matmul(a, b):  # the kernel's products: the project's GEMM on fp16 keys and values where it runs them
        if gemm.invariant_products():
            return np.stack([gemm.times_transposed(a[0, i], b[0, i].T) for i in range(h)])[None]
        return np.matmul(a, b.astype(np.float32))

    with np.errstate(all="ignore"):
        got = masked_attention(q, k, v, scale, mask, groups=groups, _round=r)
        keys, values = (np.repeat(x, groups, axis=1) for x in (k, v))
        scores = r(r(r(matmul(q, keys.swapaxes(-1, -2))) * scale) + mask)
        e = r(np.exp(r(scores - scores.max(-1, keepdims=True))))
        want = matmul(r(e / r(e.sum(-1, keepdims=True))), values)
    np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(not __import__("ane_eval.mil.gemm").mil.gemm.invariant_products(), reason="needs AVX-512")
def test_fused_attention_rows_do_not_depend_on_their_batch():
    """fp16 mode's attention on fp16 keys and values: a row's result is the same bits alone as among 64 rows (a
    prefill batch against a decode step), the products the project's GEMM's; numpy's BLAS changes them on some
    CPUs (gemm.invariant_products)."""
    from ane_eval.mil.fp16 import round_to_fp16 as r
    from ane_eval.mil.fuse import masked_attention

    gen = np.random.default_rng(6)
    q = r(gen.standard_normal((1, 8, 64, 64)).astype(np.float32))
    k, v = (gen.standard_normal((1, 2, 512, 64)).astype(np.float16) for _ in range(2))
    mask = np.where(np.arange(512) <= np.arange(64)[:, None] + 400, 0, -np.inf).astype(np.float32)[None, None]
    with np.errstate(all="ignore"):
        batch = masked_attention(q, k, v, np.float32(0.125), mask, groups=4, _round=r)
        for t in (0, 17, 63):
            alone = masked_attention(q[:, :, t:t + 1], k, v, np.float32(0.125), mask[:, :, t:t + 1], groups=4, _round=r)
            np.testing.assert_array_equal(alone, batch[:, :, t:t + 1])


def test_fp16_conversions_refuse_buffers_of_the_wrong_size():
    from ane_eval.mil import _fp16

    f32, f16 = np.zeros(8, np.float32), np.zeros(8, np.float16)
    for fn, args in [(_fp16.round_fp16, (f32, f32[:7])), (_fp16.widen, (f16, f32[:7])), (_fp16.widen, (f16[:7], f32)),
                     (_fp16.round_fp16, (f32[:7], f32))]:
        with pytest.raises(ValueError, match="do not hold the same number of values"):
            fn(*args)
    with pytest.raises(ValueError, match="not available"):
        _fp16.round_fp16(f32, f32, 99)
    with pytest.raises(ValueError):  # a strided view is not one contiguous buffer
        _fp16.widen(np.zeros(16, np.float16)[::2], f32)


@pytest.mark.parametrize("columns", [1, 64])
def test_fp16_weight_products_equal_float32_weights(monkeypatch, columns, blas_row_blocks_invariant):
    """conv and linear with an fp16-resident weight: the blocked path (many blocks) gives the float32 weight's
    bits where numpy's BLAS sums a block of rows as it sums the whole product (else within float32 accumulation's
    bound of the exact product, as the float32 weight's result is). The fast products for fp16 columns whose
    output is rounded to fp16 (the fp16 GEMV for one column, torch's oneDNN fp16 GEMM or the project's AVX-512
    one for several, where the CPU has one) sum in another float32 order: rounded, they meet the error bound the
    float32 path meets (half an fp16 ulp plus float32 accumulation, n 2^-24 sum|w x|, against
    the exact float64 product) and differ from it in under 1 % of the outputs."""
    from ane_eval.mil import gemm

    monkeypatch.setattr(gemm, "BLOCK_BYTES", 4 * 2048 * 100)  # 100 rows per block: 30 blocks, the last partial
    w16 = (rng.standard_normal((3000, 2048)) * 0.02).astype(np.float16)
    x = r(1, 2048, 1, columns).astype(np.float16).astype(np.float32)  # fp16 values, as in fp16 mode
    w64, x64 = w16.astype(np.float64), x.reshape(2048, columns).astype(np.float64)
    exact = w64 @ x64
    sums = 2048 * 2**-24 * (np.abs(w64) @ np.abs(x64))  # float32 accumulation's bound

    def same_as(got, want):
        if blas_row_blocks_invariant or columns == 1:
            np.testing.assert_array_equal(got, want)
        else:
            assert got.shape == want.shape and (np.abs(got.reshape(exact.shape) - exact) <= sums + 1e-30).all()

    want = KERNELS["conv"](x=x, weight=w16.astype(np.float32)[:, :, None, None])
    got = KERNELS["conv"](x=x, weight=w16[:, :, None, None])
    same_as(got, want)
    rows = x[0, :, 0, :].T.copy()
    same_as(KERNELS["linear"](x=rows, weight=w16).T, KERNELS["linear"](x=rows, weight=w16.astype(np.float32)).T)
    with monkeypatch.context() as m:  # the fast products off: the blocked path, bit for bit, fp16 values or not
        m.setattr(gemm, "FAST_GEMV", False)
        m.setattr(gemm, "FAST_GEMM", False)
        np.testing.assert_array_equal(KERNELS["conv"](x=x, weight=w16[:, :, None, None], _fp16_values=True), got)
    fast = KERNELS["conv"](x=x, weight=w16[:, :, None, None], _fp16_values=True)
    assert fast.shape == want.shape and fast.dtype == np.float32
    if columns > 1 and not gemm.fast_gemm():  # no fast GEMM on this CPU: the blocked path
        np.testing.assert_array_equal(fast, got)
        return
    fast = fast.reshape(3000, columns).astype(np.float16).astype(np.float32)  # as the caller rounds
    want = want.reshape(3000, columns)
    bound = np.spacing(np.abs(exact).astype(np.float16)).astype(np.float64) / 2 + sums
    for result in (want.astype(np.float16), fast):
        assert (np.abs(result.astype(np.float64) - exact) <= bound).all()
    differ = (fast != want.astype(np.float16).astype(np.float32)).mean()
    assert 0 < differ < 0.01  # the fast product ran (some sums round the other way), and rarely differs
    lin = KERNELS["linear"](x=rows, weight=w16, _fp16_values=True)
    np.testing.assert_array_equal(lin.T.astype(np.float16).astype(np.float32), fast)


@pytest.mark.parametrize("cols", [1, 15, 16, 63, 64, 67, 2048])  # every tail of the 8/16/32/64-wide loops
def test_fp16_gemv_code_paths_sum_the_exact_products(cols):
    """Each code path of the fp16 GEMV this CPU has (the fastest is the one used) against the float64 product:
    within float32 accumulation's bound, n 2^-24 sum|w x|, with fp16 subnormals, signed zeros and the largest
    fp16 values among the weights; and over row counts that split unevenly."""
    from ane_eval.mil import _fp16, gemm

    w = (rng.standard_normal((37, cols)) * 0.05).astype(np.float16)
    w.reshape(-1)[::7] = np.float16(6e-6)  # subnormal (fp16's smallest normal is 6.1e-5)
    w.reshape(-1)[3::11] = np.float16(-0.0)
    w.reshape(-1)[5::13] = np.float16(-65504)
    x = rng.standard_normal(cols).astype(np.float32)
    exact = w.astype(np.float64) @ x.astype(np.float64)
    bound = cols * 2**-24 * (np.abs(w.astype(np.float64)) @ np.abs(x.astype(np.float64))) + 1e-30
    assert "generic" in _fp16.isas() and _fp16.fastest() in _fp16.isas()
    for name, isa in _fp16.isas().items():
        out = np.full(37, np.nan, np.float32)
        _fp16.gemv(w, x, out, cols, isa)
        assert (np.abs(out - exact) <= bound).all(), name
    tall = np.repeat(w, 300, axis=0)  # 11,100 rows: split over threads, each row's sum as on one thread
    want = np.repeat(np.asarray([gemm._gemv(w[i:i + 1], x)[0] for i in range(37)]), 300)
    for threads in (1, 2, 3, 5, 2):
        out = np.full(tall.shape[0], np.nan, np.float32)
        _fp16.gemv(tall, x, out, cols, -1, threads)
        np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(gemm._gemv(tall, x), want)


@pytest.mark.skipif("avx512" not in __import__("ane_eval.mil._fp16").mil._fp16.isas(), reason="needs AVX-512")
@pytest.mark.parametrize("rows,cols,n", [(1, 1, 1), (7, 5, 3), (97, 300, 64), (13, 513, 17), (200, 2048, 130)])
def test_fp16_gemm_sums_each_output_in_k_order(rows, cols, n):
    """The AVX-512 fp16-weight GEMM, every output bit for bit against its definition: float32 fused multiply-adds
    in k order from zero (the fp16 weight times the float32 input is exact in float64, and so is the fused add
    of two float32 values before rounding unless a subnormal is involved), on shapes that leave partial register
    tiles (6 rows), row blocks (96), depth blocks (256) and column vectors (16, 64 a tile), and on any number of
    threads."""
    from ane_eval.mil import _fp16

    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float16)
    w.reshape(-1)[5::13] = np.float16(-65504)  # large values and signed zeros among the weights
    w.reshape(-1)[3::11] = np.float16(-0.0)
    x = rng.standard_normal((cols, n)).astype(np.float32)
    want = np.zeros((rows, n), np.float32)
    w64 = w.astype(np.float64)
    for k in range(cols):  # round(w x + acc): w x exact in float64, the sum of it and a float32 rounded once
        want = (w64[:, k:k + 1] * x[k].astype(np.float64) + want).astype(np.float32)
    for threads in (1, 2, 3):
        out = np.full((rows, n), np.nan, np.float32)
        _fp16.gemm(w, x, out, cols, n, threads)
        np.testing.assert_array_equal(out, want)
    stacked = np.full((3, rows, n), np.nan, np.float32)  # batches (attention's heads): each its own product
    _fp16.gemm(np.stack([w, w[::-1].copy(), w]), np.stack([x, x, x[::-1].copy()]), stacked, cols, n, 2, 3)
    np.testing.assert_array_equal(stacked[0], want)
    np.testing.assert_array_equal(stacked[1], want[::-1])
    _fp16.gemm(w, x[::-1].copy(), out, cols, n)  # the third product alone
    np.testing.assert_array_equal(stacked[2], out)
    for args in [(w, x[:-1], out, cols, n), (w, x, out[:-1], cols, n), (w[:, :-1].copy(), x, out, cols, n),
                 (w, x, out, cols, n, 1, 2)]:
        with pytest.raises(ValueError, match="do not make|output bytes"):
            _fp16.gemm(*args)


def test_fp16_gemv_threads_survive_a_fork():
    """A process forked after the GEMV started its threads has none of them: its split products must still run
    (and not wait forever for workers that are not there)."""
    import multiprocessing

    from ane_eval.mil import _fp16

    w, x = np.ones((4096, 64), np.float16), np.ones(64, np.float32)
    _fp16.gemv(w, x, np.empty(4096, np.float32), 64, -1, 2)  # the workers exist now
    child = multiprocessing.get_context("fork").Process(target=_split_gemv_and_exit, args=(w, x))
    child.start()
    child.join(60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0


def _split_gemv_and_exit(w, x):
    from ane_eval.mil import _fp16

    out = np.empty(w.shape[0], np.float32)
    _fp16.gemv(w, x, out, w.shape[1], -1, 2)
    raise SystemExit(0 if (out == w.shape[1]).all() else 1)


def test_fp16_gemv_refuses_buffers_of_the_wrong_size():
    from ane_eval.mil import _fp16

    w, x, out = np.zeros((4, 8), np.float16), np.zeros(8, np.float32), np.zeros(4, np.float32)
    for args in [(w, x[:7], out, 8), (w, x, out[:3], 8), (w[:, :7].copy(), x, out, 8), (w, x, out, 0)]:
        with pytest.raises(ValueError, match="gemv: "):
            _fp16.gemv(*args)
    with pytest.raises(ValueError, match="not available"):
        _fp16.gemv(w, x, out, 8, 99)
    with pytest.raises(ValueError):  # a strided view is not one contiguous buffer
        _fp16.gemv(np.zeros((4, 16), np.float16)[:, ::2], x, out, 8)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
def test_unpack_bits_matches_bit_by_bit_unpacking(bits):
    """Packed sub-byte values (MIL blob storage: LSB first) against numpy's own bit-by-bit unpacking, for counts
    that fill and that do not fill the last byte; int4 also signed."""
    from ane_eval.mil.blob import unpack_bits

    for count in (1, 7, 8, 9, 1001):
        raw = rng.integers(0, 256, (count * bits + 7) // 8).astype(np.uint8)
        bit_array = np.unpackbits(raw, bitorder="little")[:count * bits].reshape(count, bits)
        want = (bit_array.astype(np.int64) << np.arange(bits)).sum(axis=1)
        got = unpack_bits(raw, bits, count)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)
        if bits == 4:
            signed = unpack_bits(raw, bits, count, signed=True)
            assert signed.dtype == np.int8
            np.testing.assert_array_equal(signed, np.where(want >= 8, want - 16, want))
        # a buffer one byte short yields only the elements it holds whole, never padding (callers check counts)
        short = unpack_bits(raw[:-1], bits, count)
        assert short.size == (raw.size - 1) * 8 // bits < count
        np.testing.assert_array_equal(short, want[:short.size])


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_unpack_bits_in_blocks(bits, monkeypatch):
    """Widths that do not divide 8 unpack a block of 8-element groups at a time: several blocks, a last partial
    block and a last partial group give the same values as bit-by-bit unpacking."""
    from ane_eval.mil import blob

    monkeypatch.setattr(blob, "UNPACK_GROUPS", 4)
    for count in (8 * 4 * 3, 8 * 4 * 3 + 13):
        raw = rng.integers(0, 256, (count * bits + 7) // 8).astype(np.uint8)
        bit_array = np.unpackbits(raw, bitorder="little")[:count * bits].reshape(count, bits)
        want = (bit_array.astype(np.int64) << np.arange(bits)).sum(axis=1)
        np.testing.assert_array_equal(blob.unpack_bits(raw, bits, count), want)
