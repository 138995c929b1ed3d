"""Fidelity against the source model: how far a conversion moved the next-token distributions of its checkpoint.

    plan = fidelity.plan(model, reference, texts, max_tokens=4096)   # reference = load_reference(HF dir | .npz)
    report = fidelity.run(plan)                                      # dict: tokens, mean_kld, top1_agreement, ...

The text is tokenized with the model's tokenizer and cut into lm-eval's disjoint rolling windows of the model's
context (the prefix token first, every token scored exactly once: what lm-eval's perplexity tasks score). At every
scored position the model's distribution Q is compared with the reference's P. Definitions follow llama.cpp's
`llama-perplexity --kl-divergence` (tools/perplexity/perplexity.cpp in ggml-org/llama.cpp, commit 050fc7f):
- KLD = sum_v P(v) (log P(v) - log Q(v)), the divergence of the model from the reference (llama.cpp's
  `sum += p_base * (p_log_base - log p)`); mean ± stderr with stderr = sqrt((mean(x^2) - mean^2) / (n - 1));
  median/p90/p99 interpolated linearly between sorted values, as llama.cpp's `percentile`.
- top1_agreement: argmax Q = argmax P ("Same top p"), ± sqrt(p (1 - p) / (n - 1)).
- Δp = Q(true next token) - P(true next token): mean_dp (± stderr) and rms_dp.
- ppl_ratio = exp(mean(nll_Q - nll_P)) = ppl_model / ppl_reference, with the paired stderr of the log ratio.
- logit_psnr_db = 20 log10(max |reference logit| / RMS(logit difference)) over the compared logits.
Cost: ANEMLL's prefill returns no logits, so every scored token is one `infer` of the model; `max_tokens` bounds it.

Stored references (`save_reference`, read back by `load_reference`): an .npz (no pickle) holding, per scored
position, the reference's top-k tokens with their log-probabilities (float32), the log of the remaining mass, the
logits' log-sum-exp, the log-probability of the true next token and the argmax; plus the token windows.
About k * 8 + 24 bytes a position: 536 B at k = 64, whatever the vocabulary (a 128k vocabulary in full is 512 kB).
What it gives:
- exact: top1_agreement, ppl_reference, ppl_ratio, mean_dp, rms_dp (up to float32 rounding of stored values);
- KLD: the exact KL divergence of the two distributions coarsened to {the reference's top-k tokens, one "rest"
  bucket}. By the data-processing inequality it never exceeds the full KLD; the shortfall at a position is
  r * KL(P_rest || Q_rest) (r the stored rest mass, P_rest/Q_rest the distributions inside the rest), and
  `kld_error_bound` reports its supremum over every reference consistent with the stored numbers (rest tokens
  can hold at most the k-th probability each), averaged over positions: full mean KLD is within
  [mean_kld, mean_kld + kld_error_bound];
- logit_psnr_db over the stored top-k logits only (`logit_psnr_scope` says which logits were compared).
"""
from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REFERENCE_FORMAT = "ane-eval-fidelity-reference/1"
DEFAULT_TOP_K = 64
BLOCK = 32  # positions compared at once (float64 copies of BLOCK x vocabulary)
METRICS = ("mean_kld", "median_kld", "p90_kld", "p99_kld", "max_kld", "top1_agreement", "ppl_model",
           "ppl_reference", "ppl_ratio", "mean_dp", "rms_dp", "logit_psnr_db")
HIGHER_IS_BETTER = {"top1_agreement": True, "mean_dp": True, "logit_psnr_db": True,
                    **{m: False for m in METRICS if m not in ("top1_agreement", "mean_dp", "logit_psnr_db")}}


class FidelityError(ValueError):
    """Bad input to a fidelity measurement: one readable line."""


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1)
    safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return safe + np.log(np.exp(x - safe[..., None]).sum(axis=-1))


