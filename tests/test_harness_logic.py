"""ANELM's request handling on a causal stand-in for ANEModel (milliseconds: the tests mutation runs of harness.py
lean on). The stand-in keeps ANEModel's protocol (ane_eval/model.py): `history`, `reset()`, `prefill(ids, start)`
with positions before `start` already cached, `infer(token, pos)` with positions 0..pos-1 cached, and logits that
depend only on the tokens at positions <= pos (a causal LM). Its logits are a fixed pseudo-random function of that
prefix, so every score has an independent reference: log-softmax of f(prefix) at the target."""
from __future__ import annotations

import logging
import math
import zlib

import numpy as np
import pytest
from lm_eval.api.instance import Instance

from ane_eval import harness
from ane_eval.harness import ANELM, NoDistributionError, PrefixCache, log_softmax_at

V = 40


def logits_of(prefix) -> np.ndarray:
    """The stand-in's next-token logits after `prefix` (float32, as ANEModel.infer returns)."""
    seed = zlib.crc32(np.asarray(prefix, np.int64).tobytes())
    return (np.random.default_rng(seed).standard_normal(V) * 3).astype(np.float32)


class Tokenizer:
    """Characters 'a'.. as ids 2.. (one token a character); 0 is BOS, 1 EOS, as HF tokenizers expose them."""
    bos_token_id, eos_token_id, name_or_path = 0, 1, "stand/in"

    def encode(self, text, add_special_tokens=True):
        return ([0] if add_special_tokens else []) + [2 + (ord(c) - 97) % (V - 2) for c in text]

    def decode(self, ids, skip_special_tokens=False):  # HF's default
        ids = [ids] if isinstance(ids, int) else ids
        return "".join("" if t in (0, 1) and skip_special_tokens else "<s>" if t == 0 else "</s>" if t == 1
                       else chr(97 + t - 2) for t in ids)


class CausalModel:
    def __init__(self, context_length=64, head="logits"):
        self.context_length, self.head, self.name = context_length, head, "stand-in"
        self.tokenizer = Tokenizer()
        self.calls: list[tuple] = []
        self.reset()

    @property
    def history(self):
        return list(self._history)

    def reset(self):
        self._history = []
        self.calls.append(("reset",))

    def prefill(self, ids, start=0):
        assert 0 <= start <= len(self._history) and start + len(ids) <= self.context_length
        self._history = self._history[:start] + list(ids)
        self.calls.append(("prefill", start, len(ids)))

    def infer(self, token, pos):
        assert getattr(self, "head", "logits") == "logits" and 0 <= pos <= len(self._history) and pos < self.context_length
        self._history = self._history[:pos] + [int(token)]
        self.calls.append(("infer", pos))
        return logits_of(self._history)

    def next_token(self, token, pos):
        self._history = self._history[:pos] + [int(token)]
        self.calls.append(("next_token", pos))
        return int(logits_of(self._history).argmax())

    def count(self, kind):
        return sum(c[0] == kind for c in self.calls)


def reference(context, continuation, max_length=None):
    """HFLM's scoring of one request on the stand-in: input (ctx + cont)[-(L + 1):][:-1], last len(cont) rows."""
    full = context + continuation
    if max_length is not None:
        full = full[-(max_length + 1):]
    total, greedy = 0.0, True
    for i in range(len(full) - len(continuation), len(full)):
        row = logits_of(full[:i])
        total += log_softmax_at(row, full[i])
        greedy = greedy and int(row.argmax()) == full[i]
    return total, greedy


def test_log_softmax_at():
    row = np.array([1.0, 2.0, 3.0], np.float32)
    assert log_softmax_at(row, 2) == pytest.approx(3.0 - np.log(np.exp(row.astype(np.float64)).sum()))
    assert log_softmax_at(np.array([1000.0, 0.0], np.float32), 1) == pytest.approx(-1000.0)  # no overflow
    # the normaliser is summed in float64: a float32 sum of 50k terms is off by ~1e-7
    big = (np.random.default_rng(0).standard_normal(50_000) * 4).astype(np.float32)
    m = float(big.max())
    exact = float(big[7]) - (m + math.log(math.fsum(math.exp(float(v) - m) for v in big)))
    assert abs(log_softmax_at(big, 7) - exact) < 1e-10


