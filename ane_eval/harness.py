"""ANELM: an lm-evaluation-harness model ("ane") that scores exactly like lm-eval's HF backend, fast.

Exactness: tokenization, truncation and scoring follow HFLM — `(context + continuation)[-(max_length + 1):][:-1]`
is the input, the last len(continuation) positions are scored, `is_greedy` needs every continuation token to be the
argmax; rolling perplexity uses lm-eval's own disjoint windows, so every token is scored exactly once.

Speed: requests are sorted by token sequence so shared prefixes are adjacent; the KV cache keeps the longest common
prefix with the previous request (the position is rewound, stale slots are masked — no state copy), only new
context tokens are prefilled, and logits already computed for a shared position are reused, so the choices of a
multiple-choice question cost one context prefill and one `infer` per distinct continuation token.
`prefix_reuse=False` is the naive algorithm (a fresh prefill for every request), kept for parity tests and
benchmarks.

An argmax LM head (ANEMLL 0.3.5 `argmax_in_model`) gives the greedy token and no distribution: greedy generation
is exact, and loglikelihood, multiple-choice and rolling requests are refused before any of them runs
(`NoDistributionError`, one line) — a score computed without a distribution would be a wrong number.

Data parallel: launched by torchrun (or accelerate launch), ANELM joins the process group and exposes lm-eval's
hooks (rank, world_size, all_gather, gather_object, barrier; see distributed.py), so lm-eval's evaluate() splits
every task's documents over the processes and gathers the results on rank 0.
"""
from __future__ import annotations

import logging

import numpy as np
from tqdm import tqdm

import lm_eval.models  # noqa: F401  (registers the built-in models first: registering before it hides them)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (_add_special_kwargs, handle_stop_sequences, has_bos_prefix,
                                  normalize_gen_kwargs, postprocess_generated_text)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from .distributed import Group

log = logging.getLogger("ane_eval")

ROW_CACHE = 64  # logits rows kept for reuse (positions of the current prefix)
SMALL_PREFILL = 2  # fewer new context tokens than this are fed with infer (a prefill pays for a whole batch)
SAMPLING_KWARGS = {"do_sample", "temperature", "until", "max_gen_toks"}
SCORED_OUTPUT_TYPES = ("loglikelihood", "multiple_choice", "loglikelihood_rolling")  # lm-eval's, need a distribution


class NoDistributionError(ValueError):
    """The model's LM head returns only the argmax per vocabulary chunk, so likelihoods cannot be computed."""


def no_distribution(model, what: str) -> NoDistributionError:
    return NoDistributionError(
        f"{model.name}: its LM head returns only the argmax of each vocabulary chunk (argmax_in_model), not a "
        f"distribution, so {what} cannot be scored; evaluate generation (generate_until) tasks with greedy "
        "decoding, or convert the model without --argmax")


class PrefixCache:
    """Tracks what the model's KV cache holds and the rows computed for it: logits, or the greedy token for an
    argmax head."""

    def __init__(self, model, reuse: bool = True):
        self.model, self.reuse = model, reuse
        self.rows: dict[int, np.ndarray | int] = {}
        self._step = model.infer if getattr(model, "head", "logits") == "logits" else model.next_token

    def _truncate(self, length: int) -> None:
        self.rows = {p: r for p, r in self.rows.items() if p < length}

    def feed(self, inp: list[int], upto: int) -> None:
        """Make the cache hold inp[:upto]: keep the common prefix, prefill (or infer) the rest. Rows stay valid as far
        as the cache agrees with inp, past `upto` too (the choices of a question share the row at their context's
        last token)."""
        if self.reuse:
            history = self.model.history
            common = 0
            limit = min(len(history), len(inp))
            while common < limit and history[common] == inp[common]:
                common += 1
        else:
            self.model.reset()
            common = 0
        self._truncate(common)
        common = min(common, upto)
        if upto - common <= 0:
            return
        if upto - common < SMALL_PREFILL:
            for p in range(common, upto):
                self.rows[p] = self._step(inp[p], p)
        else:
            self.model.prefill(inp[common:upto], start=common)
            self._truncate(common)

    def row(self, inp: list[int], p: int):
        """Logits (or an argmax head's greedy token) for the token after position p (inp[:p+1] must be the cached
        prefix up to p-1 plus inp[p])."""
        history = self.model.history
        if p in self.rows and len(history) > p and history[:p + 1] == inp[:p + 1]:
            return self.rows[p]
        row = self._step(inp[p], p)
        self._truncate(p)
        self.rows[p] = row
        if len(self.rows) > ROW_CACHE:
            for old in sorted(self.rows)[:len(self.rows) - ROW_CACHE]:
                del self.rows[old]
        return row


