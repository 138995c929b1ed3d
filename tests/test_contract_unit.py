"""contract.py on hand-built interfaces (milliseconds each; the demo-model tests cover the same checks end to end
but take seconds): check_inputs with each Boundary, cross_check's refusals, expected_geometry/expected_interface
from config.json and meta.yaml. The Part/Signature/Feature structures are the ones frontends.describe returns
(ane_eval/mil/ir.py), and Bundle/Layout are the real dataclasses (bundle.py, meta.py)."""
import json
from pathlib import Path

import numpy as np
import pytest

from ane_eval import contract
from ane_eval.bundle import Bundle
from ane_eval.contract import COREML, NATIVE, WIDE, ContractError, Part
from ane_eval.meta import Layout
from ane_eval.mil.ir import Feature, Signature

C, B, H, V = 16, 4, 8, 32
STATE = (2, 1, C, 4)


def F(name, dtype, shape, shapes=(), ranges=()):
    return Feature(name, dtype, tuple(shape), tuple(shapes), tuple(ranges))


def chunk_sig(T, rows=1, c=C, h=H, state=STATE, extra=()):
    return Signature(
        inputs=(F("hidden_states", "fp16", (1, T, h)), F("position_ids", "int32", (T,)),
                F("causal_mask", "fp16", (1, 1, T, c)), F("current_pos", "int32", (1,)), *extra),
        outputs=(F("output_hidden_states", "fp16", (1, rows, h)),),
        states=(F(contract.STATE_NAME, "fp16", state),))


def chunk(name="m_FFN_PF_chunk_01of01.mlpackage", md=None, **kw):
    return Part(Path(name), {"infer": chunk_sig(1, **kw), "prefill": chunk_sig(B, **kw)}, md or {}, "infer")


def embeddings(md=None, batches=(1, B)):
    sig = Signature(inputs=(F("input_ids", "int32", (1, 1), shapes=[(1, b) for b in batches]),),
                    outputs=(F("hidden_states", "fp16", ()),), states=())
    return Part(Path("m_embeddings.mlpackage"), {"main": sig}, md or {}, "main")