class Hook:
    def __init__(self):
        self.added = []

    def add_partial(self, kind, key, value):
        self.added.append((kind, key, value))


@pytest.mark.parametrize("reuse", [True, False])
def test_scores_match_the_reference_in_request_order(reuse):
    gen = np.random.default_rng(0)
    shared = [0] + gen.integers(2, V, 12).tolist()
    requests = []
    for i in range(14):  # shared prefixes, one-token contexts, an empty continuation, long continuations
        ctx = shared[: 2 + i % 9] + gen.integers(2, V, i % 3).tolist()
        cont = gen.integers(2, V, (i * 5) % 7).tolist()
        requests.append(((f"c{i}", f"x{i}"), ctx, cont))
    m = CausalModel()
    lm = ANELM(model=m, prefix_reuse=reuse)
    lm.cache_hook = Hook()
    got = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    want = [reference(ctx, cont) for _, ctx, cont in requests]
    assert [g for _, g in got] == [g for _, g in want]
    np.testing.assert_allclose([s for s, _ in got], [s for s, _ in want], rtol=0, atol=1e-9)
    assert sorted(lm.cache_hook.added, key=str) == sorted(
        [("loglikelihood", key, res) for (key, _, _), res in zip(requests, got)], key=str)
    assert got[[i for i, (_, _, c) in enumerate(requests) if not c][0]] == (0.0, True)
    if reuse:
        assert m.count("reset") == 1  # only the constructor's
    else:
        assert m.count("reset") == 1 + sum(1 for _, _, c in requests if c)  # a fresh state per scored request


def test_requests_run_in_token_order_so_prefixes_are_shared():
    """Sorted by their token sequences: a shared prefix is prefilled once, each new context only past it."""
    m = CausalModel()
    lm = ANELM(model=m)
    a, b = [0, 5, 6, 7, 8, 9], [0, 5, 6, 7, 30, 31]
    requests = [(None, b, [3]), (None, a, [4]), (None, b, [2]), (None, a, [3])]
    lm._loglikelihood_tokens(requests, disable_tqdm=True)
    prefills = [c for c in m.calls if c[0] == "prefill"]
    # a + [3], a + [4], b + [2], b + [3]: the context of a (but its last token) prefilled once, a's last token
    # inferred once for both choices, b's two new tokens through infer (fewer than SMALL_PREFILL past the shared
    # prefix 0 5 6 7, then the scored position), b's row reused for its second choice
    assert m.calls == [("reset",), ("prefill", 0, 5), ("infer", 5), ("infer", 4), ("infer", 5)]


def test_small_prefills_go_through_infer():
    """Fewer than SMALL_PREFILL new context tokens are fed with infer (a prefill pays for a whole batch)."""
    m = CausalModel()
    cache = PrefixCache(m)
    seq = [0, 3, 4, 5, 6]
    cache.feed(seq, 1)
    assert m.calls[-1] == ("infer", 0) and m.count("prefill") == 0
    cache.feed(seq, 3)  # 2 new tokens: a prefill from the cached prefix
    assert m.calls[-1] == ("prefill", 1, 2)
    before = len(m.calls)
    cache.feed(seq, 3)  # nothing new
    assert len(m.calls) == before
    cache.feed(seq, 4)  # 1 new token
    assert m.calls[-1] == ("infer", 3) and cache.rows[3] is not None
    np.testing.assert_array_equal(cache.row(seq, 3), logits_of(seq[:4]))
    assert len(m.calls) == before + 1  # that row was kept: no second infer
    naive = PrefixCache(m, reuse=False)
    naive.feed(seq, 3)
    assert m.calls[-2:] == [("reset",), ("prefill", 0, 3)]


