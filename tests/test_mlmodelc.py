"""Compiled `.mlmodelc` parts on the portable runtime: the `model.mil` text front end gives the packages' IR and
bit-identical outputs, hand-written programs of both public dialects run, and bad compiled files fail in one line."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

import ane_eval
from ane_eval import contract, mil
from ane_eval.bundle import discover
from ane_eval.mil import frontends, ir

from .conftest import write_checkpoint
from .mlmodelc_writer import compile_directory, hex_float, write_blobs, write_mlmodelc


def same_ir(a, b, path="program"):
    """None when `a` and `b` are the same IR (stored constants compared by weight file name, offset and type: the
    two front ends point into different directories), else where they first differ."""
    if isinstance(a, ir.BlobRef) and isinstance(b, ir.BlobRef):
        return None if (a.path.name, a.offset, a.type) == (b.path.name, b.offset, b.type) else f"{path}: {a} != {b}"
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        equal = a.dtype == b.dtype and a.shape == b.shape and (
            bool((a == b).all()) if a.dtype == object else a.tobytes() == b.tobytes())
        return None if equal else f"{path}: {a!r} != {b!r}"
    if type(a) is not type(b):
        return f"{path}: {type(a).__name__} != {type(b).__name__}"
    if dataclasses.is_dataclass(a):
        pairs = [(f".{f.name}", getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)]
    elif isinstance(a, dict):
        if set(a) != set(b):
            return f"{path}: keys {sorted(a)} != {sorted(b)}"
        pairs = [(f"[{k!r}]", a[k], b[k]) for k in a]
    elif isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: {len(a)} items != {len(b)}"
        pairs = [(f"[{i}]", x, y) for i, (x, y) in enumerate(zip(a, b))]
    else:
        return None if a == b else f"{path}: {a!r} != {b!r}"
    return next((d for key, x, y in pairs if (d := same_ir(x, y, path + key))), None)


def test_same_ir_sees_a_difference(demo_dir, tmp_path):
    """The comparison the equivalence tests rely on is not blind: one changed literal is found."""
    pkg = demo_dir / "llama_embeddings.mlpackage"
    compiled = write_mlmodelc(pkg, tmp_path / "e.mlmodelc")
    text = (compiled / "model.mil").read_text()
    assert same_ir(frontends.load(pkg), frontends.load(compiled)) is None
    (compiled / "model.mil").write_text(text.replace("val = int32(0)]", "val = int32(1)]", 1))
    assert "int32" in same_ir(frontends.load(pkg), frontends.load(compiled))


def test_hex_floats_as_printf_writes_them():
    assert [hex_float(x) for x in (1.0, -1.0, 1.3125, 2 ** -17 * 1.3125, 0.0)] == \
        ["0x1p+0", "-0x1p+0", "0x1.5p+0", "0x1.5p-17", "0x0p+0"]


@pytest.fixture(scope="module")
def demo_builds(demo_dir):
    return {"fp16": demo_dir, "lut4": ane_eval.demo.model_dir(lut=4), "lut6": ane_eval.demo.model_dir(lut=6)}


@pytest.fixture(scope="module")
def other_architectures(tmp_path_factory):
    """Qwen2 (fp16, qkv bias) and Qwen3 (LUT4, q/k norm) converted by the project's converter."""
    from ane_eval.convert import BuildOptions, build

    root = tmp_path_factory.mktemp("arch")
    out = {}
    for name, kind, extra, lut in (("qwen2", "qwen2", {"bias": True}, None), ("qwen3", "qwen3", {"qk_norm": True}, 4)):
        ckpt = write_checkpoint(root / f"{name}-ckpt", model_type=kind, layers=2, **extra)
        out[name] = build(ckpt, root / name, BuildOptions(context_length=32, batch_size=16, num_chunks=1,
                                                          lut_ffn=lut, lut_lmhead=lut))
    return out


def _logits(model_dir, ids) -> np.ndarray:
    m = ane_eval.load_model(model_dir, backend="mil", precision="fp16")
    m.prefill(ids[:-4])
    return np.stack([m.infer(t, p) for p, t in enumerate(ids) if p >= len(ids) - 4])