def log_softmax_at(row: np.ndarray, target: int) -> float:
    m = float(row.max())
    return float(row[target]) - (m + float(np.log(np.exp(row - m, dtype=np.float64).sum())))


@register_model("ane")
class ANELM(TemplateLM):
    """lm_eval model "ane": model_args model_dir, backend, precision, compute_units, max_length, prefix_reuse,
    max_gen_toks, seed, add_bos_token, dist_timeout (seconds per collective when data parallel)."""

    def __init__(self, model_dir: str = "demo", backend: str = "auto", precision: str = "fp16",
                 compute_units: str = "CPU_AND_NE", max_length: int | None = None, prefix_reuse: bool = True,
                 max_gen_toks: int = 256, seed: int = 1234, add_bos_token: bool | None = None, model=None,
                 batch_size=1, dist_timeout: float | None = None, group: Group | None = None, **ignored):
        super().__init__()
        self.group = group or Group(timeout=dist_timeout)  # before the model loads: a bad launch fails fast
        self._rank, self._world_size = self.group.rank, self.group.world_size
        if model is None:
            from .model import load_model, resolve_model
            model = load_model(resolve_model(str(model_dir)), backend=backend, precision=precision,
                               compute_units=compute_units)
        self.model = model
        self.tokenizer = model.tokenizer
        self.prefix_reuse = _as_bool(prefix_reuse)
        if max_length is not None and int(max_length) > model.context_length:
            raise ValueError(f"max_length {max_length} exceeds the model's compiled context {model.context_length}")
        self._max_length = int(max_length) if max_length else model.context_length
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = None if add_bos_token is None else _as_bool(add_bos_token)
        self._rng = np.random.default_rng(int(seed))
        self.cache = PrefixCache(model, reuse=self.prefix_reuse)
        self.truncated = 0  # requests longer than the context, left-truncated like HFLM
        if str(batch_size) not in ("1", "auto", "None"):
            log.info("ane: batch_size %s ignored: an ANE model evaluates requests serially", batch_size)
        ignored.pop("device", None)
        ignored.pop("max_batch_size", None)
        if ignored:
            raise ValueError(f"ane: unknown model_args {sorted(ignored)}; see ane_eval.harness.ANELM")

    # --- lm-eval's data-parallel hooks (evaluate() calls them when world_size > 1) -------------------------------
    def all_gather(self, tensor):
        return self.group.all_gather(tensor)

    def gather_object(self, obj, dst=0):
        return self.group.gather_object(obj, dst=dst)

    def barrier(self) -> None:
        self.group.barrier()

    # --- tokenization (as HFLM) ------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def has_distribution(self) -> bool:
        """False for an argmax LM head: only generation tasks (greedy) can be evaluated."""
        return getattr(self.model, "head", "logits") == "logits"

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # --- scoring ---------------------------------------------------------------------------------------------
    def continuation_logits(self, context: list[int], continuation: list[int]):
        """(target, logits row) for each continuation token, lazily: the model's next-token logits at every scored
        position of HFLM's input `(context + continuation)[-(max_length + 1):][:-1]`."""
        if len(continuation) > self.max_length:
            raise ValueError(f"a continuation of {len(continuation)} tokens cannot be scored within the "
                             f"{self.max_length}-token context")
        full = (context + continuation)[-(self.max_length + 1):]
        if len(context) + len(continuation) > len(full):
            self.truncated += 1
        inp = full[:-1]
        first = len(inp) - len(continuation)
        self.cache.feed(inp, first)
        for p in range(first, len(inp)):
            yield full[p + 1], self.cache.row(inp, p)

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        if not continuation:
            return 0.0, True
        total, greedy = 0.0, True
        for target, row in self.continuation_logits(context, continuation):
            total += log_softmax_at(row, target)
            greedy = greedy and int(row.argmax()) == target
        return total, greedy

    def rolling_windows(self, tokens: list[int]) -> list[tuple[list[int], list[int]]]:
        """lm-eval's disjoint rolling windows of a token sequence (prefix token first): every token scored once."""
        return [make_disjoint_window(w) for w in get_rolling_token_windows(
            token_list=list(tokens), prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        # TemplateLM tokenizes under a progress bar of its own: ranks > 0 show none (as HFLM's bars)
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.rank != 0)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        if not self.has_distribution:
            raise no_distribution(self.model, f"{len(requests)} loglikelihood request(s)")
        # shared prefixes adjacent: lexicographic order of the (truncated) input tokens
        order = sorted(range(len(requests)), key=lambda i: (requests[i][1] + requests[i][2])[-(self.max_length + 1):])
        results: list = [None] * len(requests)
        before = self.truncated
        for i in tqdm(order, disable=disable_tqdm or self.rank != 0, desc="ane loglikelihood"):
            key, context, continuation = requests[i]
            results[i] = self._score(list(context), list(continuation))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, results[i])
        if self.truncated > before:
            log.warning("ane: %d request(s) longer than the %d-token context were left-truncated (as HFLM does)",
                        self.truncated - before, self.max_length)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        if not self.has_distribution:
            raise no_distribution(self.model, f"{len(requests)} rolling loglikelihood request(s)")
        out = []
        quiet = disable_tqdm or self.rank != 0
        for (string,) in tqdm([r.args for r in requests], disable=quiet, desc="ane rolling loglikelihood"):
            windows = self.rolling_windows(self.tok_encode(string))
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            total = sum(s for s, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # --- generation ------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        jobs = []
        for context, gen_kwargs in [r.args for r in requests]:  # every request checked before any runs
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            unsupported = sorted(set(kwargs) - SAMPLING_KWARGS)
            if unsupported:
                raise ValueError(f"ane: generation kwargs {unsupported} are not supported; use greedy decoding "
                                 "(do_sample=False) or temperature sampling")
            sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0.0) > 0
            if sample and not self.has_distribution:
                raise no_distribution(self.model, "sampled generation (do_sample with a temperature)")
            jobs.append((context, gen_kwargs, until, int(kwargs["max_gen_toks"]), sample,
                         float(kwargs.get("temperature") or 0.0)))
        out, quiet = [], disable_tqdm or self.rank != 0
        for context, gen_kwargs, until, max_gen_toks, sample, temperature in tqdm(jobs, disable=quiet,
                                                                                  desc="ane generate"):
            text = self._generate(context, until, max_gen_toks, sample, temperature)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def _generate(self, context: str, until: list[str], max_gen_toks: int, do_sample: bool, temperature: float):
        room = self.max_length - max_gen_toks
        if room <= 0:
            raise ValueError(f"max_gen_toks {max_gen_toks} leaves no room for the context in the "
                             f"{self.max_length}-token window")
        ids = self.tok_encode(context, left_truncate_len=room) or [self.prefix_token_id]
        self.cache.feed(ids, len(ids) - 1)
        pos, token, generated = len(ids) - 1, ids[-1], []
        seq = list(ids)
        while len(generated) < max_gen_toks and pos < self.max_length:
            row = self.cache.row(seq, pos)
            token = self._pick(row, do_sample, temperature) if self.has_distribution else row
            if token == self.eot_token_id:
                break
            generated.append(token)
            seq.append(token)
            pos += 1
            text = self.tok_decode(generated)
            if any(stop and stop in text for stop in until):
                break
        return postprocess_generated_text(generation=self.tok_decode(generated), stop=until, think_end_token=None)

    def _pick(self, row: np.ndarray, do_sample: bool, temperature: float) -> int:
        if not do_sample or temperature <= 0:
            return int(row.argmax())
        z = row.astype(np.float64) / temperature
        p = np.exp(z - z.max())
        return int(self._rng.choice(len(p), p=p / p.sum()))


def _as_bool(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)
