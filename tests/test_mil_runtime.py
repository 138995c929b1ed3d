"""The portable runtime end to end: the demo model reproduces HF transformers; bad files and inputs give errors."""
from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest

import ane_eval
from ane_eval import demo, mil
from ane_eval.demo import world

from .conftest import hf_logits, psnr


def prompt_ids(tokenizer, n: int = 120) -> list[int]:
    import random

    rng = random.Random(3)
    text = " ".join(world.document(rng) for _ in range(30))
    ids = tokenizer.encode(text)
    assert len(ids) >= n
    return ids[:n]


def runtime_logits(model, ids, split: int = 40) -> np.ndarray:
    """Positions split.. after a prefill of ids[:split]; positions ..split token by token: both paths checked."""
    model.reset()
    model.prefill(ids[:split])
    tail = [model.infer(t, p) for p, t in enumerate(ids) if p >= split]
    model.reset()
    head = [model.infer(t, p) for p, t in enumerate(ids[:split])]
    return np.stack(head + tail)


@pytest.fixture(scope="module")
def models(demo_dir):
    return {p: ane_eval.load_model(demo_dir, backend="mil", precision=p) for p in ("fp32", "fp16")}


def test_fp32_reproduces_transformers(models, hf_demo):
    model = models["fp32"]
    ids = prompt_ids(model.tokenizer)
    ref = hf_logits(hf_demo, ids)[:, :model.vocab_size]
    got = runtime_logits(model, ids)
    assert psnr(ref, got) >= 50
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_fp16_close_to_transformers(models, hf_demo):
    """fp16 emulation: PSNR >= 35 dB and argmax agreement >= 99 % over 1,440 positions of six prompts; every
    disagreement is a near-tie of the fp32 reference (top-2 logits closer than fp16 can resolve)."""
    import random

    model = models["fp16"]
    agree, total = 0, 0
    for seed in range(6):
        rng = random.Random(100 + seed)
        ids = model.tokenizer.encode(" ".join(world.document(rng) for _ in range(40)))[:250]
        ref = hf_logits(hf_demo, ids)[10:]
        model.reset()
        model.prefill(ids[:10])
        got = np.stack([model.infer(t, p) for p, t in enumerate(ids) if p >= 10])
        assert psnr(ref, got) >= 35
        same = got.argmax(-1) == ref.argmax(-1)
        top2 = np.sort(ref, axis=-1)[:, -2:]
        assert (top2[~same, 1] - top2[~same, 0] < 1e-2).all(), "an fp16 argmax flip away from a near-tie"
        agree, total = agree + int(same.sum()), total + len(same)
    assert total == 1440 and agree / total >= 0.99