@pytest.mark.parametrize("build", ["fp16", "lut4", "lut6", "qwen2", "qwen3"])
def test_compiled_copies_have_the_packages_ir_and_outputs(build, demo_builds, other_architectures, tmp_path):
    src = {**demo_builds, **other_architectures}[build]
    compiled = compile_directory(src, tmp_path / "compiled")
    assert not list(compiled.glob("*.mlpackage")) and len(list(compiled.glob("*.mlmodelc"))) >= 3
    for pkg in sorted(src.glob("*.mlpackage")):
        assert same_ir(frontends.load(pkg), frontends.load(compiled / f"{pkg.stem}.mlmodelc")) is None, pkg.name
    ids = [int(t) for t in np.random.default_rng(1).integers(3, 1000, 24)]
    a, b = _logits(src, ids), _logits(compiled, ids)
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes()  # bit-identical


def test_older_dialect_copy_runs_bit_identical(demo_builds, tmp_path):
    """The whole LUT4 demo written in the program(1.0)/ios16 form (tensor<string, []> scalars, the LUT op's
    parameters in its attribute bracket) gives the same bits."""
    src = demo_builds["lut4"]
    compiled = compile_directory(src, tmp_path / "old", dialect="ios16")
    text = (next(compiled.glob("*chunk_01*")) / "model.mil").read_text()
    assert text.startswith("program(1.0)") and "constexpr_lut_to_dense()[indices = " in text
    assert 'name = tensor<string, []>("' in text and "string(" not in text.replace("tensor<string, []>(", "")
    ids = [int(t) for t in np.random.default_rng(2).integers(3, 1000, 24)]
    assert _logits(src, ids).tobytes() == _logits(compiled, ids).tobytes()


def test_compiled_parts_declare_the_packages_interface(demo_builds, tmp_path):
    src = demo_builds["lut4"]
    compiled = compile_directory(src, tmp_path / "c")
    packages, compiled_parts = (contract.describe_parts(discover(d)) for d in (src, compiled))
    for role, part in packages.items():
        other = compiled_parts[role]
        assert other.path.suffix == ".mlmodelc"
        assert (other.functions, other.metadata, other.default_function) == \
            (part.functions, part.metadata, part.default_function), role
    # the enumerated prefill batch comes from metadata.json
    assert compiled_parts["embeddings"].feature(None, "inputs", "input_ids").shapes == ((1, 1), (1, 32))


def test_mixed_directory_and_preference(demo_dir, tmp_path):
    """Packages and compiled parts side by side: each part found; with both forms of one part, the portable runtime
    reads the package."""
    d = tmp_path / "mixed"
    shutil.copytree(demo_dir, d)
    chunk = next(d.glob("*chunk_01*.mlpackage"))
    write_mlmodelc(chunk, chunk.with_suffix(".mlmodelc"))
    head = next(d.glob("*lm_head*.mlpackage"))
    write_mlmodelc(head, head.with_suffix(".mlmodelc"))
    shutil.rmtree(head)
    bundle = discover(d, backend="mil")
    assert bundle.chunks[0].suffix == ".mlpackage" and bundle.lm_head.suffix == ".mlmodelc"
    assert discover(d, backend="coreml").chunks[0].suffix == ".mlmodelc"
    ids = [5, 9, 77, 300, 12, 8, 44, 19]
    assert _logits(d, ids).tobytes() == _logits(demo_dir, ids).tobytes()


def test_inspect_shows_compiled_parts_like_packages(demo_builds, tmp_path):
    from ane_eval.card import model_card

    src = demo_builds["lut4"]
    compiled = compile_directory(src, tmp_path / "c")
    a, b = model_card(src), model_card(compiled)
    for pa, pb in zip(a["parts"], b["parts"]):
        assert pb["file"] == pa["file"].replace(".mlpackage", ".mlmodelc")
        for key in ("functions", "metadata", "ops", "lut_bits", "parameters"):
            assert pb[key] == pa[key], (pa["file"], key)
    assert b["consistency"] == a["consistency"] and b["consistency"]["ok"]
    assert [p["lut_bits"] for p in b["parts"]] == [[], [4], [4], [4]]


