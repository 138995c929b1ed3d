"""The builder writes exactly the ANEMLL contract (ANEMLL-CONTRACT.md §1-2) and refuses what upstream mangled."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import yaml

from ane_eval import demo
from ane_eval.convert import BuildError, BuildOptions, build
from ane_eval.convert.checkpoint import CheckpointError

from .conftest import write_checkpoint

FP16, INT32 = 65552, 131104  # CoreML ArrayFeatureType data types


def spec_of(path):
    import coremltools as ct

    return ct.models.MLModel(str(path), skip_model_load=True).get_spec()


def features(desc):
    def one(f):
        arr = f.type.multiArrayType if f.type.WhichOneof("Type") == "multiArrayType" else f.type.stateType.arrayType
        return tuple(arr.shape), arr.dataType
    return ({f.name: one(f) for f in desc.input}, {f.name: one(f) for f in desc.output},
            {f.name: one(f) for f in desc.state})


def op_types(spec, function):
    f = spec.mlProgram.functions[function]
    return Counter(op.type for op in f.block_specializations[f.opset].operations)


@pytest.fixture(scope="module")
def meta(demo_dir):
    return yaml.safe_load((demo_dir / "meta.yaml").read_text())["model_info"]


def test_demo_files_follow_the_layout(demo_dir):
    names = {p.name for p in demo_dir.iterdir()}
    assert {"config.json", "llama_FFN_PF_chunk_01of02.mlpackage", "llama_FFN_PF_chunk_02of02.mlpackage",
            "llama_embeddings.mlpackage", "llama_lm_head.mlpackage", "meta.yaml", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert not [n for n in names if n.endswith((".mlmodelc", ".bin", ".py"))]


def test_meta_yaml_schema(meta):
    p = meta["parameters"]
    assert meta["version"] == "0.3.4" and meta["architecture"] == "llama"
    assert {k: p[k] for k in ("context_length", "batch_size", "num_chunks", "split_lm_head")} == \
        {"context_length": 256, "batch_size": 32, "num_chunks": 2, "split_lm_head": 8}
    assert p["lut_ffn"] == p["lut_lmhead"] == p["lut_embeddings"] == "none"
    assert p["model_prefix"] == "llama"
    # upstream names compiled parts and leaves the chunk suffix off `ffn`
    assert (p["embeddings"], p["lm_head"], p["ffn"]) == ("llama_embeddings.mlmodelc", "llama_lm_head.mlmodelc",
                                                        "llama_FFN_PF.mlmodelc")


def test_embeddings_contract(demo_dir):
    spec = spec_of(demo_dir / "llama_embeddings.mlpackage")
    (inp,) = spec.description.input
    arr = inp.type.multiArrayType
    assert inp.name == "input_ids" and arr.dataType == INT32 and tuple(arr.shape) == (1, 1)
    assert [tuple(s.shape) for s in arr.enumeratedShapes.shapes] == [(1, 1), (1, 32)]
    (out,) = spec.description.output
    assert out.name == "hidden_states" and out.type.multiArrayType.dataType == FP16
    md = dict(spec.description.metadata.userDefined)
    assert md["com.anemll.context_length"] == "256" and "com.anemll.batch_size" not in md


@pytest.mark.parametrize("chunk", [1, 2])
def test_ffn_chunk_contract(demo_dir, chunk):
    spec = spec_of(demo_dir / f"llama_FFN_PF_chunk_{chunk:02d}of02.mlpackage")
    assert spec.description.defaultFunctionName == "infer"
    functions = {f.name: features(f) for f in spec.description.functions}
    assert set(functions) == {"infer", "prefill"}
    H, B, C, state = 128, 32, 256, ((8, 2, 256, 32), FP16)  # 2L=8, Hkv=2, S=C, d=32
    last_rows = 1 if chunk == 2 else B
    expected = {
        "infer": ({"hidden_states": ((1, 1, H), FP16), "position_ids": ((1,), INT32),
                   "causal_mask": ((1, 1, 1, C), FP16), "current_pos": ((1,), INT32)},
                  {"output_hidden_states": ((1, 1, H), FP16)}, {"model_model_kv_cache_0": state}),
        "prefill": ({"hidden_states": ((1, B, H), FP16), "position_ids": ((B,), INT32),
                     "causal_mask": ((1, 1, B, C), FP16), "current_pos": ((1,), INT32)},
                    {"output_hidden_states": ((1, last_rows, H), FP16)}, {"model_model_kv_cache_0": state}),
    }
    assert functions == expected
    md = dict(spec.description.metadata.userDefined)
    assert {k: md[k] for k in ("com.anemll.context_length", "com.anemll.batch_size", "com.anemll.num_chunks",
                               "com.anemll.chunk_no", "com.anemll.lut_bits")} == \
        {"com.anemll.context_length": "256", "com.anemll.batch_size": "32", "com.anemll.num_chunks": "2",
         "com.anemll.chunk_no": str(chunk), "com.anemll.lut_bits": "none"}
    assert "com.anemll.info" in md
    ops = op_types(spec, "infer")
    for family in ("conv", "layer_norm", "concat", "slice_update", "write_state", "read_state", "gather", "select",
                   "greater_equal", "cast", "matmul", "silu", "reduce_max", "exp", "reduce_sum", "real_div", "tile",
                   "linear"):
        assert ops[family] > 0, family
    assert "constexpr_lut_to_dense" not in ops


def test_lm_head_contract(demo_dir):
    spec = spec_of(demo_dir / "llama_lm_head.mlpackage")
    inputs, outputs, _ = features(spec.description)
    assert inputs == {"hidden_states": ((1, 1, 128), FP16)}
    assert [o.name for o in spec.description.output] == [f"logits{i}" for i in range(1, 9)]
    assert all(shape == (1, 1, 128) and dt == FP16 for shape, dt in outputs.values())  # 1024 / 8


def test_lut_variant_is_palettized():
    lut_dir = demo.model_dir(lut=4)
    meta = yaml.safe_load((lut_dir / "meta.yaml").read_text())["model_info"]["parameters"]
    assert meta["lut_ffn"] == meta["lut_lmhead"] == 4 and meta["ffn"] == "llama_FFN_PF_lut4.mlmodelc"
    spec = spec_of(lut_dir / "llama_FFN_PF_lut4_chunk_01of02.mlpackage")
    for fn in ("infer", "prefill"):
        assert op_types(spec, fn)["constexpr_lut_to_dense"] > 0
    f = spec.mlProgram.functions["infer"]
    lut_op = next(o for o in f.block_specializations[f.opset].operations if o.type == "constexpr_lut_to_dense")
    assert lut_op.outputs[0].type.tensorType.dataType == 10  # FLOAT16
    assert op_types(spec_of(lut_dir / "llama_lm_head_lut4.mlpackage"), "main")["constexpr_lut_to_dense"] == 8
    assert dict(spec.description.metadata.userDefined)["com.anemll.lut_bits"] == "4"


@pytest.mark.parametrize("opts, message", [
    ({"num_chunks": 2}, "3 layers cannot be split evenly into 2 chunks"),
    ({"split_lm_head": 5}, "vocabulary 1008 is not divisible by split_lm_head 5"),
    ({"context_length": 100, "batch_size": 32}, "context length 100 is not a positive multiple of batch size 32"),
    ({"lut_ffn": 5}, "lut_ffn=5: palettization supports"),
    ({"lut_ffn": 4, "lut_mode": "linear"}, "lut_mode='linear': LUTs are made by 'kmeans' or 'uniform'"),
    ({"split_lm_head": 16, "lut_lmhead": 4}, r"LM head parts of width \[63\] cannot be palettized in groups of 8"),
])
def test_refused_inputs(tmp_path, opts, message):
    ckpt = write_checkpoint(tmp_path / "ckpt", layers=3, vocab=1008)
    with pytest.raises(BuildError, match=message):
        build(ckpt, tmp_path / "out", BuildOptions(**{"context_length": 64, "batch_size": 16, **opts}))
    assert not (tmp_path / "out").exists()


def test_refused_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        build(tmp_path, tmp_path / "out")
    ckpt = write_checkpoint(tmp_path / "gpt", layers=1)
    cfg = (ckpt / "config.json").read_text().replace('"llama"', '"gpt2"')
    (ckpt / "config.json").write_text(cfg)
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported"):
        build(ckpt, tmp_path / "out")
    ckpt = write_checkpoint(tmp_path / "nobin", layers=1)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights"):
        build(ckpt, tmp_path / "out")


def test_qwen_split_may_be_uneven(tmp_path):
    """Qwen heads split V into 16 parts, the first V % 16 one larger (ANEMLL-CONTRACT.md §2)."""
    ckpt = write_checkpoint(tmp_path / "qwen", model_type="qwen2", layers=1, vocab=1000, bias=True)
    out = build(ckpt, tmp_path / "out", BuildOptions(context_length=32, batch_size=16))
    spec = spec_of(out / "qwen_lm_head.mlpackage")
    widths = [o.type.multiArrayType.shape[-1] for o in spec.description.output]
    assert widths == [63] * 8 + [62] * 8 and sum(widths) == 1000
    assert yaml.safe_load((out / "meta.yaml").read_text())["model_info"]["parameters"]["split_lm_head"] == 16
    ops = op_types(spec_of(out / "qwen_FFN_PF_chunk_01of01.mlpackage"), "infer")
    assert ops["softmax"] > 0 and ops["reduce_max"] == 0


def test_demo_checkpoint_weights_are_fp16_exact():
    from safetensors.numpy import load_file

    weights = load_file(str(demo.checkpoint_dir() / "model.safetensors"))
    assert all(w.dtype == np.float16 for w in weights.values())
    size = sum(f.stat().st_size for f in demo.checkpoint_dir().iterdir())
    assert size <= 5 * 1024 * 1024


@pytest.mark.parametrize("model_type, extra", [("qwen2", {"bias": True}), ("qwen3", {"qk_norm": True}),
                                               ("llama", {"tie": True})])
def test_other_architectures_match_transformers(tmp_path, model_type, extra):
    """Qwen2 (qkv bias), Qwen3 (q/k norm) and a tied-embedding Llama convert with the same numerics as
    transformers: fp32-mode logits after prefill and infer, PSNR >= 50 dB, identical argmax."""
    import torch
    from transformers import AutoModelForCausalLM

    import ane_eval

    from .conftest import hf_logits, psnr

    ckpt = write_checkpoint(tmp_path / "ckpt", model_type=model_type, layers=2, **extra)
    out = build(ckpt, tmp_path / "out", BuildOptions(context_length=64, batch_size=16, num_chunks=2))
    model = ane_eval.load_model(out, backend="mil", precision="fp32")
    ids = [int(t) for t in np.random.default_rng(0).integers(2, 1000, 40)]
    model.prefill(ids[:20])
    got = np.stack([model.infer(t, p) for p, t in enumerate(ids) if p >= 20])
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ref = hf_logits(hf, ids)[20:]
    assert psnr(ref, got) >= 50
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_shipped_demo_task_data_matches_its_generator(tmp_path):
    from ane_eval.demo.tasks import DATA_DIR, write_data

    write_data(tmp_path)
    shipped = sorted(p.name for p in DATA_DIR.glob("*.jsonl"))
    assert shipped == sorted(p.name for p in tmp_path.glob("*.jsonl"))
    for name in shipped:
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name


def test_training_corpus_is_deterministic():
    from ane_eval.demo import world

    assert world.corpus(50, seed=3) == world.corpus(50, seed=3)
    assert world.corpus(50, seed=3) != world.corpus(50, seed=4)
    assert len({p.name for p in world.WORLD}) == 40


@pytest.mark.parametrize("mode", ["uniform", "kmeans"])
def test_lut_mode(tmp_path, mode):
    """--lut-mode uniform: each group's 16 levels evenly spaced, so every dequantized weight of a group of 8 output
    channels lies on one grid (up to fp16 rounding); k-means levels do not."""
    from ane_eval import mil

    ckpt = write_checkpoint(tmp_path / "ckpt", layers=1, vocab=1008)
    out = build(ckpt, tmp_path / "out", BuildOptions(context_length=64, batch_size=16, lut_ffn=4, lut_mode=mode))
    chunk = mil.load(next(out.glob("*_chunk_01of01.mlpackage")), "infer")
    weights = [v[0] for k, v in chunk._package.consts.values.items() if k[0] == "constexpr_lut_to_dense"]
    assert weights
    on_grid = []
    for w in weights:
        for group in w.astype(np.float64).reshape(-1, 8, int(np.prod(w.shape[1:]))):
            levels = np.unique(group)
            step = (levels[-1] - levels[0]) / 15
            on_grid.append(np.allclose(np.diff(levels) / step, np.round(np.diff(levels) / step), atol=0.05))
    assert all(on_grid) if mode == "uniform" else not all(on_grid)