def dequantized_weights(lut_dir):
    """The palettized weights as coremltools itself decodes them, mapped back to HF parameter names."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    def weights_in_order(path, function):
        spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
        prog = load_milproto(spec, spec.specificationVersion, str(path / "Data/com.apple.CoreML/weights"))
        out = []
        for op in prog.functions[function].operations:
            if op.op_type in ("conv", "linear"):
                w = op.weight
                val = w.op.materialized_val_inference() if w.op.op_type.startswith("constexpr") else w.val
                out.append(np.asarray(val, dtype=np.float32).reshape(val.shape[0], -1))
        return out

    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    weights, layer = {}, 0
    for chunk in sorted(lut_dir.glob("*_chunk_*.mlpackage")):
        ws = weights_in_order(chunk, "infer")
        for i in range(0, len(ws), len(names)):
            for name, w in zip(names, ws[i:i + len(names)]):
                weights[f"model.layers.{layer}.{name}.weight"] = w
            layer += 1
    head = next(lut_dir.glob("*_lm_head*.mlpackage"))
    weights["lm_head.weight"] = np.concatenate(weights_in_order(head, "main"))
    return weights


@pytest.mark.parametrize("bits", [4, 6])
def test_lut_build_matches_dequantized_reference(bits, hf_demo):
    import copy

    import torch

    lut_dir = demo.model_dir(lut=bits)
    ref_model = copy.deepcopy(hf_demo)
    params = dict(ref_model.named_parameters())
    dequant = dequantized_weights(lut_dir)
    assert len(dequant) == 4 * 7 + 1
    with torch.no_grad():
        for name, w in dequant.items():
            assert params[name].shape == w.shape, name
            changed = not np.array_equal(params[name].numpy(), w)
            params[name].copy_(torch.from_numpy(w))
            assert changed or name.endswith("o_proj.weight"), f"{name} was not palettized"
    model = ane_eval.load_model(lut_dir, backend="mil", precision="fp32")
    ids = prompt_ids(model.tokenizer, 80)
    ref = hf_logits(ref_model, ids)
    got = runtime_logits(model, ids)
    assert psnr(ref, got) >= 50
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    model16 = ane_eval.load_model(lut_dir, backend="mil", precision="fp16")
    got16 = runtime_logits(model16, ids)
    assert psnr(ref, got16) >= 35 and (got16.argmax(-1) == ref.argmax(-1)).mean() >= 0.99


def test_in_place_state_updates_change_nothing(demo_dir, monkeypatch):
    """The alias analysis that updates the KV cache in place gives bit-identical results to plain copies."""
    from ane_eval.mil import interpreter, ops

    in_place = []  # the flag each slice_update ran with
    kernel = ops.KERNELS["slice_update"]
    monkeypatch.setitem(ops.KERNELS, "slice_update", lambda **kw: in_place.append(kw.get("_in_place")) or kernel(**kw))
    chunk = next(demo_dir.glob("*_chunk_01of02.mlpackage"))
    fast = mil.load(chunk, "prefill")
    monkeypatch.setattr(interpreter.Plan, "_plan_in_place", lambda self: None)
    interpreter_plain = mil.MILModel(chunk, "prefill")
    rng = np.random.default_rng(0)
    inputs = {"hidden_states": rng.standard_normal((1, 32, 128)).astype(np.float16),
              "position_ids": np.arange(32, 64, dtype=np.int32),
              "causal_mask": ane_eval.model.causal_mask(256)[:, :, 32:64, :],
              "current_pos": np.array([32], np.int32)}
    s1, s2 = fast.make_state(), interpreter_plain.make_state()
    for s in (s1, s2):
        s.write_state("model_model_kv_cache_0", rng.standard_normal((8, 2, 256, 32)).astype(np.float16) * 0 + 0.5)
    a = fast.predict(inputs, s1)["output_hidden_states"]
    assert in_place == [True] * 4  # two layers, K and V
    in_place.clear()
    b = interpreter_plain.predict(inputs, s2)["output_hidden_states"]
    assert in_place == [None] * 4
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(s1.read_state("model_model_kv_cache_0"), s2.read_state("model_model_kv_cache_0"))


def test_api_mirrors_coremltools(demo_dir):
    chunk = next(demo_dir.glob("*_chunk_02of02.mlpackage"))
    p = mil.load(chunk)
    assert p.function_name == "infer" and p.functions == ["infer", "prefill"]
    assert [f.name for f in p.input_description] == ["hidden_states", "position_ids", "causal_mask", "current_pos"]
    assert [(f.name, f.shape, f.dtype) for f in p.state_description] == \
        [("model_model_kv_cache_0", (8, 2, 256, 32), "fp16")]
    assert p.user_defined_metadata["com.anemll.chunk_no"] == "2"
    emb = mil.load(next(demo_dir.glob("*_embeddings.mlpackage")))
    assert emb.input_description[0].shapes == ((1, 1), (1, 32))
    out = emb.predict({"input_ids": np.array([[1, 2] * 16], np.int32)})
    assert out["hidden_states"].shape == (1, 32, 128) and out["hidden_states"].dtype == np.float16


def test_input_errors_name_model_function_input_and_expectation(demo_dir):
    chunk = next(demo_dir.glob("*_chunk_01of02.mlpackage"))
    p = mil.load(chunk, "prefill")
    state = p.make_state()
    good = {"hidden_states": np.zeros((1, 32, 128), np.float16), "position_ids": np.arange(32, dtype=np.int32),
            "causal_mask": np.zeros((1, 1, 32, 256), np.float16), "current_pos": np.array([0], np.int32)}
    p.predict(good, state)
    name = chunk.name
    with pytest.raises(mil.InputError, match=rf"{name} function 'prefill': undeclared input\(s\) \['update_mask'\]"):
        p.predict({**good, "update_mask": np.zeros((1,), np.float16)}, state)
    with pytest.raises(mil.InputError, match=r"input 'hidden_states' expects \(1, 32, 128\) fp16, got \(1, 10, 128\)"):
        p.predict({**good, "hidden_states": np.zeros((1, 10, 128), np.float16)}, state)
    with pytest.raises(mil.InputError, match=r"input 'current_pos' expects \(1,\) int32, got \(1,\) int64; "
                                             r"convert with .astype\(np.int32\)"):
        p.predict({**good, "current_pos": np.array([0])}, state)
    with pytest.raises(mil.InputError, match="missing input"):
        p.predict({k: v for k, v in good.items() if k != "causal_mask"}, state)
    with pytest.raises(mil.InputError, match="pass state=model.make_state"):
        p.predict(good)
    with pytest.raises(mil.InputError, match=r"input 'input_ids' expects \(1, 1\) or \(1, 32\) int32"):
        mil.load(next(demo_dir.glob("*_embeddings.mlpackage"))).predict({"input_ids": np.zeros((1, 5), np.int32)})


def test_unsupported_ops_are_all_reported_at_load(demo_dir, monkeypatch):
    from ane_eval.mil import ops

    monkeypatch.delitem(ops.KERNELS, "silu")
    monkeypatch.delitem(ops.KERNELS, "layer_norm")
    with pytest.raises(mil.UnsupportedOpsError, match=r"layer_norm ×4, silu ×2"):
        mil.MILModel(next(demo_dir.glob("*_chunk_01of02.mlpackage")), "prefill")


@pytest.fixture()
def head_copy(demo_dir, tmp_path):
    dst = tmp_path / "head.mlpackage"
    shutil.copytree(next(demo_dir.glob("*_lm_head.mlpackage")), dst)
    return dst, dst / "Data/com.apple.CoreML/weights/weight.bin"


def _patch(path, offset, data: bytes):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def test_bad_sentinel(head_copy):
    pkg, weights = head_copy
    _patch(weights, 64, struct.pack("<I", 0x12345678))
    with pytest.raises(mil.BlobError, match=r"blob at offset 64: bad sentinel 0x12345678 \(expected 0xDEADBEEF\)"):
        mil.load(pkg)


def test_truncated_weights(head_copy):
    pkg, weights = head_copy
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    with pytest.raises(mil.BlobError, match="truncated or corrupt"):
        mil.load(pkg)


def test_offset_past_end(head_copy):
    pkg, weights = head_copy
    _patch(weights, 64 + 16, struct.pack("<Q", 1 << 40))  # the record's data offset
    with pytest.raises(mil.BlobError, match=r"data of \d+ bytes at 1099511627776 does not hold"):
        mil.load(pkg)


def test_tiny_header(head_copy):
    pkg, weights = head_copy
    weights.write_bytes(b"\x01\x00")
    with pytest.raises(mil.BlobError, match="shorter than its 64-byte header"):
        mil.load(pkg)


def test_weights_outside_the_package_are_refused(head_copy):
    from ane_eval.mil.frontends import proto

    pkg, _ = head_copy
    spec_path = pkg / "Data/com.apple.CoreML/model.mlmodel"
    spec = proto.read_spec(pkg)
    fn = spec.mlProgram.functions["main"]
    block = fn.block_specializations[fn.opset]
    for op in block.operations:
        if op.type == "const" and op.attributes["val"].WhichOneof("value") == "blobFileValue":
            op.attributes["val"].blobFileValue.fileName = "@model_path/../../../../etc/passwd"
            break
    spec_path.write_bytes(spec.SerializeToString())
    with pytest.raises(mil.ModelFormatError, match="points outside the model package"):
        mil.load(pkg)


def test_single_file_mlmodel_program(tmp_path):
    """An ML Program stored as one .mlmodel file (all constants immediate) loads and runs."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.softmax(x=mb.mul(x=x, y=np.float32(2.0)), axis=-1, name="y")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT32)
    path = tmp_path / "tiny.mlmodel"
    path.write_bytes(model.get_spec().SerializeToString())
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y = mil.load(path).predict({"x": x})["y"]
    e = np.exp(2 * x - (2 * x).max(-1, keepdims=True))
    np.testing.assert_allclose(y, e / e.sum(-1, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize("segment", [1, None])
def test_op_failure_at_run_time_names_the_op(tmp_path, monkeypatch, segment):
    """An op that fails while running (here a gather index past the table) is reported as one ExecutionError
    naming the model, function, op type and output, by the compiled code's line -> op map; with one step per
    generated function too (values handed from function to function)."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    from ane_eval.mil import interpreter

    if segment:
        monkeypatch.setattr(interpreter, "SEGMENT", segment)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2,), dtype=ct.converters.mil.mil.types.int32)],
                opset_version=ct.target.iOS18)
    def prog(idx):
        table = mb.const(val=np.arange(8, dtype=np.float32).reshape(4, 2))  # small: stored inline
        rows = mb.gather(x=table, indices=mb.add(x=idx, y=np.int32(1)), axis=0, name="rows")
        return mb.mul(x=rows, y=np.float32(2.0), name="y")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT32)
    path = tmp_path / "gather.mlmodel"
    path.write_bytes(model.get_spec().SerializeToString())
    m = mil.load(path)
    np.testing.assert_array_equal(m.predict({"idx": np.array([2, -1], np.int32)})["y"], [[12, 14], [0, 2]])
    with pytest.raises(mil.ExecutionError, match=r"gather\.mlmodel:main: op gather \(rows\): gather: index 7 out of "
                                                 r"bounds for an axis of size 4"):
        m.predict({"idx": np.array([0, 6], np.int32)})


def _attention_program(tmp_path, softmax_op: bool, transpose_key: bool):
    """q/k/v/mask inputs through the attention pattern the runtime fuses, saved as a single-file ML Program."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    H, T, S, D = 2, 3, 8, 4
    k_shape = (1, H, S, D) if transpose_key else (1, H, D, S)
    fp16 = ct.converters.mil.mil.types.fp16

    @mb.program(input_specs=[mb.TensorSpec(shape=s, dtype=fp16) for s in
                             ((1, H, T, D), k_shape, (1, H, S, D), (1, 1, T, S))], opset_version=ct.target.iOS18)
    def prog(q, k, v, mask):
        scores = mb.add(x=mb.mul(x=np.float16(0.5), y=mb.matmul(x=q, y=k, transpose_y=transpose_key)), y=mask)
        if softmax_op:
            probs = mb.softmax(x=scores, axis=-1)
        else:
            e = mb.exp(x=mb.sub(x=scores, y=mb.reduce_max(x=scores, axes=[-1], keep_dims=True)))
            probs = mb.real_div(x=e, y=mb.reduce_sum(x=e, axes=[-1], keep_dims=True))
        return mb.matmul(x=probs, y=v, name="out")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT16)
    path = tmp_path / f"attn_{softmax_op}_{transpose_key}.mlmodel"
    path.write_bytes(model.get_spec().SerializeToString())
    gen = np.random.default_rng(0)
    mask = np.zeros((1, 1, T, S), np.float32)
    mask[..., 5:] = -np.inf  # slots 5.. unseen by every row
    mask[0, 0, 0, 4] = -np.inf  # a slot only some rows see stays
    inputs = {"q": gen.standard_normal((1, H, T, D)), "k": gen.standard_normal(k_shape),
              "v": gen.standard_normal((1, H, S, D)), "mask": mask}
    return path, {n: x.astype(np.float16) for n, x in inputs.items()}


@pytest.mark.parametrize("softmax_op,transpose_key", [(False, True), (True, True), (False, False)])
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_fused_attention_matches_the_unfused_ops(tmp_path, monkeypatch, softmax_op, transpose_key, precision):
    """The attention rewrite (one op over the visible key slots) gives the op-by-op results, and it takes place."""
    from ane_eval.mil import fuse, interpreter, ops

    path, inputs = _attention_program(tmp_path, softmax_op, transpose_key)
    live = []
    kernel = ops.KERNELS[fuse.FUSED_ATTENTION]
    monkeypatch.setitem(ops.KERNELS, fuse.FUSED_ATTENTION,
                        lambda **kw: live.append(fuse._live_slots(kw["mask"], 8)) or kernel(**kw))
    if precision == "fp32":
        inputs = {n: x.astype(np.float32) for n, x in inputs.items()}
    fused = mil.load(path, precision=precision).predict(inputs)["out"]
    assert live == [5]
    monkeypatch.setattr(interpreter, "fuse", lambda ops_, outputs: ops_)
    plain = mil.load(path, precision=precision).predict(inputs)["out"]
    assert live == [5]  # the unfused program never called it
    np.testing.assert_allclose(fused.astype(np.float32), plain.astype(np.float32), rtol=0, atol=2e-3)


def test_rewrites_match_the_op_by_op_program(demo_dir, monkeypatch):
    """On both functions of a demo chunk: the rotary and mirrored-norm rewrites change nothing, bit for bit; the
    attention rewrite (grouped-query heads included) and the stacked projections stay within fp16 rounding of
    the op-by-op program."""
    from collections import Counter

    from ane_eval.mil import fuse
    from ane_eval.mil.frontends import proto
    from ane_eval.model import causal_mask

    chunk = next(demo_dir.glob("*_chunk_01of02.mlpackage"))
    rng = np.random.default_rng(0)
    cache = rng.standard_normal((8, 2, 256, 32)).astype(np.float16)
    calls = {
        "prefill": {"hidden_states": rng.standard_normal((1, 32, 128)).astype(np.float16),
                    "position_ids": np.arange(32, 64, dtype=np.int32),
                    "causal_mask": causal_mask(256)[:, :, 32:64, :],
                    "current_pos": np.array([32], np.int32)},
        "infer": {"hidden_states": rng.standard_normal((1, 1, 128)).astype(np.float16),
                  "position_ids": np.array([40], np.int32),
                  "causal_mask": causal_mask(256)[:, :, 40:41, :],
                  "current_pos": np.array([40], np.int32)}}
    patterns = fuse.PATTERNS
    for function in calls:
        fn = proto.load(chunk, only=function).functions[function]
        fused_ops = fuse.fuse(fn.block.operations, fn.block.outputs)
        fused = Counter(o.type for o in fused_ops)
        assert [fused[t] for t in (fuse.FUSED_ROTARY, fuse.FUSED_MIRRORED_NORM, fuse.FUSED_ATTENTION)] == [4, 4, 2]
        # grouped-query attention (4 query heads on 2 KV heads) reads the KV heads without repeating them
        assert [o.attributes["groups"] for o in fused_ops if o.type == fuse.FUSED_ATTENTION] == [2, 2]
        assert fused["tile"] == 0
        # per layer: q/k/v stacked, gate/up stacked, down alone
        assert (Counter(o.type for o in fn.block.operations)["conv"], fused["conv"], fused["split"]) == (12, 6, 4)

    def run(function, only_patterns=(), stack=False):
        monkeypatch.setattr(fuse, "PATTERNS", only_patterns)
        monkeypatch.setattr(fuse, "REWRITES", (fuse.fuse_patterns,) + ((fuse.stack_projections,) if stack else ()))
        m = mil.MILModel(chunk, function)
        state = m.make_state()
        state.write_state("model_model_kv_cache_0", cache)
        return m.predict(calls[function], state)["output_hidden_states"].astype(np.float32)

    for function in calls:
        plain = run(function)
        np.testing.assert_array_equal(run(function, (fuse._rotary, fuse._mirrored_norm)), plain)
        tolerance = dict(rtol=0, atol=np.abs(plain).max() * 2e-3)
        np.testing.assert_allclose(run(function, stack=True), plain, **tolerance)
        np.testing.assert_allclose(run(function, patterns, stack=True), plain, **tolerance)


def test_only_plain_sibling_projections_are_stacked():
    """Stacked: 1x1 convs of one input whose weights are stored constants read by them alone. Left alone: a conv
    with a bias, one whose weight is read twice, one on another input, a lone conv."""
    from pathlib import Path

    from ane_eval.mil import fuse, ir

    def const(name, rows):
        t = ir.TensorType("fp16", (rows, 8, 1, 1))
        return ir.Op("const", {}, [(name, t)], {"val": ir.BlobRef(Path("w.bin"), 64 * rows, t)})

    def conv(out, x, w, rows, **extra):
        inputs = {"x": [ir.Arg(name=x)], "weight": [ir.Arg(name=w)], **{k: [ir.Arg(value=v)] for k, v in extra.items()}}
        return ir.Op("conv", inputs, [(out, ir.TensorType("fp16", (1, rows, 1, 4)))])

    ops = [const("wq", 8), const("wk", 4), const("wb", 2), const("ws", 2), const("wo", 3), const("wv", 4),
           conv("q", "x", "wq", 8, pad_type="valid"), conv("k", "x", "wk", 4, pad_type="valid"),
           conv("b", "x", "wb", 2, pad_type="valid", bias=np.zeros(2, np.float32)),
           conv("s1", "x", "ws", 2, pad_type="valid"), conv("s2", "x", "ws", 2, pad_type="valid"),
           conv("o", "y", "wo", 3, pad_type="valid"), conv("v", "x", "wv", 4, pad_type="valid")]
    out = fuse.stack_projections(ops, ["q", "k", "v", "b", "s1", "s2", "o"])
    stacked = [o for o in out if o.type == "const" and isinstance(o.attributes["val"], ir.StackedBlobs)]
    assert len(stacked) == 1 and [r.offset for r in stacked[0].attributes["val"].parts] == [512, 256, 256]
    assert stacked[0].outputs[0][1].shape == (16, 8, 1, 1)
    split = next(o for o in out if o.type == "split")
    assert [n for n, _ in split.outputs] == ["q", "k", "v"]
    assert {o.outputs[0][0] for o in out if o.type == "conv"} == {"ane_eval_stacked_q", "b", "s1", "s2", "o"}


def test_fp16_storage_changes_nothing(demo_dir, monkeypatch, tmp_path):
    """fp16 mode keeps the KV state, the tables only gathered from (embeddings, RoPE) and the projections' weights
    in fp16, half the memory of float32 storage. With the blocked float32 products (gemm.py) the logits are
    bit-identical to float32 storage; the fast products (fp16 GEMV, oneDNN fp16 GEMM) sum in another float32 order, each
    projection at most one fp16 ulp apart (tests/test_mil_ops.py), the logits within a few ulps."""
    from ane_eval.mil import gemm, interpreter

    package = shutil.copytree(next(demo_dir.glob("*_embeddings.mlpackage")), tmp_path / "emb.mlpackage")
    emb = mil.load(package)  # a package no other test has loaded (loaded packages share their weights)
    table = [v for v in emb._package.consts.values.values() if getattr(v, "shape", None) == (1024, 128)]
    assert [t.dtype for t in table] == [np.float16]
    chunk = shutil.copytree(next(demo_dir.glob("*_chunk_01of02.mlpackage")), tmp_path / "chunk.mlpackage")
    infer = mil.load(chunk, "infer")
    weights = [v for v in infer._package.consts.values.values() if getattr(v, "ndim", 0) == 4]
    assert weights and {w.dtype for w in weights} == {np.dtype(np.float16)}  # every projection's weight
    assert infer.make_state().buffers["model_model_kv_cache_0"].value.dtype == np.float16
    fp32 = mil.load(chunk, "infer", precision="fp32")
    assert fp32.make_state().buffers["model_model_kv_cache_0"].value.dtype == np.float32
    assert {v.dtype for v in fp32._package.consts.values.values() if getattr(v, "ndim", 0) == 4} >= \
        {np.dtype(np.float32)}  # fp32 mode: float32 weights of its own

    def logits():
        m = ane_eval.load_model(demo_dir, backend="mil", precision="fp16")
        m.prefill(list(range(5, 45)))
        return np.stack([m.infer(t, p) for p, t in zip(range(40, 48), range(50, 58))])

    fast = logits()
    monkeypatch.setattr(gemm, "FAST_GEMV", False)
    monkeypatch.setattr(gemm, "FAST_GEMM", False)
    compact = logits()
    monkeypatch.setattr(interpreter, "_fp16_resident", lambda operations, outputs: set())
    monkeypatch.setattr(mil, "_storage", lambda dtype, precision: np.float32)
    wide = logits()
    np.testing.assert_array_equal(compact, wide)
    assert not np.array_equal(fast, wide)  # the fast path ran
    assert psnr(wide, fast) >= 50 and (fast.argmax(-1) == wide.argmax(-1)).all()


def test_every_conversion_code_path_gives_the_same_numbers(demo_dir, monkeypatch):
    """The fp16 conversions' plain C code path (the one on CPUs without F16C, AVX-512 or NEON) and the fastest one
    give the same logits, bit for bit, through a whole prefill and decode. The products take the blocked path (BLAS):
    the GEMV's code paths sum in different orders, tested on their own."""
    from ane_eval.mil import _fp16, fp16, gemm

    monkeypatch.setattr(gemm, "FAST_GEMM", False)
    monkeypatch.setattr(gemm, "FAST_GEMV", False)

    def logits():
        m = ane_eval.load_model(demo_dir, backend="mil", precision="fp16")
        m.prefill(list(range(5, 45)))
        return np.stack([m.infer(t, p) for p, t in zip(range(40, 44), range(50, 54))])

    fastest = logits()
    monkeypatch.setattr(fp16, "ISA", _fp16.isas()["generic"])
    np.testing.assert_array_equal(logits(), fastest)


@pytest.mark.parametrize("n", [6, 3000], ids=["small-outputs", "large-outputs"])  # both rounding paths (SMALL=1024)
def test_fp16_mode_rounds_every_op_output_bit_for_bit(tmp_path, n):
    """fp16 mode against an independent fp16 evaluation: each op computed in float32 from fp16 operands and its
    result cast to fp16 by numpy (CoreML's semantics: every fp16 op output is an fp16 value). The chain overflows
    past 65504 and loses precision in intermediates, so a runtime that skipped any op's rounding differs."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    fp16 = ct.converters.mil.mil.types.fp16

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, n), dtype=fp16) for _ in range(2)], opset_version=ct.target.iOS18)
    def prog(x, y):
        big = mb.mul(x=x, y=np.float16(300.0))           # |x| > 218.3 overflows to inf in fp16
        s = mb.add(x=big, y=y)
        q = mb.real_div(x=s, y=np.float16(7.0))
        d = mb.sub(x=mb.mul(x=q, y=q), y=mb.mul(x=x, y=y))
        e = mb.exp(x=mb.mul(x=y, y=np.float16(0.01)))
        r = mb.rsqrt(x=mb.add(x=mb.mul(x=x, y=x), y=np.float16(1.0)))
        return mb.add(x=mb.mul(x=d, y=r), y=e, name="out")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT16, pass_pipeline=ct.PassPipeline.EMPTY)  # ops as written
    path = tmp_path / "chain.mlmodel"
    path.write_bytes(model.get_spec().SerializeToString())
    gen = np.random.default_rng(7)
    x = (gen.standard_normal((1, n)) * 2).astype(np.float16)
    y = (gen.standard_normal((1, n)) * 3).astype(np.float16)
    x[0, :2] = [250.0, -230.0]  # overflow in both directions

    def r(v):  # one op's output: float32 result, then fp16 (numpy's own cast, not the runtime's rounding code)
        return np.asarray(v, np.float32).astype(np.float16)

    def f(a):
        return a.astype(np.float32)

    with np.errstate(all="ignore"):
        big = r(f(x) * np.float32(300))
        q = r(f(r(f(big) + f(y))) / np.float32(7))
        d = r(f(r(f(q) * f(q))) - f(r(f(x) * f(y))))
        e = r(np.exp(f(r(f(y) * np.float32(0.01)))))
        rs = r(np.float32(1) / np.sqrt(f(r(f(r(f(x) * f(x))) + np.float32(1))) + np.float32(1e-12)))
        want = r(f(r(f(d) * f(rs))) + f(e))
    got = mil.load(path, precision="fp16").predict({"x": x, "y": y})["out"]
    assert np.isinf(want).any() and np.isfinite(want).sum() > want.size // 2  # the chain exercises overflow
    np.testing.assert_array_equal(np.asarray(got, np.float32).view(np.uint32), f(want).view(np.uint32))
    fp32 = mil.load(path, precision="fp32").predict({"x": x, "y": y})["out"]
    assert (np.asarray(fp32, np.float32) != f(want)).mean() > 0.2  # fp32 mode does not round: the test can tell


def test_lut_weights_are_decompressed_once_and_held_in_fp16(tmp_path, monkeypatch):
    """A palettized chunk's infer and prefill share each decompressed weight, held as fp16; the LUT indices and
    tables are read for the decompression and not held after it (fp32 mode: one float32 copy of its own); the
    4-bit indices reach the lookup still packed (byte-pair tables)."""
    from ane_eval.mil import ops

    chunk = shutil.copytree(next(demo.model_dir(lut=4).glob("*_chunk_01of02.mlpackage")), tmp_path / "c.mlpackage")
    by_pairs = []
    pairs = ops._lut_pairs_by_row_groups
    monkeypatch.setattr(ops, "_lut_pairs_by_row_groups", lambda idx, lut: by_pairs.append(idx) or pairs(idx, lut))
    infer = mil.load(chunk, "infer")
    held = dict(infer._package.consts.values)
    dense = [v for v in held.values() if isinstance(v, list) and v[0].ndim >= 2]  # conv and linear weights
    assert dense and all(v[0].dtype == np.float16 for v in dense)
    assert len(by_pairs) == len(dense)
    assert not [v for v in held.values() if getattr(v, "dtype", None) == np.uint8]  # no indices held
    mil.load(chunk, "prefill")
    assert len(infer._package.consts.values) == len(held)  # prefill added nothing: all shared
    mil.load(chunk, "infer", precision="fp32")
    wide = [v for k, v in infer._package.consts.values.items() if k not in held and isinstance(v, list)
            and v[0].ndim >= 2]
    assert len(wide) == len(dense) and all(v[0].dtype == np.float32 for v in wide)
    # the fp16 weights are looked up in the fp16 table directly: the fp32 mode's float32 lookup, value for value
    by_source = {k[3:]: v[0] for k, v in infer._package.consts.values.items() if k not in held and isinstance(v, list)}
    for k, v in held.items():
        if isinstance(v, list) and v[0].ndim >= 2 and k[0] == "constexpr_lut_to_dense":
            np.testing.assert_array_equal(v[0].astype(np.float32), by_source[k[3:]])