@dataclass
class RefRows:
    """The reference's next-token distributions at T scored positions (all of the vocabulary, or its top-k)."""
    logprobs: np.ndarray  # (T, k): log P of the entries kept
    ids: np.ndarray | None  # (T, k) token ids of those entries; None: the whole vocabulary, in order
    tail_logmass: np.ndarray  # (T,): log of the mass outside the entries (-inf when all are kept)
    logsumexp: np.ndarray  # (T,): of the logits, so logits = logprobs + logsumexp
    target_logprob: np.ndarray  # (T,)
    argmax: np.ndarray  # (T,)

    @classmethod
    def from_logits(cls, logits: np.ndarray, targets) -> "RefRows":
        logits = logits.astype(np.float64)
        lse = _logsumexp(logits)
        logp = logits - lse[:, None]
        t = np.asarray(targets)
        return cls(logp, None, np.full(len(t), -np.inf), lse, logp[np.arange(len(t)), t], logits.argmax(axis=1))

    def top(self, k: int) -> "RefRows":
        """The k most probable entries of each position (ties: lower token id first) and the mass of the rest."""
        assert self.ids is None, "top-k of a stored reference"
        T, V = self.logprobs.shape
        if k >= V:
            ids = np.broadcast_to(np.arange(V), (T, V))
        else:
            ids = np.argpartition(-self.logprobs, k - 1, axis=1)[:, :k]
        order = np.lexsort((ids, -np.take_along_axis(self.logprobs, ids, 1)), axis=1)
        ids = np.take_along_axis(ids, order, 1)
        rest = self.logprobs.copy()
        np.put_along_axis(rest, ids, -np.inf, 1)
        return RefRows(np.take_along_axis(self.logprobs, ids, 1), ids, _logsumexp(rest), self.logsumexp,
                       self.target_logprob, self.argmax)


def _tail_kld_supremum(c: float, log_b: np.ndarray) -> float:
    """max KL(a || b) over distributions a on the rest with every a_v <= c: convex in a, so a vertex — mass c on
    the floor(1/c) tokens that b finds least likely, the remainder on the next."""
    n = len(log_b)
    m = min(int(math.floor(1.0 / c)), n)
    low = np.sort(np.partition(log_b, min(m, n - 1))[:min(m + 1, n)])
    total = c * float(np.sum(math.log(c) - low[:m]))
    rem = 1.0 - m * c
    if rem > 1e-12 and m < n:
        total += rem * (math.log(rem) - float(low[m]))
    return max(total, 0.0)


def compare(ref: RefRows, logits: np.ndarray, targets) -> dict:
    """Per-position statistics of the model's logits (T, V) against the reference rows."""
    t = np.asarray(targets)
    q = _log_softmax(logits)
    T = len(t)
    idx = np.arange(T)
    p_logp = ref.logprobs.astype(np.float64)
    q_kept = q if ref.ids is None else np.take_along_axis(q, ref.ids, 1)
    with np.errstate(invalid="ignore"):  # exp(-inf) * (-inf - x) of kept entries with P = 0
        kld = np.nansum(np.exp(p_logp) * (p_logp - q_kept), axis=1)
    bound = np.zeros(T)
    if ref.ids is not None:
        rest_q = q.copy()
        np.put_along_axis(rest_q, ref.ids, -np.inf, 1)
        log_rq = _logsumexp(rest_q)
        tail = ref.tail_logmass.astype(np.float64)
        for i in np.flatnonzero(np.isfinite(tail)):
            r = math.exp(tail[i])
            kld[i] += r * (tail[i] - log_rq[i])
            c = min(1.0, math.exp(float(p_logp[i, -1]) - tail[i]))  # a rest token holds at most the k-th probability
            log_b = rest_q[i][np.isfinite(rest_q[i])] - log_rq[i]
            bound[i] = r * _tail_kld_supremum(c, log_b)
    ref_logits = p_logp + ref.logsumexp.astype(np.float64)[:, None]
    model_logits = (logits if ref.ids is None else np.take_along_axis(logits, ref.ids, 1)).astype(np.float64)
    nll_model, nll_ref = -q[idx, t], -ref.target_logprob.astype(np.float64)
    return {"kld": kld, "bound": bound, "nll_model": nll_model, "nll_reference": nll_ref,
            "same_top": (logits.argmax(axis=1) == ref.argmax).astype(np.float64),
            "dp": np.exp(-nll_model) - np.exp(-nll_ref),
            "sq_err": float(np.sum((ref_logits - model_logits) ** 2)), "count": ref_logits.size,
            "peak": float(np.max(np.abs(ref_logits))), "width": ref_logits.shape[1]}