# --- hand-written programs of both dialects --------------------------------------------------------------------------
IOS18 = """program(1.3)
[buildInfo = dict<string, string>({{"coremlc-component-MIL", "3510.2.1"}, {"coremlc-version", "3505.4.1"}})]
{
    func infer<ios18>(tensor<fp16, [1, 4]> x, state<tensor<fp16, [2, 4]>> cache) {
            tensor<fp16, [4, 4]> w = const()[name = string("w"), val = tensor<fp16, [4, 4]>(BLOBFILE(path = string("@model_path/weights/weight.bin"), offset = uint64(W)))];
            bool tx = const()[name = string("tx"), val = bool(false)];
            bool ty = const()[name = string("ty"), val = bool(true)];
            tensor<fp16, [1, 4]> y = matmul(transpose_x = tx, transpose_y = ty, x = x, y = w)[name = string("y")];
            fp16 scale = const()[name = string("scale"), val = fp16(0x1.8p+0)];
            tensor<fp16, [1, 4]> z = mul(x = y, y = scale)[name = string("z")];
            tensor<fp16, [4]> bias = const()[name = string("bias"), val = tensor<fp16, [4]>([0x1p-1, -0x1p+0, 0x0p+0, 0x1.4p+1])];
            tensor<fp16, [1, 4]> out = add(x = z, y = bias)[name = string("out")];
            tensor<fp16, [2, 4]> old = read_state(input = cache)[name = string("old")];
            int32 ax = const()[name = string("ax"), val = int32(0)];
            tensor<fp16, [3, 4]> both = concat(axis = ax, interleave = bool(false), values = (out, old))[name = string("both")];
            tensor<int32, [2]> sizes = const()[name = string("sizes"), val = tensor<int32, [2]>([2, 1])];
            tensor<fp16, [2, 4]> keep, tensor<fp16, [1, 4]> dropped = split(axis = ax, split_sizes = sizes, x = both)[name = string("s")];
            write_state(data = keep, input = cache)[name = string("store")];
    } -> (out, dropped);
    func main<ios18>(tensor<int32, [1, ?]> ids) {
            tensor<int32, [1, ?]> doubled = mul(x = ids, y = int32(-2))[name = string("doubled")];
    } -> (doubled);
}
"""

METADATA = [{"userDefinedMetadata": {"com.anemll.context_length": "2"}, "defaultFunctionName": "infer",
             "specificationVersion": 9, "modelType": {"name": "MLModelType_mlProgram"},
             "functions": [{"name": "main", "inputSchema": [
                 {"name": "ids", "type": "MultiArray", "dataType": "Int32", "shape": "[1, 1]",
                  "hasShapeFlexibility": "1", "enumeratedShapes": "[[1, 1], [1, 3]]"}]}]}]

IOS16 = """program(1.0)
[buildInfo = dict<tensor<string, []>, tensor<string, []>>({{"coremlc-component-MIL", "3520.4.1"}, {"coremlc-version", "3520.5.1"}})]
{
    func main<ios16>(tensor<fp16, [1, 4, 1, 1]> x) {
        tensor<fp16, [4, 4, 1, 1]> w = constexpr_lut_to_dense()[indices = tensor<uint8, [8]>(BLOBFILE(path = tensor<string, []>("@model_path/weights/weight.bin"), offset = tensor<uint64, []>(IDX))), lut = tensor<fp16, [16]>(BLOBFILE(path = tensor<string, []>("@model_path/weights/weight.bin"), offset = tensor<uint64, []>(LUT))), name = tensor<string, []>("wdeq"), shape = tensor<uint32, [4]>([4, 4, 1, 1])];
        tensor<string, []> pt = const()[name = tensor<string, []>("pt"), val = tensor<string, []>("valid")];
        tensor<int32, [2]> st = const()[name = tensor<string, []>("st"), val = tensor<int32, [2]>([1, 1])];
        tensor<int32, [4]> pd = const()[name = tensor<string, []>("pd"), val = tensor<int32, [4]>([0, 0, 0, 0])];
        tensor<int32, [2]> dl = const()[name = tensor<string, []>("dl"), val = tensor<int32, [2]>([1, 1])];
        tensor<int32, []> gr = const()[name = tensor<string, []>("gr"), val = tensor<int32, []>(1)];
        tensor<fp16, [1, 4, 1, 1]> y = conv(dilations = dl, groups = gr, pad = pd, pad_type = pt, strides = st, weight = w, x = x)[name = tensor<string, []>("y")];
        tensor<fp16, []> half = const()[name = tensor<string, []>("half"), val = tensor<fp16, []>(0x1p-1)];
        tensor<fp16, [1, 4, 1, 1]> out = mul(x = y, y = half)[name = tensor<string, []>("out")];
    } -> (out);
}
"""