def test_rows_are_kept_for_the_current_prefix_only_and_bounded():
    m = CausalModel(context_length=200)
    cache = PrefixCache(m)
    seq = list(range(2, 38)) * 3
    for p in range(len(seq)):
        cache.row(seq, p)
    assert sorted(cache.rows) == list(range(len(seq) - harness.ROW_CACHE, len(seq)))
    n = m.count("infer")
    np.testing.assert_array_equal(cache.row(seq, len(seq) - 1), logits_of(seq))
    assert m.count("infer") == n  # reused
    other = seq[:50] + [3]
    np.testing.assert_array_equal(cache.row(other, 50), logits_of(other))  # a different token at 50
    assert max(cache.rows) == 50  # rows past the rewind are dropped
    held = sorted(cache.rows)
    cache.feed(other, 20)  # the cache agrees with `other` past 20: its rows stay
    assert sorted(cache.rows) == held and max(held) == 50
    cache.feed(other[:30] + [9] * 25, 40)  # differs from 30 on: rows past it are gone
    assert all(p < 30 for p in cache.rows)
    # a rewind to a shared prefix drops the row at the first differing position too
    cache = PrefixCache(m)
    m.reset()
    seq = [0, 3, 4, 5, 6, 7]
    cache.feed(seq, 2)
    for p in (2, 3, 4):
        cache.row(seq, p)
    n = m.count("infer")
    np.testing.assert_array_equal(cache.row(seq, 3), logits_of(seq[:4]))  # cache holds seq[:5]: row 3 reused
    assert m.count("infer") == n
    cache.feed(seq[:3] + [9, 9, 9], 5)  # differs at 3
    assert sorted(cache.rows) == [2] or sorted(cache.rows) == [2, 4]
    assert 3 not in cache.rows


def test_left_truncation_and_warning(caplog):
    m = CausalModel(context_length=16)
    lm = ANELM(model=m)
    ctx, cont = [0] + list(range(2, 32)), [5, 6]
    with caplog.at_level(logging.WARNING, logger="ane_eval"):
        (got,) = lm._loglikelihood_tokens([(None, ctx, cont)], disable_tqdm=True)
    assert lm.truncated == 1 and got == pytest.approx(reference(ctx, cont, 16))
    assert caplog.messages == ["ane: 1 request(s) longer than the 16-token context were left-truncated (as HFLM does)"]
    exact = list(range(2, 17))  # 15 + 2 = 17 = max_length + 1 tokens: fits, nothing truncated
    with caplog.at_level(logging.WARNING, logger="ane_eval"):
        lm._loglikelihood_tokens([(None, exact, cont)], disable_tqdm=True)
        assert lm.truncated == 1 and len(caplog.messages) == 1
        lm._loglikelihood_tokens([(None, ctx, cont), (None, ctx[:-5], [7])], disable_tqdm=True)
    assert lm.truncated == 3
    lm._score(list(range(2, 18)), [5, 6])  # 16 + 2 tokens: one past max_length + 1, the context alone fits
    assert lm.truncated == 4
    assert caplog.messages[1] == "ane: 2 request(s) longer than the 16-token context were left-truncated (as HFLM does)"
    with pytest.raises(ValueError, match="a continuation of 17 tokens cannot be scored within the 16-token context"):
        lm._score([0], list(range(2, 19)))
    lm16 = ANELM(model=m, max_length=8)
    assert lm16.max_length == 8
    with pytest.raises(ValueError, match="max_length 17 exceeds the model's compiled context 16"):
        ANELM(model=m, max_length=17)
    assert ANELM(model=m, max_length=16).max_length == 16


class Rolling:
    def __init__(self, text):
        self.args = (text,)


def test_rolling_loglikelihood_scores_every_token_once():
    m = CausalModel(context_length=8)
    lm = ANELM(model=m)
    lm.cache_hook = Hook()
    text = "abcdefghijklmnopqrstuvw"  # 24 tokens with BOS: several windows of 8
    tokens = m.tokenizer.encode(text)
    windows = lm.rolling_windows(tokens)
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # HFLM's windows: context_len=1
    assert windows == [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 0, 8, 1)]
    assert sum(len(cont) for _, cont in windows) == len(tokens)
    assert [c for _, cont in windows for c in cont] == tokens
    want = sum(reference(ctx, cont, 8)[0] for ctx, cont in windows)
    (got,) = lm.loglikelihood_rolling([Rolling(text)], disable_tqdm=True)
    assert got == pytest.approx(want, abs=1e-9)
    assert lm.cache_hook.added == [("loglikelihood_rolling", (text,), got)]
    assert windows[0][0] == [m.tokenizer.bos_token_id]