# --- references ------------------------------------------------------------------------------------------------------
class CheckpointReference:
    """A Hugging Face checkpoint run with transformers in fp32 (CPU, or MPS on a Mac): never remote code, never a
    download."""
    stored = False

    def __init__(self, path: Path, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        if not (path / "config.json").is_file():
            raise FidelityError(f"{path}: not a Hugging Face checkpoint directory (no config.json); pass the "
                                "source model's directory or a reference file written with --save-reference")
        self.path = path
        self.device = device or ("mps" if torch.backends.mps.is_available() else "cpu")
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True,
                                                         trust_remote_code=False)
        except (OSError, ValueError, KeyError, ImportError, RuntimeError) as e:
            raise FidelityError(f"{path}: transformers cannot load this checkpoint without remote code "
                                f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        self.model = model.to(self.device).eval()
        self.vocab_size = int(self.model.config.vocab_size)
        self._torch = torch

    def describe(self) -> str:
        return f"{self.path} (Hugging Face checkpoint, transformers fp32 on {self.device})"

    def rows(self, inp: list[int], targets: list[int], start: int) -> RefRows:
        torch = self._torch
        with torch.no_grad():
            logits = self.model(torch.tensor([inp], device=self.device)).logits[0, len(inp) - len(targets):]
        return RefRows.from_logits(logits.float().cpu().numpy(), targets)


_STORED = {"top_ids": "i", "top_logprobs": "f", "tail_logmass": "f", "logsumexp": "f", "target_logprob": "f",
           "argmax": "i", "targets": "i", "doc_tokens": "i", "doc_offsets": "i"}
_SCALARS = ("vocab_size", "window", "prefix_token", "top_k")


class StoredReference:
    """A reference file written by `save_reference`: top-k log-probabilities per position (see the module doc)."""
    stored = True

    def __init__(self, path: Path):
        self.path = path

        def bad(what):
            return FidelityError(f"{path}: not a usable fidelity reference ({what}); write one with "
                                 "`ane-eval fidelity --model DIR --reference HF_DIR --text FILE --save-reference FILE`")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # object arrays: ValueError (no pickle)
            raise bad(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        if str(arrays.get("format", "")) != REFERENCE_FORMAT:
            raise bad(f"format is not {REFERENCE_FORMAT!r}")
        missing = [k for k in (*_STORED, *_SCALARS, "reference") if k not in arrays]
        if missing:
            raise bad(f"missing {', '.join(missing)}")
        for k, kind in _STORED.items():
            if arrays[k].dtype.kind not in (kind, "u" if kind == "i" else kind):
                raise bad(f"{k} has dtype {arrays[k].dtype}")
        try:
            self.vocab_size, self.window, self.prefix_token, self.top_k = (int(arrays[k]) for k in _SCALARS)
        except (TypeError, ValueError):
            raise bad("a header value is not a number") from None
        n = len(arrays["targets"])
        V, k = self.vocab_size, self.top_k
        offsets, tokens = arrays["doc_offsets"].astype(np.int64), arrays["doc_tokens"]
        checks = [
            (V >= 1 and self.window >= 1 and 1 <= k <= V, "header values out of range"),
            (arrays["top_ids"].shape == (n, k) and arrays["top_logprobs"].shape == (n, k), "top-k arrays of the "
             "wrong shape"),
            (all(arrays[a].shape == (n,) for a in ("tail_logmass", "logsumexp", "target_logprob", "argmax")),
             "per-position arrays of different lengths"),
            (offsets.ndim == 1 and len(offsets) >= 2 and offsets[0] == 0 and offsets[-1] == len(tokens)
             and bool(np.all(np.diff(offsets) >= 0)), "document offsets inconsistent"),
            (all(a.size == 0 or (a.min() >= 0 and a.max() < V)
                 for a in (arrays["top_ids"], arrays["argmax"], arrays["targets"], tokens)), "token ids out of range"),
            (bool(np.all(np.isfinite(arrays["top_logprobs"])) and np.all(arrays["top_logprobs"] <= 1e-4)
                  and np.all(np.isfinite(arrays["target_logprob"]))), "log-probabilities not finite or above 0"),
            (0 <= self.prefix_token < V, "prefix token out of range"),
        ]
        for ok, what in checks:
            if not ok:
                raise bad(what)
        self.arrays = arrays
        self.positions = n
        self.name = str(arrays["reference"])
        self.doc_tokens = [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]

    def describe(self) -> str:
        return f"{self.path} (stored reference of {self.name}: top-{self.top_k} of {self.vocab_size})"

    def rows(self, inp: list[int], targets: list[int], start: int) -> RefRows:
        """The stored rows of scored positions start.. (checked against the model's targets)."""
        a, b = start, start + len(targets)
        z = self.arrays
        if b > self.positions or z["targets"][a:b].tolist() != list(targets):
            raise FidelityError(f"{self.path}: the model's windows do not match the stored ones at positions {a}.."
                                f"{b - 1}; the reference was made with another tokenizer or window")
        return RefRows(z["top_logprobs"][a:b], z["top_ids"][a:b].astype(np.int64), z["tail_logmass"][a:b],
                       z["logsumexp"][a:b], z["target_logprob"][a:b], z["argmax"][a:b])


def load_reference(arg, device: str | None = None):
    """A checkpoint directory or a stored reference file."""
    path = Path(arg)
    if path.is_dir():
        return CheckpointReference(path, device)
    if path.is_file():
        return StoredReference(path)
    raise FidelityError(f"{path}: no such reference; pass the source model's Hugging Face checkpoint directory or "
                        "a reference file written with --save-reference")


def save_reference(path, rows: list[RefRows], plan: "Plan", name: str, top_k: int = DEFAULT_TOP_K) -> Path:
    path = Path(path)
    kept = [r.top(top_k) for r in rows]
    offsets = np.cumsum([0] + [len(d) for d in plan.docs])
    arrays = {"format": np.array(REFERENCE_FORMAT), "reference": np.array(name),
              "vocab_size": np.array(plan.vocab_size), "window": np.array(plan.window),
              "prefix_token": np.array(plan.prefix_token), "top_k": np.array(min(top_k, plan.vocab_size)),
              "doc_tokens": np.array([t for d in plan.docs for t in d], dtype=np.int32),
              "doc_offsets": offsets.astype(np.int64),
              "targets": np.array([t for _, cont in plan.windows for t in cont], dtype=np.int32),
              "top_ids": np.concatenate([r.ids for r in kept]).astype(np.int32),
              "top_logprobs": np.concatenate([r.logprobs for r in kept]).astype(np.float32),
              **{f: np.concatenate([getattr(r, f) for r in kept]).astype(np.int32 if f == "argmax" else np.float32)
                 for f in ("tail_logmass", "logsumexp", "target_logprob", "argmax")}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:  # a file object: numpy would append .npz to a name
        np.savez_compressed(fh, **arrays)
    return path


# --- measuring -------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What will be scored: the documents' tokens and their windows (truncated to max_tokens)."""
    lm: object
    reference: object
    docs: list[list[int]]
    windows: list[tuple[list[int], list[int]]]
    window: int
    prefix_token: int
    vocab_size: int
    tokens: int = 0
    model_name: str = ""

    def describe(self) -> str:
        return (f"scoring {self.tokens} tokens of {len(self.docs)} document(s) in {len(self.windows)} window(s) of "
                f"{self.window}: {self.tokens} infer calls (ANEMLL's prefill returns no logits; --max-tokens bounds "
                "the cost)")


def read_text(path) -> str:
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FidelityError(f"{p}: no such text file; pass a UTF-8 text file with --text") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise FidelityError(f"{p}: not a UTF-8 text file ({type(e).__name__}); pass plain text with --text") from None


def plan(model, reference, texts=(), max_tokens: int | None = None) -> Plan:
    from .harness import ANELM

    texts = list(texts)
    if max_tokens is not None and max_tokens < 1:
        raise FidelityError(f"--max-tokens {max_tokens}: must be at least 1")
    if reference.stored:
        if reference.window > model.context_length:
            raise FidelityError(f"{reference.path}: made with windows of {reference.window} tokens, longer than the "
                                f"model's context {model.context_length}")
        lm = ANELM(model=model, max_length=reference.window)
        if lm.prefix_token_id != reference.prefix_token or model.vocab_size != reference.vocab_size:
            raise FidelityError(f"{reference.path}: made with another tokenizer (prefix token "
                                f"{reference.prefix_token}, vocabulary {reference.vocab_size}; the model has "
                                f"{lm.prefix_token_id}, {model.vocab_size})")
        docs = reference.doc_tokens
        if texts and [lm.tok_encode(t) for t in texts] != docs:
            raise FidelityError(f"{reference.path}: the --text files tokenize differently from the stored text; "
                                "drop --text (the reference holds its tokens) or save a new reference")
        limit = reference.positions if max_tokens is None else min(max_tokens, reference.positions)
    else:
        if not texts:
            raise FidelityError("no text to score: pass --text FILE (a checkpoint reference needs the text)")
        if reference.vocab_size != model.vocab_size:
            raise FidelityError(f"{reference.path}: the reference has {reference.vocab_size} logits, the model "
                                f"{model.vocab_size}; compare a conversion with its own source checkpoint")
        lm = ANELM(model=model)
        docs = [lm.tok_encode(t) for t in texts]
        limit = max_tokens
    windows, total = [], 0
    for d in docs:
        for ctx, cont in lm.rolling_windows(d):
            if limit is not None and total + len(cont) > limit:
                cont = cont[:limit - total]
            if cont:
                windows.append((ctx, cont))
                total += len(cont)
    if total == 0:
        raise FidelityError("the text has no tokens to score")
    return Plan(lm, reference, docs, windows, lm.max_length, lm.prefix_token_id, model.vocab_size, total,
                model.name)


def run(plan: Plan, save: str | None = None, top_k: int = DEFAULT_TOP_K, progress: bool = True) -> dict:
    """Score every planned position; returns the report (see `summarize`) with per-position arrays under
    "positions". With `save`, the reference's rows are written as a stored reference."""
    from tqdm import tqdm

    parts, kept, scored = [], [], 0
    psnr = {"sq_err": 0.0, "count": 0, "peak": 0.0, "width": None}
    with tqdm(total=plan.tokens, desc="fidelity", unit="tok", disable=not progress or None) as bar:
        for ctx, cont in plan.windows:
            targets, rows = [], []
            for target, row in plan.lm.continuation_logits(ctx, cont):
                targets.append(target)
                rows.append(row)
                bar.update(1)
            inp = (ctx + cont)[-(plan.window + 1):][:-1]
            ref = plan.reference.rows(inp, targets, scored)
            scored += len(targets)
            logits = np.stack(rows)
            if logits.shape[1] != plan.vocab_size:
                raise FidelityError(f"the model returned {logits.shape[1]} logits, expected {plan.vocab_size}")
            for a in range(0, len(targets), BLOCK):
                s = slice(a, a + BLOCK)
                block = RefRows(*(None if v is None else v[s] for v in (ref.logprobs, ref.ids, ref.tail_logmass,
                                                                       ref.logsumexp, ref.target_logprob,
                                                                       ref.argmax)))
                c = compare(block, logits[s], targets[s])
                parts.append(c)
                psnr["sq_err"] += c["sq_err"]
                psnr["count"] += c["count"]
                psnr["peak"] = max(psnr["peak"], c["peak"])
                psnr["width"] = c["width"]
            if save:
                kept.append(ref)
    positions = {k: np.concatenate([p[k] for p in parts]) for k in
                 ("kld", "bound", "nll_model", "nll_reference", "same_top", "dp")}
    report = summarize(positions, psnr, plan)
    if save:
        save_reference(save, kept, plan, str(plan.reference.path), top_k)
    report["positions"] = positions
    return report


def _mean_se(x: np.ndarray) -> tuple[float, float | None]:
    n = len(x)
    mean = float(np.mean(x))
    return mean, (float(np.std(x, ddof=1) / math.sqrt(n)) if n > 1 else None)


def summarize(pos: dict, psnr: dict, plan: Plan) -> dict:
    kld = pos["kld"]
    n = len(kld)
    mean_kld, kld_se = _mean_se(kld)
    top1 = float(np.mean(pos["same_top"]))
    log_ratio, log_ratio_se = _mean_se(pos["nll_model"] - pos["nll_reference"])
    mean_dp, dp_se = _mean_se(pos["dp"])
    rmse = math.sqrt(psnr["sq_err"] / psnr["count"])
    stored = plan.reference.stored
    return {
        "tokens": n, "mean_kld": mean_kld, "mean_kld_stderr": kld_se,
        "median_kld": float(np.median(kld)), "p90_kld": float(np.percentile(kld, 90)),
        "p99_kld": float(np.percentile(kld, 99)), "max_kld": float(np.max(kld)),
        "top1_agreement": top1, "top1_agreement_stderr": math.sqrt(top1 * (1 - top1) / (n - 1)) if n > 1 else None,
        "ppl_model": math.exp(float(np.mean(pos["nll_model"]))),
        "ppl_reference": math.exp(float(np.mean(pos["nll_reference"]))),
        "ppl_ratio": math.exp(log_ratio),
        "ppl_ratio_stderr": None if log_ratio_se is None else math.exp(log_ratio) * log_ratio_se,
        "mean_dp": mean_dp, "mean_dp_stderr": dp_se, "rms_dp": math.sqrt(float(np.mean(pos["dp"] ** 2))),
        "logit_psnr_db": math.inf if rmse == 0 else 20 * math.log10(psnr["peak"] / rmse),
        "logit_psnr_scope": f"reference top-{psnr['width']} logits" if stored else f"all {psnr['width']} logits",
        "kld_error_bound": float(np.mean(pos["bound"])),
        "model": plan.model_name, "reference": plan.reference.describe(),
        "documents": len(plan.docs), "windows": len(plan.windows), "window": plan.window, "infer_calls": n,
    }


# --- verdicts and output -----------------------------------------------------------------------------------------
def gate_record(report: dict) -> dict:
    """The report as a gate record (metrics with stderr, directions), so thresholds use the suite's rules."""
    return {"metrics": {m: {"value": report[m], "stderr": report.get(f"{m}_stderr")} for m in METRICS
                        if report.get(m) is not None and math.isfinite(report[m])},
            "higher_is_better": HIGHER_IS_BETTER, "version": None, "n-shot": None, "limit": report["tokens"],
            "model": {}}


def check(report: dict, thresholds: dict, show=()):
    """Gate rows of the thresholded metrics (`{mean_kld: {max: 0.05}, top1_agreement: 0.95}`) and of `show`."""
    from . import gate

    unknown = sorted(set(thresholds) - set(METRICS))
    if unknown:
        raise FidelityError(f"fidelity thresholds on unknown metrics {unknown}; known: {', '.join(METRICS)}")
    rows = gate.evaluate_gate("fidelity", gate_record(report), thresholds)
    return [r for r in rows if r.metric in thresholds or r.metric in show]


def format_report(report: dict) -> str:
    def v(key, digits=6):
        x = report[key]
        se = report.get(f"{key}_stderr")
        return f"{x:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")

    ceiling = report["mean_kld"] + report["kld_error_bound"]
    lines = [f"fidelity of {report['model']} against {report['reference']}",
             f"{report['tokens']} tokens ({report['documents']} document(s), {report['windows']} window(s) of "
             f"{report['window']}; {report['infer_calls']} infer calls)",
             f"  mean KLD        {v('mean_kld')}" + (f"   (full KLD at most {ceiling:.6f}: stored top-k)"
                                                      if report["kld_error_bound"] else ""),
             f"  median KLD      {v('median_kld')}", f"  p90 KLD         {v('p90_kld')}",
             f"  p99 KLD         {v('p99_kld')}", f"  max KLD         {v('max_kld')}",
             f"  top-1 agreement {v('top1_agreement', 4)}",
             f"  PPL model       {v('ppl_model', 4)}", f"  PPL reference   {v('ppl_reference', 4)}",
             f"  PPL ratio       {v('ppl_ratio', 6)}",
             f"  mean Δp         {v('mean_dp', 6)}", f"  RMS Δp          {v('rms_dp', 6)}",
             f"  logit PSNR      {report['logit_psnr_db']:.2f} dB ({report['logit_psnr_scope']})"]
    return "\n".join(lines)


def json_report(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "positions"}