def compiled_dir(root, text: str, blobs: dict, metadata=None):
    """A .mlmodelc holding `text` with each BLOBFILE offset placeholder (`W`, ...) set to where `blobs[W]` is."""
    root.mkdir(parents=True, exist_ok=True)
    offsets = write_blobs(root / "weights" / "weight.bin", list(blobs.values()))
    for key, offset in zip(blobs, offsets):
        text = text.replace(f"({key}))", f"({offset}))")
    (root / "model.mil").write_text(text)
    if metadata is not None:
        (root / "metadata.json").write_text(json.dumps(metadata))
    return root


def test_ios18_program(tmp_path):
    w = np.arange(16, dtype=np.float16).reshape(4, 4) - 6
    d = compiled_dir(tmp_path / "snippet.mlmodelc", IOS18, {"W": w}, METADATA)
    m = mil.load(d)
    assert m.function_name == "infer" and m.functions == ["infer", "main"]
    assert m.user_defined_metadata == {"com.anemll.context_length": "2"}
    x = np.array([[1, 2, 3, 4]], np.float16)
    expected = ((x.astype(np.float32) @ w.T.astype(np.float32)) * 1.5 + [0.5, -1, 0, 2.5]).astype(np.float16)
    state = m.make_state()
    first = m.predict({"x": x}, state)
    assert first["out"].tobytes() == expected.tobytes() and not first["dropped"].any()
    m.predict({"x": x}, state)
    assert (state.read_state("cache") == np.concatenate([expected, expected])).all()
    assert m.predict({"x": x}, state)["dropped"].tobytes() == expected.tobytes()
    main = mil.load(d, function_name="main")
    assert main.input_description[0].shapes == ((1, 1), (1, 3))
    assert (main.predict({"ids": np.array([[1, 2, 3]], np.int32)})["doubled"] == [[-2, -4, -6]]).all()
    with pytest.raises(mil.InputError, match=r"input 'ids' expects \(1, 1\) or \(1, 3\) int32, got \(1, 2\)"):
        main.predict({"ids": np.array([[1, 2]], np.int32)})


def test_ios16_program_with_parameters_in_the_attribute_bracket(tmp_path):
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 16, 16).astype(np.uint8)
    packed = (idx[0::2] | (idx[1::2] << 4)).astype(np.uint8)  # LSB first
    lut = (np.arange(16, dtype=np.float16) - 8) / 4
    d = compiled_dir(tmp_path / "old.mlmodelc", IOS16, {"IDX": packed, "LUT": lut})
    x = np.array([1, -2, 0.5, 3], np.float16).reshape(1, 4, 1, 1)
    out = mil.load(d).predict({"x": x})["out"]
    w = lut[idx].astype(np.float32).reshape(4, 4)
    expected = (np.float16(w @ x.reshape(4).astype(np.float32)) * np.float16(0.5)).reshape(1, 4, 1, 1)
    assert out.tobytes() == expected.tobytes()
    program = frontends.load(d)
    assert program.functions["main"].opset == "CoreML6" and program.default_function == "main"


# --- bad compiled files: one line naming the file --------------------------------------------------------------------
def _snippet(tmp_path):
    return compiled_dir(tmp_path / "bad.mlmodelc", IOS18, {"W": np.zeros((4, 4), np.float16)}, METADATA)