def test_sampling_follows_the_softmax_and_the_seed():
    lm = ANELM.__new__(ANELM)  # _pick needs only the generator
    lm._rng = np.random.default_rng(0)
    row = np.array([0.0, np.log(3.0), -np.inf, -1e4], np.float32)
    draws = np.array([lm._pick(row, True, 1.0) for _ in range(4000)])
    assert set(draws) <= {0, 1}
    assert abs((draws == 1).mean() - 0.75) < 0.03  # p = 3/4; 4000 draws: se 0.007
    hot = np.array([lm._pick(np.array([0, 1, 0, 0], np.float32), True, 100.0) for _ in range(4000)])
    assert abs((hot == 1).mean() - 0.25) < 0.03  # a high temperature flattens to uniform
    assert lm._pick(row, False, 1.0) == 1 and lm._pick(row, True, 0.0) == 1  # greedy
    big = np.array([1000.0, 1000.0 + np.log(3.0)], np.float32)  # large logits: no overflow in the softmax
    assert abs(np.mean([lm._pick(big, True, 1.0) for _ in range(4000)]) - 0.75) < 0.03


def gen_request(context, **kwargs):
    return Instance("generate_until", {}, (context, {"until": ["\n\n"], "max_gen_toks": 6, **kwargs}), 0)


def greedy_continuation(m, ids, n):
    seq, out = list(ids), []
    for _ in range(n):
        t = int(logits_of(seq).argmax())
        if t == m.tokenizer.eos_token_id:
            break
        out.append(t)
        seq.append(t)
    return out


def test_greedy_generation_is_the_argmax_chain():
    m = CausalModel()
    lm = ANELM(model=m)
    lm.cache_hook = Hook()
    (text,) = lm.generate_until([gen_request("abc")], disable_tqdm=True)
    ids = m.tokenizer.encode("abc")
    assert text == m.tokenizer.decode(greedy_continuation(m, ids, 6))
    assert lm.cache_hook.added[0][0] == "generate_until" and lm.cache_hook.added[0][2] == text
    for n in (1, 3):
        (short,) = lm.generate_until([gen_request("abc", max_gen_toks=n)], disable_tqdm=True)
        assert short == text[:n]
    # a stop string cuts the text there (lm-eval's postprocessing) and generation stops
    first = text[:2]
    (cut,) = lm.generate_until([gen_request("abc", until=[first[1]])], disable_tqdm=True)
    assert cut == first[:1]


def test_generation_stops_at_the_window_and_at_eos():
    m = CausalModel(context_length=8)
    lm = ANELM(model=m)
    with pytest.raises(ValueError, match="max_gen_toks 8 leaves no room for the context in the 8-token window"):
        lm.generate_until([gen_request("abc", max_gen_toks=8)], disable_tqdm=True)
    (text,) = lm.generate_until([gen_request("abcdefghijk", max_gen_toks=3)], disable_tqdm=True)
    ids = m.tokenizer.encode("abcdefghijk")[-5:]  # left-truncated to the room: 8 - 3
    assert text == m.tokenizer.decode(greedy_continuation(m, ids, 3))
    # an EOS argmax ends the text
    m = CausalModel()
    lm = ANELM(model=m)
    words = [a + b for a in "abcdefghijklmnopqrstuvwxyz" for b in "abcdefghijklmnopqrstuvwxyz"]
    eos_next = [w for w in words if int(logits_of(m.tokenizer.encode(w)).argmax()) == 1]
    assert eos_next  # about 1/40 of them
    assert lm.generate_until([gen_request(eos_next[0])], disable_tqdm=True) == [""]
    one = next(w for w in words if len(greedy_continuation(m, m.tokenizer.encode(w), 7)) == 1)
    assert len(lm.generate_until([gen_request(one, max_gen_toks=7)], disable_tqdm=True)[0]) == 1
    # one token of room still generates
    (short,) = ANELM(model=CausalModel(context_length=8)).generate_until(
        [gen_request("abcdefghijk", max_gen_toks=7)], disable_tqdm=True)
    assert len(short) >= 1