def head(outputs=None, h=H, md=None):
    outs = outputs if outputs is not None else (F("logits1", "fp16", (1, 1, V // 2)), F("logits2", "fp16", (1, 1, V // 2)))
    sig = Signature(inputs=(F("hidden_states", "fp16", (1, 1, h)),), outputs=tuple(outs), states=())
    return Part(Path("m_lm_head.mlpackage"), {"main": sig}, md or {}, "main")


def bundle(root=Path("/models/m"), meta=None, **layout):
    meta = {"context_length": C, "batch_size": B, "split_lm_head": 2} if meta is None else meta
    return Bundle(root=root, embeddings=Path("e"), chunks=[Path("c1")], lm_head=Path("h"), tokenizer_dir=root,
                  meta=meta, layout=Layout(**layout))


def parts(**over):
    p = {"embeddings": embeddings(), "chunk01": chunk(), "lm_head": head()}
    p.update(over)
    return p


def refusal(b, p, tokens=V, width=None) -> str:
    with pytest.raises(ContractError) as e:
        contract.cross_check(b, p, tokens, embeddings_width=width)
    msg = str(e.value)
    assert msg.startswith(f"{b.root}: ") and "\n" not in msg
    return msg


# --- check_inputs ------------------------------------------------------------------------------------------------
SIG = Signature(inputs=(F("hidden_states", "fp16", (1, 2, 3)), F("current_pos", "int32", (1,))), outputs=(), states=())


def good(dtype=np.float16):
    return {"hidden_states": np.zeros((1, 2, 3), dtype), "current_pos": np.zeros(1, np.int32)}


def check(inputs, boundary=NATIVE, hints=None, sig=SIG):
    contract.check_inputs("part fn", sig, inputs, hints, boundary=boundary)


def refused(inputs, boundary=NATIVE, hints=None, sig=SIG) -> str:
    with pytest.raises(ContractError) as e:
        check(inputs, boundary, hints, sig)
    return str(e.value)


def test_check_inputs_accepts_the_declared_interface():
    check(good())
    check(good(np.float32), WIDE)
    check(good(np.float32), COREML)  # coremltools hands fp16 across as float32
    check(good(np.float16), COREML)


def test_check_inputs_names_missing_and_undeclared():
    inputs = good()
    del inputs["current_pos"]
    assert refused(inputs) == ("part fn: inputs ['hidden_states'] do not match the declared "
                               "['hidden_states', 'current_pos'] (missing ['current_pos'])")
    assert refused({**good(), "zz": 1, "aa": 2}) == (
        "part fn: inputs ['aa', 'current_pos', 'hidden_states', 'zz'] do not match the declared "
        "['hidden_states', 'current_pos'] (undeclared ['aa', 'zz'])")


def test_check_inputs_refuses_wrong_dtype_shape_and_type_with_the_hint():
    assert refused(good(np.float32)) == "part fn expects hidden_states (1, 2, 3) fp16, got (1, 2, 3) float32"
    assert refused({**good(), "current_pos": np.zeros(1, np.int64)}, COREML) == \
        "part fn expects current_pos (1,) int32, got (1,) int64"
    assert refused({**good(), "current_pos": np.zeros(1, np.float16)}, WIDE).endswith("got (1,) float16")
    assert refused({**good(), "hidden_states": np.zeros((1, 3, 3), np.float16)},
                   hints={"hidden_states": "pad it"}) == \
        "part fn expects hidden_states (1, 2, 3) fp16, got (1, 3, 3) float16; pad it"
    assert refused({**good(), "current_pos": [0]}, hints={"hidden_states": "pad it"}) == \
        "part fn expects current_pos (1,) int32, got list"


def test_check_inputs_refuses_float32_that_is_not_fp16_on_exact_boundaries():
    v = good(np.float32)
    v["hidden_states"][0, 0, 0] = 1 + 2 ** -12  # between two fp16 values
    msg = refused(v, COREML)
    assert msg.startswith("part fn: hidden_states holds values that are not fp16;") and "astype(np.float16)" in msg
    check(v, WIDE)  # the fp32 reference never rounds
    v["hidden_states"][0, 0, 0] = np.nan  # nan and overflow-free values survive the round trip
    v["hidden_states"][0, 0, 1] = -np.inf
    check(v, COREML)
    v["hidden_states"][0, 0, 2] = 1e6  # past fp16's range: rounds to inf
    assert "not fp16" in refused(v, COREML)


def test_check_inputs_enumerated_and_ranged_shapes():
    sig = Signature(inputs=(F("input_ids", "int32", (1, 1), shapes=[(1, 1), (1, 4)]),
                            F("x", "fp32", (1,), ranges=[(1, 3)])), outputs=(), states=())
    check({"input_ids": np.zeros((1, 4), np.int32), "x": np.zeros(3, np.float32)}, sig=sig)
    assert refused({"input_ids": np.zeros((1, 2), np.int32), "x": np.zeros(3, np.float32)}, sig=sig) == \
        "part fn expects input_ids (1, 1) or (1, 4) int32, got (1, 2) int32"
    assert refused({"input_ids": np.zeros((1, 1), np.int32), "x": np.zeros(4, np.float32)}, sig=sig) == \
        "part fn expects x (1..3) fp32, got (4,) float32"


def test_boundaries():
    assert NATIVE.fp16_dtypes == (np.float16,) and NATIVE.exact
    assert WIDE.fp16_dtypes == (np.float16, np.float32) and not WIDE.exact
    assert COREML.fp16_dtypes[0] is np.float32 and COREML.exact  # masks cross as float32 on CoreML (model.py)


# --- cross_check -------------------------------------------------------------------------------------------------
def test_cross_check_reads_the_geometry():
    g = contract.cross_check(bundle(), parts(), V, embeddings_width=H)
    assert (g.context_length, g.batch_size, g.hidden_size, g.state_shape, g.logits_widths, g.head) == \
        (C, B, H, STATE, [16, 16], "logits")
    assert (g.mask_width, g.functions, g.update_mask, g.monolithic) == (C, ("infer", "prefill"), False, False)
    assert g.states == {contract.STATE_NAME: STATE} and g.chunk_offsets == [0, 16]


def test_cross_check_without_meta_trusts_the_declarations():
    g = contract.cross_check(bundle(meta={}), parts(), V)
    assert (g.context_length, g.batch_size, g.logits_widths) == (C, B, [16, 16])


def test_cross_check_refusals_each_in_one_line():
    b = bundle()
    assert refusal(b, parts(chunk01=Part(Path("c.mlpackage"), {"infer": chunk_sig(1)}, {}, "infer"))).endswith(
        "c.mlpackage lacks function(s) ['prefill']; FFN chunks must declare infer, prefill")
    no_state = Signature(chunk_sig(1).inputs, chunk_sig(1).outputs, ())
    assert "lacks causal_mask, hidden_states or a KV-cache state" in refusal(
        b, parts(chunk01=Part(Path("c"), {"infer": no_state, "prefill": chunk_sig(B)}, {}, "infer")))
    assert "metadata com.anemll.chunk_no=2, but it is file 1 of 1" in refusal(
        b, parts(chunk01=chunk(md={"com.anemll.chunk_no": "2", "com.anemll.num_chunks": "1"})))
    assert "metadata com.anemll.num_chunks=3, but it is file 1 of 1" in refusal(
        b, parts(chunk01=chunk(md={"com.anemll.num_chunks": "3"})))
    assert f"metadata com.anemll.context_length=8 disagrees with its declared shapes [{C}]" in refusal(
        b, parts(chunk01=chunk(md={"com.anemll.context_length": "8"})))
    assert f"metadata com.anemll.batch_size=2 disagrees with its declared shapes [{B}]" in refusal(
        b, parts(chunk01=chunk(md={"com.anemll.batch_size": "2"})))
    assert f"meta.yaml context_length is 32 but the model was compiled for {C} (causal_mask last dim)" in refusal(
        bundle(meta={"context_length": 32, "batch_size": B, "split_lm_head": 2}), parts())
    assert f"meta.yaml batch_size is 8 but the model was compiled with prefill batch {B}" in refusal(
        bundle(meta={"context_length": C, "batch_size": 8, "split_lm_head": 2}), parts())
    assert f"accepts input_ids of (1, 1) or (1, 2) int32, not the prefill batch (1, {B})" in refusal(
        b, parts(embeddings=embeddings(batches=(1, 2))))
    assert f"m_embeddings.mlpackage: metadata com.anemll.context_length=8, chunks say {C}" in refusal(
        b, parts(embeddings=embeddings(md={"com.anemll.context_length": "8"})))
    assert f"the LM head covers {V} token ids but the tokenizer has {V + 1}" in refusal(b, parts(), tokens=V + 1)
    assert f"parts disagree on the hidden size: [{H}, {H + 1}]" in refusal(b, parts(), width=H + 1)
    assert f"parts disagree on the hidden size: [{H}, {H * 2}]" in refusal(b, parts(lm_head=head(h=2 * H)))


def test_cross_check_compares_chunks():
    b = bundle(meta={"context_length": C, "batch_size": B, "split_lm_head": 2})
    b.chunks = [Path("c1"), Path("c2")]
    two = parts(chunk01=chunk("c1"), chunk02=chunk("c2", c=2 * C, state=(2, 1, 2 * C, 4)))
    msg = refusal(b, two)
    assert f"chunks declare different context lengths (causal_mask last dim): [{C}, {2 * C}]" in msg
    assert "chunks declare different KV-cache states: c1:infer" in msg
    batch = Part(Path("c2"), {"infer": chunk_sig(1), "prefill": chunk_sig(2 * B)}, {}, "infer")
    assert f"chunks declare different prefill batches (hidden_states dim 1): [{B}, {2 * B}]" in refusal(
        b, parts(chunk01=chunk("c1"), chunk02=batch))
    g = contract.cross_check(b, parts(chunk01=chunk("c1", md={"com.anemll.chunk_no": "1"}),
                                      chunk02=chunk("c2", md={"com.anemll.chunk_no": "2", "com.anemll.num_chunks": "2"})), V)
    assert g.context_length == C


def test_cross_check_needs_sizes():
    b = bundle(meta={})
    p = {"embeddings": embeddings(), "chunk01": None, "lm_head": head()}
    assert refusal(b, p).endswith("cannot tell the context length and prefill batch (no meta.yaml values and no "
                                  "readable declarations); add them to meta.yaml")


def test_cross_check_logits_head_refusals():
    b = bundle()
    swapped = (F("logits2", "fp16", (1, 1, 16)), F("logits1", "fp16", (1, 1, 16)))
    assert "m_lm_head.mlpackage outputs ['logits2', 'logits1']; expected logits1..logitsK" in refusal(
        b, parts(lm_head=head(swapped)))
    one = (F("logits1", "fp16", (1, 1, V)),)
    assert "meta.yaml split_lm_head is 2 but m_lm_head.mlpackage has 1 logits outputs" in refusal(
        b, parts(lm_head=head(one)))
    assert "meta.yaml lm_head_chunk_sizes is [20, 12] but m_lm_head.mlpackage returns logits of widths [16, 16]" in \
        refusal(bundle(lm_head_chunk_sizes=(20, 12)), parts())
    assert "meta.yaml vocab_size is 40 but m_lm_head.mlpackage returns 32 logits" in refusal(
        bundle(vocab_size=40), parts(), tokens=1)
    assert "meta.yaml says argmax_in_model but m_lm_head.mlpackage returns ['logits1', 'logits2'], not " \
           "argmax_idx/argmax_val" in refusal(bundle(argmax_in_model=True, vocab_size=V), parts())
    g = contract.cross_check(bundle(lm_head_chunk_sizes=(16, 16), vocab_size=V), parts(), V)
    assert g.logits_widths == [16, 16]
    shapeless = (F("logits1", "fp16", ()), F("logits2", "fp16", (1, 1, V)))
    assert contract.cross_check(b, parts(lm_head=head(shapeless)), V).logits_widths == [0, V]


def argmax_head(k=2, idx_dtype="int32", val_shape=None, md=None, extra=()):
    return head((F("argmax_idx", idx_dtype, (k,)), F("argmax_val", "fp16", val_shape or (k,)), *extra), md=md)


def test_cross_check_argmax_head():
    g = contract.cross_check(bundle(argmax_in_model=True, vocab_size=33), parts(lm_head=argmax_head()), 33)
    assert (g.head, g.logits_widths) == ("argmax", [17, 16])
    g = contract.cross_check(bundle(argmax_in_model=True, lm_head_chunk_sizes=(20, 13)), parts(lm_head=argmax_head()), 33)
    assert g.logits_widths == [20, 13]
    md = {"com.anemll.lm_head_chunk_sizes": "10,22"}
    assert contract.cross_check(bundle(argmax_in_model=True), parts(lm_head=argmax_head(md=md)), V).logits_widths == [10, 22]
    md = {"com.anemll.vocab_size": "32"}
    assert contract.cross_check(bundle(), parts(lm_head=argmax_head(md=md)), V).logits_widths == [16, 16]


def test_cross_check_argmax_head_refusals():
    b = bundle(argmax_in_model=True, vocab_size=V)
    assert "m_lm_head.mlpackage outputs ['argmax_idx']; an argmax head returns exactly argmax_idx and argmax_val" in \
        refusal(b, parts(lm_head=head((F("argmax_idx", "int32", (2,)),))))
    assert "an argmax head returns exactly" in refusal(
        b, parts(lm_head=argmax_head(extra=(F("logits1", "fp16", (1, 1, 2)),))))
    assert "returns argmax_idx (2,) int64 and argmax_val (2,) fp16; expected int32 [N] and fp16 [N]" in refusal(
        b, parts(lm_head=argmax_head(idx_dtype="int64")))
    assert "returns argmax_idx (2,) int32 and argmax_val (3,) fp16" in refusal(
        b, parts(lm_head=argmax_head(val_shape=(3,))))
    assert "meta.yaml split_lm_head is 2 but m_lm_head.mlpackage returns 4 argmax pairs" in refusal(
        bundle(argmax_in_model=True, vocab_size=V), parts(lm_head=argmax_head(k=4)))
    assert "lm_head_chunk_sizes has 3 entries but m_lm_head.mlpackage returns 2 argmax pairs" in refusal(
        bundle(argmax_in_model=True, lm_head_chunk_sizes=(10, 10, 12)), parts(lm_head=argmax_head()))
    assert "lm_head_chunk_sizes sum to 30 but vocab_size is 32" in refusal(
        bundle(argmax_in_model=True, lm_head_chunk_sizes=(10, 20), vocab_size=V), parts(lm_head=argmax_head()), 30)
    assert "neither meta.yaml nor its metadata gives lm_head_chunk_sizes or vocab_size" in refusal(
        bundle(argmax_in_model=True), parts(lm_head=argmax_head()))
    assert "com.anemll.vocab_size" in refusal(
        bundle(argmax_in_model=True), parts(lm_head=argmax_head(md={"com.anemll.vocab_size": "many"})))
    # a compiled head without meta.yaml's split_lm_head: no vocabulary chunks to map
    assert refusal(bundle(meta={}, argmax_in_model=True, vocab_size=V), parts(lm_head=None)).endswith(
        "the LM head is an argmax head with no vocabulary chunks (split_lm_head missing or 0)")


def test_cross_check_compiled_head_trusts_meta_yaml():
    g = contract.cross_check(bundle(lm_head_chunk_sizes=(16, 16)), parts(lm_head=None), V, embeddings_width=H)
    assert (g.head, g.logits_widths, g.hidden_size) == ("logits", [16, 16], H)
    g = contract.cross_check(bundle(argmax_in_model=True, vocab_size=V), parts(lm_head=None), V)
    assert (g.head, g.logits_widths) == ("argmax", [16, 16])
    assert contract.cross_check(bundle(), parts(lm_head=None), V).logits_widths == []


def mono_sig(T, extra_out=()):
    return Signature(inputs=(F("input_ids", "int32", (1, T)), F("position_ids", "int32", (T,)),
                             F("causal_mask", "fp16", (1, 1, T, C)), F("current_pos", "int32", (1,))),
                     outputs=(F("logits1", "fp16", (1, 1, 16)), F("logits2", "fp16", (1, 1, 16)), *extra_out),
                     states=(F(contract.STATE_NAME, "fp16", STATE),))


def test_cross_check_monolithic():
    b = bundle(model_type="monolithic")
    b.monolithic = Path("m_monolithic.mlpackage")
    mono = Part(Path("m_monolithic.mlpackage"), {"infer": mono_sig(1), "prefill": mono_sig(B)}, {}, "infer")
    g = contract.cross_check(b, {contract.MONOLITHIC: mono}, V)
    assert (g.monolithic, g.context_length, g.batch_size, g.logits_widths, g.hidden_size) == (True, C, B, [16, 16], 0)
    assert contract.part_paths(b) == {contract.MONOLITHIC: b.monolithic}
    lacking = Part(Path("mono"), {"infer": mono_sig(1)}, {}, "infer")
    assert "mono lacks function(s) ['prefill']; a monolithic model must declare infer, prefill" in refusal(
        b, {contract.MONOLITHIC: lacking})


def test_cross_check_update_mask_and_rotate_functions():
    um = (F("update_mask", "fp16", (1, 1, C, B)),)
    p = Part(Path("c"), {"infer": chunk_sig(1), "prefill": chunk_sig(B, extra=um)}, {}, "infer")
    assert contract.cross_check(bundle(), parts(chunk01=p), V).update_mask
    b = bundle(sliding_window=8)
    assert "lacks function(s) ['infer_rotate', 'prefill_rotate']" in refusal(b, parts())
    rot = Part(Path("c_rot"), {"infer_rotate": chunk_sig(1), "prefill_rotate": chunk_sig(B)}, {}, "infer_rotate")
    g = contract.cross_check(b, parts(chunk01_rot=rot), V)
    assert g.functions == ("infer", "infer_rotate", "prefill", "prefill_rotate")
    b.rotate_chunks = [Path("c1_rot")]
    assert list(contract.part_paths(b)) == ["embeddings", "chunk01", "chunk01_rot", "lm_head"]
    assert contract.chunks_of(parts(chunk01_rot=rot)) == [parts()["chunk01"]]
    assert contract.rotate_chunks_of(parts(chunk01_rot=rot)) == [rot]


def test_cross_check_attention_size():
    b = bundle(meta={"context_length": 2 * C, "batch_size": B, "split_lm_head": 2}, attention_size=C)
    g = contract.cross_check(b, parts(), V)
    assert (g.context_length, g.mask_width) == (2 * C, C)
    b = bundle(meta={"context_length": C, "batch_size": B, "split_lm_head": 2}, attention_size=2 * C)
    assert f"meta.yaml attention_size is {2 * C} but the model was compiled for {C}" in refusal(b, parts())


# --- helpers, config.json, expected_geometry / expected_interface ------------------------------------------------
def test_even_split_and_rotate_functions():
    assert contract.even_split(10, 3) == [4, 3, 3] and contract.even_split(9, 3) == [3, 3, 3]
    assert contract.expected_rotate_functions(Layout(sliding_window=8), 16) == ("infer_rotate", "prefill_rotate")
    assert contract.expected_rotate_functions(Layout(sliding_window=16), 16) == ()
    assert contract.expected_rotate_functions(Layout(sliding_window=8, single_cache=True), 16) == ()
    assert contract.expected_rotate_functions(Layout(sliding_window=8), None) == ()
    assert contract.expected_rotate_functions(Layout(), 16) == ()


def test_model_config(tmp_path):
    b = bundle(root=tmp_path)
    assert contract.model_config(b) == {}
    cfg = tmp_path / "config.json"
    cfg.write_text('{"hidden_size": 8}')
    assert contract.model_config(b) == {"hidden_size": 8}
    for text, want in (("{nope", f"{cfg}: not valid JSON ("), ("[1]", f"{cfg}: expected a JSON object"),
                       (b"\xff\xfe", f"{cfg}: not valid JSON (")):
        cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ContractError, match="^" + __import__("re").escape(want)):
            contract.model_config(b)
    cfg.write_bytes(b" " * (contract.MAX_CONFIG_BYTES + 1))
    with pytest.raises(ContractError, match=f"{contract.MAX_CONFIG_BYTES + 1} bytes, not a config.json"):
        contract.model_config(b)
    cfg.write_bytes(b" " * (contract.MAX_CONFIG_BYTES - 2) + b"{}")
    assert contract.model_config(b) == {}


def test_sliding_layers():
    types = ["sliding_attention"] * 5 + ["full_attention"]
    assert contract.sliding_layers({"layer_types": types}, 6) == 5
    assert contract.sliding_layers({"layer_types": types, "sliding_window_pattern": 2}, 7) == 4  # wrong length
    assert contract.sliding_layers({"layer_types": ["other"] * 6}, 6) is None
    assert contract.sliding_layers({"sliding_window_pattern": 3}, 6) == 4
    assert contract.sliding_layers({"sliding_window_pattern": 3}, None) is None
    assert contract.sliding_layers({"sliding_window_pattern": True}, 6) is None
    assert contract.sliding_layers({}, 6) is None


def write_config(tmp_path, **cfg):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return bundle(root=tmp_path)


def test_expected_geometry(tmp_path):
    b = write_config(tmp_path, hidden_size=H, vocab_size=33, num_hidden_layers=3, num_attention_heads=2,
                     num_key_value_heads=1)
    g, unknown = contract.expected_geometry(b)
    assert unknown == []
    assert (g.context_length, g.batch_size, g.hidden_size, g.state_shape) == (C, B, H, (6, 1, C, 4))
    assert (g.logits_widths, g.head, g.mask_width, g.functions, g.update_mask) == \
        ([17, 16], "logits", C, ("infer", "prefill"), False)
    b.meta["state_length"] = 2 * C
    assert contract.expected_geometry(b)[0].state_shape == (6, 1, 2 * C, 4)
    b = write_config(tmp_path, hidden_size=H, num_hidden_layers=3, num_attention_heads=3, head_dim=5, vocab_size=0)
    g, unknown = contract.expected_geometry(b)
    assert g.state_shape == (6, 3, C, 5) and unknown == ["config.json vocab_size"] and g.logits_widths == [None, None]
    b = write_config(tmp_path, hidden_size=H, num_attention_heads=3)  # H not divisible: no head_dim
    g, unknown = contract.expected_geometry(b)
    assert "config.json head_dim" in unknown and "config.json num_hidden_layers" in unknown and g.state_shape is None
    b = bundle(root=tmp_path / "none", meta={}, vocab_size=V, lm_head_chunk_sizes=(20, 12), argmax_in_model=True,
               attention_size=8, update_mask_prefill=True)
    g, unknown = contract.expected_geometry(b)
    assert (g.context_length, g.logits_widths, g.head, g.mask_width, g.update_mask) == (None, [20, 12], "argmax", 8, True)
    assert unknown[:2] == ["meta.yaml context_length", "meta.yaml batch_size"] and "meta.yaml split_lm_head" in unknown
    assert g.states == {contract.STATE_NAME: None}


def test_expected_geometry_split_cache(tmp_path):
    types = ["sliding_attention", "sliding_attention", "full_attention"]
    (tmp_path / "config.json").write_text(json.dumps(dict(hidden_size=H, vocab_size=V, num_hidden_layers=3,
                                                          num_attention_heads=2, head_dim=4, layer_types=types)))
    b = bundle(root=tmp_path, sliding_window=8)
    g, unknown = contract.expected_geometry(b)
    assert unknown == [] and g.state_shape is None
    assert g.states == {"model_model_kv_cache_local": (4, 2, 8, 4), "model_model_kv_cache_global": (2, 2, C, 4)}
    assert g.functions == ("infer", "prefill", "infer_rotate", "prefill_rotate")
    (tmp_path / "config.json").write_text(json.dumps(dict(hidden_size=H, num_hidden_layers=3, num_attention_heads=2)))
    g, unknown = contract.expected_geometry(b)
    assert "config.json layer_types" in unknown and set(g.states.values()) == {None}
    assert contract.expected_geometry(bundle(root=tmp_path, sliding_window=8, single_cache=True))[0].states == \
        {contract.STATE_NAME: (6, 2, C, 4)}


def geometry(**kw):
    base = dict(context_length=C, batch_size=B, hidden_size=H, state_shape=STATE, logits_widths=[16, 16])
    return contract.Geometry(**{**base, **kw})


def test_expected_interface_matches_a_consistent_declaration():
    exp = contract.expected_interface(geometry(), 1)
    declared = contract.declared_interface(parts())
    assert {k: v for k, v in exp.items() if v[0] is not None} == \
        {k: declared[k] for k, v in exp.items() if v[0] is not None}
    assert exp[("embeddings", "main", "inputs", "input_ids")] == (((1, 1), (1, B)), "int32")
    assert exp[("embeddings", "main", "outputs", "hidden_states")] == (None, "fp16")
    assert declared[("embeddings", "main", "outputs", "hidden_states")] == (None, "fp16")
    assert set(exp) == set(declared)


def test_expected_interface_chunks_and_update_mask():
    exp = contract.expected_interface(geometry(update_mask=True, mask_width=8), 2)
    assert exp[("chunk01", "prefill", "outputs", "output_hidden_states")] == ((1, B, H), "fp16")
    assert exp[("chunk02", "prefill", "outputs", "output_hidden_states")] == ((1, 1, H), "fp16")
    assert exp[("chunk02", "infer", "inputs", "causal_mask")] == ((1, 1, 1, 8), "fp16")
    assert exp[("chunk01", "prefill", "inputs", "update_mask")] == ((1, 1, 8, B), "fp16")
    assert ("chunk01", "infer", "inputs", "update_mask") not in exp
    assert exp[("chunk01", "infer", "states", contract.STATE_NAME)] == (STATE, "fp16")
    exp = contract.expected_interface(geometry(batch_size=None, hidden_size=None, logits_widths=[None]), 1)
    assert exp[("embeddings", "main", "inputs", "input_ids")] == (None, "int32")
    assert exp[("chunk01", "prefill", "inputs", "hidden_states")] == (None, "fp16")
    assert exp[("lm_head", "main", "outputs", "logits1")] == (None, "fp16")
    assert exp[("chunk01", "infer", "inputs", "position_ids")] == ((1,), "int32")


def test_expected_interface_argmax_and_monolithic():
    exp = contract.expected_interface(geometry(head="argmax", logits_widths=[10, 11, 11]), 1)
    assert exp[("lm_head", "main", "outputs", "argmax_idx")] == ((3,), "int32")
    assert exp[("lm_head", "main", "outputs", "argmax_val")] == ((3,), "fp16")
    assert not any(k[3].startswith("logits") for k in exp)
    exp = contract.expected_interface(geometry(monolithic=True, head="argmax"), 0)
    M = contract.MONOLITHIC
    assert exp[(M, "infer", "outputs", "argmax_idx")] == ((2,), "int32")
    assert exp[(M, "prefill", "outputs", "logits2")] == ((1, 1, 16), "fp16")
    assert exp[(M, "prefill", "inputs", "input_ids")] == ((1, B), "int32")
    assert exp[(M, "prefill", "inputs", "causal_mask")] == ((1, 1, B, C), "fp16")
    assert exp[(M, "infer", "inputs", "position_ids")] == ((1,), "int32")
    assert exp[(M, "infer", "states", contract.STATE_NAME)] == (STATE, "fp16")
    assert not any(k[0] != M for k in exp)
    mono = Part(Path("m"), {"infer": mono_sig(1), "prefill": mono_sig(B)}, {}, "infer")
    declared = contract.declared_interface({M: mono, "lm_head": None})
    assert declared[(M, "prefill", "inputs", "input_ids")] == ((1, B), "int32")


def test_part_accessors():
    p = chunk()
    assert p.name == "m_FFN_PF_chunk_01of01.mlpackage"
    assert p.signature() is p.functions["infer"] and p.signature("prefill") is p.functions["prefill"]
    assert p.feature("prefill", "inputs", "hidden_states").shape == (1, B, H)
    assert p.feature(None, "states", contract.STATE_NAME).shape == STATE
    assert p.feature(None, "inputs", "nope") is None


# --- pinned down by mutation testing (each kills a mutant the tests above let live) -----------------------------
def test_check_inputs_full_fp16_message():
    v = good(np.float32)
    v["hidden_states"][0, 0, 0] = 1 + 2 ** -12
    assert refused(v, COREML) == ("part fn: hidden_states holds values that are not fp16; the model would round "
                                  "them, so what runs is not what was fed: round to fp16 first (.astype(np.float16))")


def two_chunks(c1, c2, meta=None, **layout):
    b = bundle(meta=meta, **layout)
    b.chunks = [Path("c1"), Path("c2")]
    return b, parts(chunk01=c1, chunk02=c2)


def test_cross_check_reports_every_chunk():
    lacking = lambda name: Part(Path(name), {"infer": chunk_sig(1)}, {}, "infer")  # noqa: E731
    msg = refusal(*two_chunks(lacking("c1"), lacking("c2")))
    assert "c1 lacks function(s)" in msg and "c2 lacks function(s)" in msg
    no_state = lambda name: Part(Path(name), {"infer": chunk_sig(1), "prefill": Signature(  # noqa: E731
        chunk_sig(B).inputs, chunk_sig(B).outputs, ())}, {}, "infer")
    msg = refusal(*two_chunks(no_state("c1"), no_state("c2")))
    assert "c1 prefill lacks causal_mask, hidden_states or a KV-cache state" in msg and "c2 prefill lacks" in msg
    no_mask = Signature(tuple(f for f in chunk_sig(1).inputs if f.name != "causal_mask"), chunk_sig(1).outputs,
                        chunk_sig(1).states)
    assert "c infer lacks causal_mask" in refusal(
        bundle(), parts(chunk01=Part(Path("c"), {"infer": no_mask, "prefill": chunk_sig(B)}, {}, "infer")))
    other = Part(Path("c2"), {"infer": chunk_sig(1, state=(2, 1, C, 8)), "prefill": chunk_sig(B, state=(2, 1, C, 8))},
                 {}, "infer")
    msg = refusal(*two_chunks(chunk("c1"), other))
    assert f"chunks declare different KV-cache states: c1:infer (('{contract.STATE_NAME}', {STATE}),), c1:prefill" in msg


def test_cross_check_problems_are_joined_in_one_line():
    msg = refusal(bundle(meta={"context_length": 32, "batch_size": 8, "split_lm_head": 2}), parts())
    assert msg == (f"/models/m: inconsistent model: meta.yaml context_length is 32 but the model was compiled for {C} "
                   f"(causal_mask last dim); fix meta.yaml or re-convert; meta.yaml batch_size is 8 but the model was "
                   f"compiled with prefill batch {B}; fix meta.yaml or re-convert")
    assert refusal(bundle(), parts(), tokens=V + 1).endswith(
        f"the LM head covers {V} token ids but the tokenizer has {V + 1}; some tokens could never be scored")


def test_cross_check_each_function_declares_its_own_shapes():
    wide = Part(Path("c"), {"infer": chunk_sig(1), "prefill": chunk_sig(B, c=2 * C)}, {}, "infer")
    assert f"different context lengths (causal_mask last dim): [{C}, {2 * C}]" in refusal(bundle(meta={}), parts(chunk01=wide))
    um = (F("update_mask", "fp16", (1, 1, C, B)),)
    with_rot = Part(Path("c"), {"infer": chunk_sig(1), "prefill": chunk_sig(B, extra=um),
                                "infer_rotate": chunk_sig(1), "prefill_rotate": chunk_sig(B)}, {}, "infer")
    g = contract.cross_check(bundle(), parts(chunk01=with_rot), V)
    assert g.update_mask and g.functions == ("infer", "infer_rotate", "prefill", "prefill_rotate")
    b, p = two_chunks(with_rot, chunk("c2"))
    assert contract.cross_check(b, p, V).functions == ("infer", "infer_rotate", "prefill", "prefill_rotate")


def test_cross_check_rotate_companions_pair_with_their_chunk():
    rot = Part(Path("c2_rot"), {"infer_rotate": chunk_sig(1), "prefill_rotate": chunk_sig(B)}, {}, "infer_rotate")
    b, p = two_chunks(chunk("c1"), chunk("c2"), sliding_window=8)
    p.update(chunk01_rot=None, chunk02_rot=rot)
    msg = refusal(b, p)
    assert "c1 lacks function(s) ['infer_rotate', 'prefill_rotate']" in msg and "c2 lacks" not in msg


def test_cross_check_falls_back_to_meta_yaml_without_declarations():
    g = contract.cross_check(bundle(), {"embeddings": embeddings(), "chunk01": None, "lm_head": head()}, V)
    assert (g.context_length, g.batch_size, g.mask_width, g.state_shape, g.states) == (C, B, C, None, {})
    g = contract.cross_check(bundle(attention_size=8), {"embeddings": embeddings(), "chunk01": None, "lm_head": head()}, V)
    assert (g.context_length, g.mask_width) == (C, 8)
    b, p = two_chunks(None, chunk("c2"), meta={})
    assert contract.cross_check(b, p, V).context_length == C  # a compiled first chunk: the second one tells
    only_b = {"batch_size": B, "split_lm_head": 2}
    assert contract.cross_check(bundle(meta=only_b, attention_size=C), parts(), V).context_length == C
    assert refusal(bundle(meta=only_b), {"embeddings": embeddings(), "chunk01": None, "lm_head": head()}
                   ).endswith("cannot tell the context length and prefill batch (no meta.yaml values and no readable "
                              "declarations); add them to meta.yaml")


def test_cross_check_embeddings_without_input_ids_is_not_a_crash():
    odd = Part(Path("e"), {"main": Signature((F("ids", "int32", (1, 1)),), (), ())}, {}, "main")
    assert contract.cross_check(bundle(), parts(embeddings=odd), V).batch_size == B
    flat = Part(Path("e"), {"main": Signature((F("input_ids", "int32", (1, B)),), (), ())}, {}, "main")
    assert contract.cross_check(bundle(), parts(embeddings=flat), V).batch_size == B


def test_cross_check_state_shape_prefers_the_unified_cache():
    local, glob = F("model_model_kv_cache_local", "fp16", (2, 1, 8, 4)), F(contract.STATE_NAME, "fp16", STATE)
    sig = lambda T, states: Signature(chunk_sig(T).inputs, chunk_sig(T).outputs, states)  # noqa: E731
    both = Part(Path("c"), {"infer": sig(1, (local, glob)), "prefill": sig(B, (local, glob))}, {}, "infer")
    assert contract.cross_check(bundle(), parts(chunk01=both), V).state_shape == STATE
    only = Part(Path("c"), {"infer": sig(1, (local,)), "prefill": sig(B, (local,))}, {}, "infer")
    assert contract.cross_check(bundle(), parts(chunk01=only), V).state_shape == (2, 1, 8, 4)


def test_cross_check_monolithic_head_is_its_infer_function():
    b = bundle(model_type="monolithic", argmax_in_model=True, vocab_size=V)
    b.monolithic = Path("mono")
    am = (F("argmax_idx", "int32", (2,)), F("argmax_val", "fp16", (2,)))
    infer = Signature(mono_sig(1).inputs, am, mono_sig(1).states)
    mono = Part(Path("mono"), {"infer": infer, "prefill": mono_sig(B)}, {}, "prefill")  # its default: prefill
    assert contract.cross_check(b, {contract.MONOLITHIC: mono}, V).head == "argmax"
    bad = Signature(mono_sig(1).inputs, (F("logits2", "fp16", (1, 1, V)),), mono_sig(1).states)
    mono = Part(Path("mono"), {"infer": bad, "prefill": mono_sig(B)}, {}, "prefill")
    assert "mono infer outputs ['logits2']; expected logits1..logitsK" in refusal(
        bundle(model_type="monolithic"), {contract.MONOLITHIC: mono})


def test_cross_check_argmax_head_edges():
    b = bundle(argmax_in_model=True, vocab_size=V)
    assert "outputs ['argmax_val']; an argmax head returns exactly" in refusal(
        b, parts(lm_head=head((F("argmax_val", "fp16", (2,)),))))
    assert "returns argmax_idx () int32 and argmax_val (2,) fp16" in refusal(
        b, parts(lm_head=head((F("argmax_idx", "int32", ()), F("argmax_val", "fp16", (2,))))))
    one = bundle(meta={"context_length": C, "batch_size": B, "split_lm_head": 1}, argmax_in_model=True, vocab_size=V)
    assert contract.cross_check(one, parts(lm_head=argmax_head(k=1)), V).logits_widths == [V]
    for key, value, want in (("com.anemll.lm_head_chunk_sizes", "x", "com.anemll.lm_head_chunk_sizes must be"),
                             ("com.anemll.vocab_size", "x", "com.anemll.vocab_size must be")):
        msg = refusal(bundle(argmax_in_model=True), parts(lm_head=argmax_head(md={key: value})))
        assert f"inconsistent model: m_lm_head.mlpackage: {want}" in msg


def test_part_paths_and_declared_interface_of_rotate_files():
    b = bundle()
    assert contract.part_paths(b) == {"embeddings": Path("e"), "chunk01": Path("c1"), "lm_head": Path("h")}
    rot = Part(Path("c_rot"), {"infer_rotate": chunk_sig(1)}, {}, "infer_rotate")
    declared = contract.declared_interface({"chunk01": None, "chunk01_rot": rot, "lm_head": head()})
    assert declared[("chunk01", "infer_rotate", "inputs", "hidden_states")] == ((1, 1, H), "fp16")
    assert declared[("lm_head", "main", "outputs", "logits1")] == ((1, 1, 16), "fp16")


def test_expected_interface_equals_a_consistent_declaration_everywhere():
    assert contract.expected_interface(geometry(), 1) == contract.declared_interface(parts())
    c1 = Part(Path("c1"), {"infer": chunk_sig(1), "prefill": chunk_sig(B, rows=B)}, {}, "infer")
    b, p = two_chunks(c1, chunk("c2"))
    assert contract.expected_interface(geometry(), 2) == contract.declared_interface(p)
    M = contract.MONOLITHIC
    mono = Part(Path("m"), {"infer": mono_sig(1), "prefill": mono_sig(B)}, {}, "infer")
    assert contract.expected_interface(geometry(monolithic=True), 0) == contract.declared_interface({M: mono})


def test_expected_interface_uses_the_split_states():
    states = {"model_model_kv_cache_local": (4, 1, 8, 4), "model_model_kv_cache_global": (2, 1, C, 4)}
    exp = contract.expected_interface(geometry(states=states, state_shape=None), 1)
    assert exp[("chunk01", "infer", "states", "model_model_kv_cache_local")] == ((4, 1, 8, 4), "fp16")
    assert ("chunk01", "infer", "states", contract.STATE_NAME) not in exp


def test_expected_geometry_sizes_are_integers(tmp_path):
    types = ["sliding_attention", "full_attention"]
    (tmp_path / "config.json").write_text(json.dumps(dict(hidden_size=H, vocab_size=V, num_hidden_layers=2,
                                                          num_attention_heads=2, layer_types=types)))
    g, _ = contract.expected_geometry(bundle(root=tmp_path, sliding_window=8))
    for shape in g.states.values():
        assert all(type(d) is int for d in shape), shape
    g, _ = contract.expected_geometry(bundle(root=tmp_path))
    assert all(type(d) is int for d in g.state_shape) and g.monolithic is False
    assert contract.expected_geometry(bundle(root=tmp_path, model_type="monolithic"))[0].monolithic is True
    g, unknown = contract.expected_geometry(bundle(root=tmp_path / "none", meta={}))
    assert g.logits_widths is None
    assert unknown == ["meta.yaml context_length", "meta.yaml batch_size", "config.json hidden_size", "config.json vocab_size",
                       "config.json num_hidden_layers", "config.json num_key_value_heads", "config.json head_dim",
                       "meta.yaml split_lm_head"]


def test_sliding_layers_pattern_counts_from_layer_one():
    assert contract.sliding_layers({"sliding_window_pattern": 4}, 6) == 5  # layer 4 global


def test_cross_check_names_each_function_and_output_problem():
    bare = lambda T: Signature(chunk_sig(T).inputs, chunk_sig(T).outputs, ())  # noqa: E731
    msg = refusal(bundle(), parts(chunk01=Part(Path("c"), {"infer": bare(1), "prefill": bare(B)}, {}, "infer")))
    assert "c infer lacks" in msg and "c prefill lacks" in msg
    assert "outputs ['argmax_idx', 'logits1']; an argmax head returns exactly" in refusal(
        bundle(argmax_in_model=True, vocab_size=V),
        parts(lm_head=head((F("argmax_idx", "int32", (2,)), F("logits1", "fp16", (1, 1, 2))))))


def test_cross_check_embeddings_batch_two():
    c = Part(Path("c"), {"infer": chunk_sig(1), "prefill": chunk_sig(2)}, {}, "infer")
    b = bundle(meta={"context_length": C, "batch_size": 2, "split_lm_head": 2})
    assert contract.cross_check(b, parts(chunk01=c, embeddings=embeddings(batches=(1, 2))), V).batch_size == 2