@pytest.mark.parametrize("old, new, message", [
    ('string("@model_path/weights/weight.bin")', 'string("@model_path/../../etc/passwd")',
     "points outside the model package"),
    ('string("@model_path/weights/weight.bin")', 'string("/etc/passwd")', "is not inside the model"),
    ("values = (out, old)", "values = (out, var_25)", "reads 'var_25' as values, which is never defined"),
    ("} -> (out, dropped);", "} -> (out, nowhere);", "output 'nowhere' is never defined"),
    ("fp16(0x1.8p+0)", "fp16(0x1.8p+0", r"line 9: expected '\)'"),
    ("tensor<fp16, [4]>([0x1p-1, -0x1p+0, 0x0p+0, 0x1.4p+1])", "tensor<fp16, [4]>([0x1p-1])",
     "holds 1 values, its shape needs 4"),
    ("int32(-2)", "int32(4294967296)", "outside the range of int32"),
    ("tensor<fp16, [1, 4]> x", "tensor<fp16, [65536, 65536, 65536]> x", "more elements than any model holds"),
    ("program(1.3)", "programme(1.3)", "expected 'program'"),
    ("tensor<int32, [2]>([2, 1])", "tensor<int32, [2]>(" + "[" * 40 + "2, 1" + "]" * 40 + ")", "nested deeper than 32"),
    ("keep, tensor<fp16, [1, 4]> dropped = split", "keep, tensor<fp16, [1, 4]> dropped = split{", r"line 17: expected '\(', found '{'"),
])
def test_corrupt_program_text(tmp_path, old, new, message):
    d = _snippet(tmp_path)
    text = (d / "model.mil").read_text()
    assert old in text
    (d / "model.mil").write_text(text.replace(old, new, 1))
    with pytest.raises(mil.ModelFormatError, match=message) as e:
        mil.load(d)
    assert str(d) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("damage, message", [
    (lambda m: m[0]["functions"][0]["inputSchema"][0].pop("enumeratedShapes"), "flexible dimension"),
    (lambda m: m[0]["functions"][0]["inputSchema"][0].update(enumeratedShapes="[[1, 1], [2, 3]]"),
     r"shape \[2, 3\], the program declares \[1, None\]"),
    (lambda m: m[0]["functions"][0]["inputSchema"][0].update(shape=7), "shape must be a shape"),
    (lambda m: m[0].update(userDefinedMetadata={"k": 1}), "userDefinedMetadata must be an object of strings"),
    (lambda m: m[0].update(defaultFunctionName="prefill"), "defaultFunctionName 'prefill' is not a function"),
    (lambda m: m.clear(), "the top level must be a list holding one object"),
])
def test_corrupt_metadata(tmp_path, damage, message):
    d = _snippet(tmp_path)
    meta = json.loads((d / "metadata.json").read_text())
    damage(meta)
    (d / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(mil.ModelFormatError, match=message) as e:
        mil.load(d)
    assert "metadata.json" in str(e.value) or str(d) in str(e.value)


def test_not_utf8_and_not_json(tmp_path):
    d = _snippet(tmp_path)
    (d / "metadata.json").write_bytes(b"\xff\xfe[")
    with pytest.raises(mil.ModelFormatError, match=r"metadata.json: not UTF-8"):
        mil.load(d)
    (d / "metadata.json").write_text("[{")
    with pytest.raises(mil.ModelFormatError, match=r"metadata.json: not valid JSON"):
        mil.load(d)
    (d / "metadata.json").unlink()
    (d / "model.mil").write_bytes(b"program(1.3) \xff")
    with pytest.raises(mil.ModelFormatError, match=r"model.mil: not UTF-8"):
        mil.load(d)
    (d / "model.mil").unlink()
    with pytest.raises(mil.ModelFormatError, match="not a compiled model"):
        mil.load(d)


@pytest.mark.slow  # two lm-eval runs (~1 min); the bit-identical logits above are checked in every run
def test_compiled_only_directory_runs_like_the_packages(demo_dir, tmp_path):
    """`ane-eval run` on a directory of .mlmodelc parts only: the same metrics and per-request responses as on the
    packages (`pytest evals --model-dir` on such a directory was run too; see the README)."""
    from ane_eval.cli import main

    compiled = compile_directory(demo_dir, tmp_path / "compiled")
    runs = {}
    for name, d in (("packages", demo_dir), ("compiled", compiled)):
        out = tmp_path / name
        assert main(["run", "--model", str(d), "--tasks", "demo_boolq,demo_wikitext", "--limit", "6",
                     "--output-dir", str(out), "--log-samples"]) == 0
        result = json.loads(next(out.rglob("results_*.json")).read_text())
        samples = {p.name.split("_20")[0]: [(s["doc_id"], s["resps"])
                                             for s in map(json.loads, p.read_text().splitlines())]
                   for p in out.rglob("samples_*.jsonl")}
        runs[name] = (result["results"], samples)
    assert runs["compiled"] == runs["packages"]
    assert runs["compiled"][0]["demo_boolq"]["acc,none"] > 0.5


def test_flexible_input_with_ranges(tmp_path):
    meta = json.loads(json.dumps(METADATA))
    entry = meta[0]["functions"][0]["inputSchema"][0]
    del entry["enumeratedShapes"]
    entry["shapeRange"] = "[[1, 1], [1, -1]]"
    d = compiled_dir(tmp_path / "ranges.mlmodelc", IOS18, {"W": np.zeros((4, 4), np.float16)}, meta)
    main = mil.load(d, function_name="main")
    assert main.input_description[0].ranges == ((1, 1), (1, -1))
    assert main.predict({"ids": np.ones((1, 7), np.int32)})["doubled"].shape == (1, 7)
    with pytest.raises(mil.InputError, match=r"expects \(1\.\.1, 1\.\.inf\) int32"):
        main.predict({"ids": np.ones((2, 7), np.int32)})