def test_sampling_kwargs_are_checked_before_anything_runs():
    m = CausalModel()
    lm = ANELM(model=m)
    with pytest.raises(ValueError, match=r"generation kwargs \['top_k'\] are not supported"):
        lm.generate_until([gen_request("ab"), gen_request("ab", top_k=5)], disable_tqdm=True)
    assert m.count("infer") + m.count("prefill") == 0
    with pytest.raises(ValueError, match=r"^ane: generation kwargs \['top_k'\] are not supported; use greedy decoding "
                                         r"\(do_sample=False\) or temperature sampling$"):
        lm.generate_until([gen_request("ab", top_k=5)])
    prompts = ["ab", "cd", "ef", "gh"]

    def generate(seed, **kw):
        return ANELM(model=m, seed=seed).generate_until([gen_request(p, **kw) for p in prompts], disable_tqdm=True)

    greedy = generate(3)
    sampled = generate(3, do_sample=True, temperature=2.0)
    assert sampled == generate(3, do_sample=True, temperature=2.0) and sampled != greedy
    assert generate(3, do_sample=True) == greedy  # no temperature: greedy
    assert generate(1234, do_sample=True, temperature=2.0) == ANELM(model=m).generate_until(
        [gen_request(p, do_sample=True, temperature=2.0) for p in prompts], disable_tqdm=True)  # the default seed
    # lm-eval's defaults: max_gen_toks from the model args, no stop strings
    lm = ANELM(model=m, max_gen_toks=3)
    lm.cache_hook = Hook()
    req = Instance("generate_until", {}, ("ab", {}), 0)
    (text,) = lm.generate_until([req], disable_tqdm=True)
    assert text == m.tokenizer.decode(greedy_continuation(m, m.tokenizer.encode("ab"), 3))
    assert lm.cache_hook.added == [("generate_until", ("ab", {}), text)]


def test_an_argmax_head_generates_greedily_and_refuses_scores():
    m = CausalModel(head="argmax")
    lm = ANELM(model=m)
    assert not lm.has_distribution
    (text,) = lm.generate_until([gen_request("abc")], disable_tqdm=True)
    assert text == m.tokenizer.decode(greedy_continuation(m, m.tokenizer.encode("abc"), 6))
    assert m.count("next_token") > 0 and m.count("infer") == 0
    with pytest.raises(NoDistributionError, match=r"^stand-in: its LM head returns only the argmax of each vocabulary "
                       r"chunk \(argmax_in_model\), not a distribution, so 2 loglikelihood request\(s\) cannot be "
                       r"scored; evaluate generation \(generate_until\) tasks with greedy decoding, or convert the "
                       r"model without --argmax$"):
        lm._loglikelihood_tokens([(None, [0, 2], [3]), (None, [0, 2], [4])])
    with pytest.raises(NoDistributionError, match=r"so 1 rolling loglikelihood request\(s\) cannot be scored"):
        lm.loglikelihood_rolling([Rolling("ab")])
    with pytest.raises(NoDistributionError, match=r"so sampled generation \(do_sample with a temperature\) cannot"):
        lm.generate_until([gen_request("ab", do_sample=True, temperature=0.5)])
    # do_sample without a temperature is greedy: allowed
    assert lm.generate_until([gen_request("abc", do_sample=True, temperature=0.0)], disable_tqdm=True) == [text]


