"""Both front ends, metadata.json and meta.yaml against broken files as users have them: seeded mutants of a real
converted model (byte flips, truncation, zeroed headers, random spans). Every mutant either loads and runs, or
fails with one of the project's own errors, in one line naming the file; no generic error, no hang."""
from __future__ import annotations

import random
import shutil
import signal

import numpy as np
import pytest

from ane_eval import contract, mil
from ane_eval.bundle import BundleError, discover
from ane_eval.contract import ContractError

from .mlmodelc_writer import write_mlmodelc

# what a broken model file may raise: each names the file (checked below), and the CLI reports each in one line
# (it catches ValueError, RuntimeError and NotImplementedError); anything else is a generic error
EXPECTED = (mil.ModelFormatError, BundleError, ContractError, mil.InputError, mil.ExecutionError,
            mil.UnsupportedOpsError)
MUTANTS_PER_FILE = 50  # 350 mutants in all, about 30 s
SECONDS_PER_MUTANT = 20


def mutate(data: bytes, rng: random.Random) -> bytes:
    kind = rng.choice(["flip", "truncate", "zero_header", "span", "delete"])
    b = bytearray(data)
    if not b:
        return b"\0"
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del b[rng.randrange(len(b)):]
    elif kind == "zero_header":
        b[:64] = bytes(min(64, len(b)))
    elif kind == "span":
        at = rng.randrange(len(b))
        b[at:at + rng.randint(1, 64)] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        at = rng.randrange(len(b))
        del b[at:at + rng.randint(1, 256)]
    return bytes(b)


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def exercise(part, function: str | None, inputs: dict) -> None:
    """What evaluating does with a part: its declared interface, its program for one function, one call."""
    contract.describe(part)
    m = mil.load(part, function_name=function)
    state = m.make_state() if m.state_description else None
    m.predict(inputs, state) if state is not None else m.predict(inputs)


@pytest.fixture(scope="module")
def targets(demo_dir, tmp_path_factory):
    """(file to mutate, how to exercise it, names its errors may give) for each kind of file a model holds."""
    root = tmp_path_factory.mktemp("fuzz")
    d = root / "model"
    shutil.copytree(demo_dir, d)
    head, chunk = d / "llama_lm_head.mlpackage", d / "llama_FFN_PF_chunk_01of02.mlpackage"
    head_c = write_mlmodelc(head, root / "llama_lm_head.mlmodelc")
    chunk_c = write_mlmodelc(chunk, root / "llama_FFN_PF_chunk_01of02.mlmodelc")
    emb_c = write_mlmodelc(d / "llama_embeddings.mlpackage", root / "llama_embeddings.mlmodelc")
    h = {"hidden_states": np.zeros((1, 1, 128), np.float16)}
    infer = {**h, "position_ids": np.zeros(1, np.int32), "causal_mask": np.zeros((1, 1, 1, 256), np.float16),
             "current_pos": np.zeros(1, np.int32)}
    ids = {"input_ids": np.zeros((1, 32), np.int32)}
    return [
        (head / "Data/com.apple.CoreML/model.mlmodel", lambda p: exercise(p, None, h), head),
        (head / "Data/com.apple.CoreML/weights/weight.bin", lambda p: exercise(p, None, h), head),
        (head_c / "model.mil", lambda p: exercise(p, None, h), head_c),
        (head_c / "weights/weight.bin", lambda p: exercise(p, None, h), head_c),
        (chunk_c / "model.mil", lambda p: exercise(p, "infer", infer), chunk_c),
        (emb_c / "metadata.json", lambda p: exercise(p, None, ids), emb_c),
        (d / "meta.yaml", lambda p: discover(p), d),
    ]


def test_mutants_fail_cleanly(targets, tmp_path):
    rng = random.Random(15)
    generic, hangs, unnamed, outcomes = [], [], [], {"ran": 0, "refused": 0}
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for target, run, part in targets:
            original = target.read_bytes()
            for i in range(MUTANTS_PER_FILE):
                work = tmp_path / f"m{i}" / part.name
                shutil.copytree(part, work) if part.is_dir() else shutil.copy2(part, work)
                mutated = work / target.relative_to(part)
                mutated.write_bytes(mutate(original, rng))
                label = f"{mutated.relative_to(tmp_path)} #{i}"
                signal.alarm(SECONDS_PER_MUTANT)
                try:
                    run(work)
                    outcomes["ran"] += 1
                except EXPECTED as e:
                    outcomes["refused"] += 1
                    text = str(e)
                    if (str(work) not in text and work.name not in text) or "\n" in text:
                        unnamed.append(f"{label}: {text[:200]}")
                except Hang:
                    hangs.append(label)
                except Exception as e:  # noqa: BLE001 - counting exactly these is the point of the test
                    generic.append(f"{label}: {type(e).__name__}: {str(e)[:200]}")
                finally:
                    signal.alarm(0)
                    shutil.rmtree(work.parent)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert not generic, f"{len(generic)} generic errors:\n" + "\n".join(generic)
    assert not hangs, f"hangs: {hangs}"
    assert not unnamed, "errors not naming the file:\n" + "\n".join(unnamed)
    # the mutants reach the parsers' error paths (not all harmless, not all rejected at the first byte)
    assert outcomes["refused"] >= len(targets) * MUTANTS_PER_FILE // 3 and outcomes["ran"] > 0, outcomes
