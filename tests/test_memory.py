"""Resident memory: the estimate from the weight files equals what the portable runtime holds, the estimate from
shapes equals the one from files, loading refuses a model that cannot fit, and an 8B-shaped model fits 24 GiB."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import ane_eval
from ane_eval import demo, memory
from ane_eval.card import model_card

GiB = 2**30


def held_bytes(model) -> tuple[int, int]:
    """(bytes of every array the loaded model's packages hold, bytes of its state buffers)."""
    predictors = [model._embeddings, model._lm_head] + [p for c in model._chunks for p, _ in c.values()]
    arrays = {}
    for p in predictors:
        for v in p._package.consts.values.values():
            for a in v if isinstance(v, list) else [v]:
                if isinstance(a, np.ndarray):
                    arrays[id(a)] = a.nbytes
    return sum(arrays.values()), sum(b.value.nbytes for b in model.state.buffers.values())


@pytest.mark.parametrize("lut", [None, 4], ids=["fp16", "lut4"])
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_resident_estimate_is_what_the_runtime_holds(tmp_path, lut, precision):
    """Within 2 %: the differences are the few small fp16 constants widened in fp16 mode (norm gains) and the LUT
    tables, counted though only held while decompressing (16 values per 8 rows: 1.6 % of the demo's 128-wide
    rows, 0.1 % of a 2048-wide model's)."""
    model_dir = shutil.copytree(demo.model_dir(lut=lut), tmp_path / "m")  # packages no other test shares
    model = ane_eval.load_model(model_dir, backend="mil", precision=precision)
    weights, state = held_bytes(model)
    est = model.resident_bytes
    assert est["state"] == state
    assert abs(est["total"] - est["state"] - weights) <= 0.02 * weights
    assert (est["total"] - est["state"]) / (2 if precision == "fp16" else 4) == pytest.approx(
        model_card(model_dir)["parameters"], rel=0.02)


def test_estimate_from_shapes_equals_the_files():
    """memory.estimate from the checkpoint's config alone, against the built demo model's weight files."""
    config = json.loads((demo.checkpoint_dir() / "config.json").read_text())
    from ane_eval.bundle import discover
    from ane_eval.contract import describe_parts

    bundle = discover(demo.model_dir(), backend="mil")
    files = memory.model_resident_bytes(bundle, describe_parts(bundle))
    shapes = memory.estimate(config, context_length=256, num_chunks=2)
    assert shapes["state"] == files["state"] and shapes["embeddings"] == files["embeddings"]
    assert shapes["lm_head"] == files["lm_head"]
    assert shapes["total"] == pytest.approx(files["total"], rel=0.001)


def test_an_8b_model_fits_24_gib():
    """Llama-3.1-8B's shapes (DeepSeek-R1-Distill-Llama-8B's too): resident in fp16 mode at a 4096 context,
    palettized or not (LUT weights are held decompressed to fp16, their indices only while decompressing)."""
    config = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "intermediate_size": 14336, "vocab_size": 128256, "head_dim": 128}
    est = memory.estimate(config, context_length=4096, num_chunks=8)
    assert 15 * GiB < est["total"] < 16 * GiB  # 8.0B parameters x 2 bytes + 0.5 GiB of KV cache
    assert memory.estimate(config, 4096, 8, precision="fp32")["total"] > 24 * GiB  # fp32 weights would not fit


def test_load_refuses_a_model_that_cannot_fit(monkeypatch, tmp_path):
    """memory.available_bytes is the one place the load check learns what is available (replaced here by a small
    machine); the refusal comes before any part is loaded, in one line naming the model, need and availability."""
    from ane_eval.backends import mil as mil_backend

    loaded = []
    real_load = mil_backend.MILBackend.load
    monkeypatch.setattr(mil_backend.MILBackend, "load", lambda self, *a, **k: loaded.append(a) or real_load(self, *a, **k))
    model_dir = demo.model_dir()
    need = ane_eval.load_model(model_dir, backend="mil").resident_bytes["total"]
    loaded.clear()
    monkeypatch.setattr(memory, "available_bytes", lambda: need - 1)
    with pytest.raises(memory.InsufficientMemoryError) as e:
        ane_eval.load_model(model_dir, backend="mil")
    message = str(e.value)
    assert "\n" not in message and str(model_dir) in message and "needs" in message and "available" in message
    assert loaded == []
    monkeypatch.setattr(memory, "available_bytes", lambda: need)
    assert ane_eval.load_model(model_dir, backend="mil").resident_bytes["total"] == need
    monkeypatch.setattr(memory, "available_bytes", lambda: None)  # unknown: not checked
    ane_eval.load_model(model_dir, backend="mil")


def test_available_bytes_reads_this_machine():
    available = memory.available_bytes()
    assert available is not None and 0 < available < 2**50


def test_inspect_reports_resident_bytes(capsys):
    from ane_eval.card import format_card

    card = model_card(demo.model_dir())
    r = card["resident_bytes"]
    assert r["fp16"]["weights"] == pytest.approx(2 * card["parameters"], rel=0.01)
    assert r["fp32"]["total"] == 2 * r["fp16"]["total"]
    assert all(p["resident_bytes"]["fp16"] > 0 for p in card["parts"])
    assert sum(p["resident_bytes"]["fp16"] for p in card["parts"]) == r["fp16"]["weights"]
    assert "resident in the portable runtime" in format_card(card)


def mapped_kib(path) -> int | None:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps), None where there is no smaps."""
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return None
    total, inside = 0, False
    for line in lines:
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line: range perms off dev inode [path]
            inside = len(head) >= 6 and head[5] == str(path)
        elif inside and head[0] == "Rss:":
            total += int(head[1])
    return total


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_embedding_rows_become_resident_only_when_gathered(tmp_path, precision):
    """fp16 mode gathers from the stored table where the weight file's pages lie (blob.BlobFile.view), so a tied
    128k-row table costs what the prompts touch, not 0.5 GB; fp32 mode widens it into memory of its own, reading
    the file without leaving its pages mapped. The demo's table is 1024 rows of 128 fp16 values (256 KiB); Linux
    maps a file's cached pages 64 KiB at a time around the one touched (fault_around_bytes), so reading the header
    maps the first 64 KiB and gathering a row far from it 64 KiB more."""
    from ane_eval import mil

    package = shutil.copytree(next(demo.model_dir().glob("*_embeddings.mlpackage")), tmp_path / "e.mlpackage")
    weights = (package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").resolve()
    emb = mil.load(package, precision=precision)
    before = mapped_kib(weights)
    if before is None:
        pytest.skip("no /proc/self/smaps on this system")
    out = emb.predict({"input_ids": np.array([[5]], np.int32)})["hidden_states"]
    far = emb.predict({"input_ids": np.array([[1000]], np.int32)})["hidden_states"]
    after = mapped_kib(weights)
    # measured: 64 KiB, then 132 (fp16) or 64 (fp32); the whole table would be >= 256
    if precision == "fp16":  # gathered from the mapping (a copy in memory of its own would leave it at 64)
        assert before <= 64 < after <= 136
    else:
        assert before <= 64 and after == before
    wide = mil.load(package, precision="fp32")
    for token, got in ((5, out), (1000, far)):
        np.testing.assert_array_equal(got, wide.predict({"input_ids": np.array([[token]], np.int32)})["hidden_states"])