def test_model_args(caplog):
    m = CausalModel()
    assert ANELM(model=m).prefix_reuse is True
    for v, want in (("false", False), ("0", False), ("no", False), ("True", True), (" yes ", True), ("on", True),
                    ("1", True), (0, False), (1, True)):
        assert ANELM(model=m, prefix_reuse=v).prefix_reuse is want, v
        assert ANELM(model=m, add_bos_token=v).add_bos_token is want
    assert ANELM(model=m).add_bos_token is None
    with pytest.raises(ValueError, match=r"ane: unknown model_args \['colour', 'size'\]; see ane_eval.harness.ANELM"):
        ANELM(model=m, colour=1, size=2, device="cpu")
    ANELM(model=m, device="cpu", max_batch_size=4)
    with caplog.at_level(logging.INFO, logger="ane_eval"):
        ANELM(model=m, batch_size=8)
        ANELM(model=m)
        for quiet in ("auto", 1, "1", None, "None"):
            ANELM(model=m, batch_size=quiet)
    assert caplog.messages == ["ane: batch_size 8 ignored: an ANE model evaluates requests serially"]
    assert ANELM(model=m).max_gen_toks == 256
    lm = ANELM(model=m, max_gen_toks=17)
    assert (lm.max_gen_toks, lm.max_length, lm.eot_token_id, lm.prefix_token_id) == (17, 64, 1, 0)
    assert lm.tokenizer_name == "stand__in"
    m.tokenizer.bos_token_id = None
    assert lm.prefix_token_id == 1  # no BOS: EOS, as HFLM


def test_model_dir_loads_through_load_model(monkeypatch):
    """Without `model`, ANELM loads `model_dir` (the `demo` alias resolved) with the backend settings given."""
    import ane_eval.model as model_module

    seen = {}
    monkeypatch.setattr(model_module, "resolve_model", lambda arg: seen.setdefault("resolved", f"dir:{arg}"))
    monkeypatch.setattr(model_module, "load_model", lambda path, **kw: seen.update(path=path, **kw) or CausalModel())
    timeouts, real = [], harness.Group
    monkeypatch.setattr(harness, "Group", lambda timeout=None: timeouts.append(timeout) or real(timeout=timeout))
    ANELM()
    assert seen == {"resolved": "dir:demo", "path": "dir:demo", "backend": "auto", "precision": "fp16",
                    "compute_units": "CPU_AND_NE"}
    seen.clear()
    ANELM(model_dir="/m", backend="mil", precision="fp32", compute_units="CPU_ONLY", dist_timeout=12.5)
    assert seen == {"resolved": "dir:/m", "path": "dir:/m", "backend": "mil", "precision": "fp32",
                    "compute_units": "CPU_ONLY"}
    assert timeouts == [None, 12.5]


def test_a_model_without_a_head_attribute_has_logits():
    m = CausalModel()
    del m.head
    lm = ANELM(model=m)
    assert lm.has_distribution
    (got,) = lm._loglikelihood_tokens([(None, [0, 3, 4], [5])], disable_tqdm=True)
    assert got == pytest.approx(reference([0, 3, 4], [5]))


def test_a_greedy_continuation_is_greedy():
    ctx = [0, 3, 4]
    cont = greedy_continuation(CausalModel(), ctx, 4)
    assert len(cont) == 4 and 1 not in cont
    (got,) = ANELM(model=CausalModel())._loglikelihood_tokens([(None, ctx, cont)], disable_tqdm=True)
    assert got[1] is True and got[0] == pytest.approx(reference(ctx, cont)[0])


def test_tok_encode_as_hflm():
    m = CausalModel()
    lm = ANELM(model=m)
    assert lm.tok_encode("ab") == [0, 2, 3]
    assert lm.tok_encode("<s>ab") == m.tokenizer.encode("<s>ab", add_special_tokens=False)  # BOS already there
    assert lm.tok_encode("abcd", left_truncate_len=2) == [4, 5]
    assert lm.tok_encode("ab", add_special_tokens=False) == [2, 3] and lm.tok_encode("ab", True) == [0, 2, 3]
    assert ANELM(model=m, add_bos_token=False).tok_encode("ab") == [2, 3]
    assert lm.tok_decode([0, 2, 1]) == "a" and lm.tok_decode([0, 2], skip_special_tokens=False) == "<s>a"
