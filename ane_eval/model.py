"""ANEModel: the prefill/infer protocol over embeddings -> FFN chunks -> LM head (ANEMLL-CONTRACT.md §4), or over
one monolithic file taking input_ids (ANEMLL 0.3.5).

One KV-cache state is shared by every chunk and both functions. The model remembers which tokens its cache
holds (`history`), so a caller can rewind to a shared prefix and feed only the new tokens: stale slots beyond the
current position are hidden by the causal mask and overwritten later, so no state copy is ever needed.

An argmax head (0.3.5 `argmax_in_model`) returns one (local index, value) pair per vocabulary chunk and no
distribution: `next_token` works for every head, `infer` (logits) only for logits heads.
"""
from __future__ import annotations

import concurrent.futures
from pathlib import Path

import numpy as np

from . import contract, memory
from .backends import select
from .bundle import discover, load_tokenizer
from .contract import ContractError


class ContextOverflowError(ValueError):
    pass


class NoLogitsError(ValueError):
    """The model's LM head returns only the argmax per vocabulary chunk: there are no logits to give."""


def update_mask(width: int, batch_pos: int, batch: int, dtype=np.float16) -> np.ndarray:
    """fp16 (1, 1, width, B): 1 at [batch_pos + i, i], where row i of a prefill batch is written (chat.py
    make_update_mask); 0 and 1 are exact in fp16, so `dtype` float32 holds the same values."""
    mask = np.zeros((1, 1, width, batch), dtype=dtype)
    rows = np.arange(batch)
    keep = batch_pos + rows < width
    mask[0, 0, (batch_pos + rows)[keep], rows[keep]] = 1
    return mask


def causal_mask(context: int, first: int = 0, rows: int | None = None, dtype=np.float16) -> np.ndarray:
    """Additive fp16 (1, 1, rows, C) for the queries at positions first.. (all C by default): 0 where key <= query,
    -inf elsewhere (both exact in fp16, so `dtype` float32 holds the same values). Built per call: the whole
    C x C mask of a 4096-token context would hold 32 MB."""
    queries = np.arange(first, first + (context if rows is None else rows))[:, None]
    return np.where(np.arange(context) <= queries, dtype(0), dtype(-np.inf))[None, None]


def resolve_model(arg) -> Path:
    """A model directory argument: `demo` stands for the embedded demo model (built on first use)."""
    if str(arg) == "demo":
        from . import demo
        return demo.model_dir()
    return Path(arg)


class ANEModel:
    def __init__(self, model_dir, backend: str = "auto", precision: str = "fp16", compute_units: str = "CPU_AND_NE"):
        self.backend_impl = select(backend, precision=precision, compute_units=compute_units)
        self.backend = self.backend_impl.name
        self.precision = precision
        self.bundle = discover(Path(model_dir), backend=self.backend)
        b = self.bundle
        # the tokenizer (importing transformers: 2-5 s) loads on a thread while the weights are read, which mostly
        # waits on the disk, page faults and numpy with the GIL released
        tokenizer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ane-eval-tokenizer")
        pending = tokenizer.submit(load_tokenizer, b)
        tokenizer.shutdown(wait=False)
        self._load_parts(b, precision, pending)
        self.tokenizer = pending.result()
        width = None if self.monolithic else self._embedding_width()
        self.geometry = contract.cross_check(b, self.parts, len(self.tokenizer), embeddings_width=width)
        self.context_length = self.geometry.context_length
        self.batch_size = self.geometry.batch_size
        self.mask_width = self.geometry.mask_width or self.context_length  # attention_size (0.3.5)
        self.rotates = "infer_rotate" in self._chunks[0]  # positions >= sliding_window use the rotate functions
        self.num_chunks = len(b.chunks)
        self.head = self.geometry.head  # "logits" or "argmax"
        self.prefill_rule = b.layout.prefill_rule
        self._hints = {"hidden_states": f"pad to the compiled batch {self.batch_size}",
                       "input_ids": f"input_ids are int32 of shape (1, 1) or (1, {self.batch_size})",
                       "causal_mask": f"the mask is fp16 (1, 1, rows, {self.mask_width})",
                       "position_ids": "position_ids are int32", "current_pos": "current_pos is int32 (1,)"}
        self.boundary = self.backend_impl.boundary
        # the dtype our own fp16 tensors (masks) cross the boundary in: float32 on CoreML, where coremltools would
        # otherwise convert each fp16 array into a temporary float32 copy of its own
        self._fp16 = self.boundary.fp16_dtypes[0]
        self._in_flight: dict = {}
        self.token_evaluations = 0  # embedding rows pushed through the chunks (prefill rows + infer tokens)
        self.reset()

    def _load_parts(self, b, precision: str, tokenizer) -> None:
        """Every part, loaded; a tokenizer that failed (`tokenizer`: its pending load) stops it between parts."""
        def tokenizer_failed() -> None:
            if tokenizer.done() and tokenizer.exception() is not None:
                raise tokenizer.exception()
        self.parts = contract.describe_parts(b)
        if self.backend == "mil":  # what the portable runtime will hold: refused at once when it cannot fit
            self.resident_bytes = memory.model_resident_bytes(b, self.parts, precision)
            memory.check_fits(self.resident_bytes["total"], f"{b.root} ({precision}, portable runtime)")
        self.monolithic = b.monolithic is not None
        # the parts with infer/prefill functions sharing the state
        self.chunk_parts = [self.parts[contract.MONOLITHIC]] if self.monolithic else contract.chunks_of(self.parts)
        load = self.backend_impl.load
        self._chunks = []
        for i in range(len(self.chunk_parts)):
            tokenizer_failed()
            self._chunks.append(self._load_functions(i))
        tokenizer_failed()
        self._embeddings = None if self.monolithic else load(b.embeddings)
        self._lm_head = None if self.monolithic else load(b.lm_head)

    # --- properties ------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def vocab_size(self) -> int:
        return sum(self.geometry.logits_widths) if self.geometry.logits_widths else len(self.tokenizer)

    @property
    def state(self):
        """The KV-cache state object shared by every chunk (the backend's: `read_state`/`write_state` by name)."""
        return self._state

    @property
    def history(self) -> list[int]:
        """Tokens whose keys/values the cache holds at positions 0..len-1."""
        return list(self._history)

    def __repr__(self) -> str:
        layout = "monolithic" if self.monolithic else f"chunks={self.num_chunks}"
        return (f"<ANEModel {self.name} backend={self.backend_impl.describe()} context={self.context_length} "
                f"batch={self.batch_size} {layout} head={self.head}>")

    # --- protocol --------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """A fresh zeroed state: nothing from an earlier prompt can leak into the next. Every state the chunks
        declare (local and global caches for Gemma 3) is made at once and passed to every call."""
        self._state = self._chunks[0]["prefill"][0].make_state()
        self._history: list[int] = []
        self._next = 0  # the position after the last one written since the reset

    def prefill(self, token_ids, start: int = 0) -> None:
        """Put `token_ids` at positions start.. in the cache, by the layout's prefill rule (meta.Layout.prefill_rule):
        0.3.4 in batches of the compiled size (the last right-padded); 0.3.5 full batches only, the rest token by
        token through `infer`. Positions before `start` must already hold the caller's prefix (earlier calls)."""
        ids = [int(t) for t in token_ids]
        if start < 0 or start > len(self._history):
            raise ValueError(f"prefill start {start} is beyond the {len(self._history)} tokens in the cache")
        end = start + len(ids)
        if end > self.context_length:
            raise ContextOverflowError(f"prefill of {len(ids)} tokens from position {start} ends at {end}, past the "
                                       f"context length {self.context_length}; truncate the input")
        seq = self._history[:start] + ids
        self._prepare_write(start)
        self._history = seq
        B, C = self.batch_size, self.context_length
        if self.prefill_rule != "padded":
            # chat.py run_prefill: `while batch_pos + batch_size <= context_pos` through prefill, then the remaining
            # tokens one at a time through infer ("avoids padding issues"); no LM head is needed for them
            self._feed(start, end, seq)
            return
        pos = start
        while pos < end:
            # a batch never runs past the context end: start it earlier and re-feed tokens already in the cache
            batch_pos = min(pos, C - B)
            rows = seq[batch_pos:batch_pos + B]
            self._run_prefill(batch_pos, rows + [0] * (B - len(rows)))
            pos = batch_pos + B

    def infer(self, token_id: int, pos: int) -> np.ndarray:
        """Logits (V,) float32 for the token after position `pos`, given `token_id` at `pos` and the cached
        prefix 0..pos-1 (which must be in the cache). Argmax heads have none: use `next_token`."""
        if self.head != "logits":
            raise NoLogitsError(f"{self.name}: the LM head returns only the argmax of each vocabulary chunk "
                                "(argmax_in_model), no logits; use next_token for greedy decoding")
        out = self._infer_at(token_id, pos)
        return np.concatenate([out[f"logits{k}"].reshape(-1)
                               for k in range(1, len(self.geometry.logits_widths) + 1)]).astype(np.float32)

    def next_token(self, token_id: int, pos: int) -> int:
        """The greedy token after position `pos` (as `infer`, for any head)."""
        if self.head == "logits":
            return int(self.infer(token_id, pos).argmax())
        out = self._infer_at(token_id, pos)
        # chat.py generate_next_token: the chunk with the largest value wins; its local index plus the chunk's
        # offset is the token (first chunk on ties, as an argmax over the concatenated logits)
        idx, val = out["argmax_idx"].reshape(-1), out["argmax_val"].reshape(-1).astype(np.float32)
        widths = self.geometry.logits_widths
        if idx.shape != (len(widths),) or val.shape != idx.shape:
            raise ContractError(f"{self.name}: the LM head returned {idx.size} argmax pairs for {len(widths)} "
                                "vocabulary chunks")
        best = int(np.argmax(val))
        local = int(idx[best])
        if not 0 <= local < widths[best]:
            raise ContractError(f"{self.name}: argmax_idx {local} of vocabulary chunk {best} is outside its "
                                f"{widths[best]} entries")
        return self.geometry.chunk_offsets[best] + local

    # --- internals -------------------------------------------------------------------------------------------
    def _load_functions(self, i: int) -> dict:
        """Stage i's functions: name -> (predictor, Part). infer/prefill from the chunk (or monolithic) file; with a
        context past meta.yaml's sliding_window, infer_rotate/prefill_rotate too, from the split-rotate `_rot` file
        when there is one (combine_models.py combine_chunks_split_rotate), else from the chunk file (chat.py
        load_models)."""
        b, load = self.bundle, self.backend_impl.load
        main = self.chunk_parts[i]
        if self.monolithic:
            return {fn: (load(b.monolithic, fn), main) for fn in ("infer", "prefill")}
        rot = self.parts.get(f"chunk{i + 1:02d}_rot")
        found = {fn: (load(b.chunks[i], fn), main) for fn in ("infer", "prefill")}
        for fn in contract.expected_rotate_functions(b.layout, b.meta_int("context_length")):
            path, part = (b.rotate_chunks[i], rot) if b.rotate_chunks else (b.chunks[i], main)
            try:
                found[fn] = (load(path, fn), part)
            except (ValueError, RuntimeError, KeyError) as e:
                raise ContractError(f"{path.name}: meta.yaml sliding_window {b.layout.sliding_window} is shorter "
                                    f"than the context, but the {fn} function cannot be loaded ({e}); re-convert "
                                    "with rotate functions") from None
        return found

    def _infer_function(self, pos: int) -> str:
        """Functions chosen by position (chat.py): past the sliding window the local cache rotates."""
        return "infer_rotate" if self.rotates and pos >= self.bundle.layout.sliding_window else "infer"

    def _prefill_function(self, batch_pos: int) -> str | None:
        """The prefill function for a full batch at batch_pos, or None when it must go token by token: a filling
        batch must end inside the window, a rotating one start past it (chat.py
        run_monolithic_prefill_with_rotation)."""
        if not self.rotates:
            return "prefill"
        sw = self.bundle.layout.sliding_window
        if batch_pos + self.batch_size <= sw:
            return "prefill"
        return "prefill_rotate" if batch_pos >= sw else None

    def _prepare_write(self, pos: int) -> None:
        """Once the local cache has rotated it holds only the last window before `_next`: writing anywhere else
        (a rewind to a shared prefix) cannot reuse it, so the prefix is replayed from a fresh state. Without
        rotation a rewind just overwrites (the mask hides stale slots)."""
        if self.rotates and self._next > self.bundle.layout.sliding_window and pos != self._next:
            prefix = self._history[:pos]
            self._state = self._chunks[0]["prefill"][0].make_state()
            self._feed(0, len(prefix), prefix)
        self._next = pos

    def _feed(self, start: int, end: int, seq: list[int]) -> None:
        """0.3.5's prefill rule (chat.py run_prefill): full batches through a prefill function ("full_batches"),
        the rest token by token through infer / infer_rotate (no LM head needed); no padded batch. With rotate
        functions a batch that would straddle the sliding window goes token by token too."""
        B, pos = self.batch_size, start
        while pos < end:
            fn = self._prefill_function(pos) if self.prefill_rule == "full_batches" and pos + B <= end else None
            if fn is None:
                self._run_infer(seq[pos], pos, head=False)
                pos += 1
            else:
                self._run_prefill(pos, seq[pos:pos + B], fn)
                pos += B

    def _infer_at(self, token_id: int, pos: int) -> dict:
        """A caller's token at `pos` (infer, next_token): the cache keeps 0..pos-1 and drops what followed."""
        if pos < 0 or pos > len(self._history):
            raise ValueError(f"infer at position {pos} needs positions 0..{pos - 1} in the cache, which holds "
                             f"{len(self._history)}")
        if pos >= self.context_length:
            raise ContextOverflowError(f"position {pos} is past the context length {self.context_length}; "
                                       "truncate the input")
        self._prepare_write(pos)
        self._history = self._history[:pos] + [int(token_id)]
        return self._run_infer(token_id, pos)

    def _run_infer(self, token_id: int, pos: int, head: bool = True) -> dict:
        """One token through `infer` (or `infer_rotate` past the window) at `pos`, the next position to write;
        the LM head's outputs (with `head`). `history` is the caller's: a prefill feeding tokens between its
        batches has set it to the whole prompt already."""
        fn = self._infer_function(pos)
        position = np.array([pos], dtype=np.int32)
        inputs = {"position_ids": position, "causal_mask": causal_mask(self.mask_width, pos, 1, self._fp16),
                  "current_pos": position}
        ids = np.array([[token_id]], dtype=np.int32)
        self.token_evaluations += 1
        self._next = pos + 1
        if self.monolithic:  # chat.py generate_next_token_monolithic: input_ids straight in, head outputs out
            predictor, part = self._chunks[0][fn]
            return self._call(predictor, part, fn, {"input_ids": ids, **inputs})
        hidden = self._embed(ids)
        for chunk in self._chunks:
            predictor, part = chunk[fn]
            hidden = self._call(predictor, part, fn, {"hidden_states": hidden, **inputs})["output_hidden_states"]
        return self._call(self._lm_head, self.parts["lm_head"], None, {"hidden_states": hidden}) if head else {}

    def _run_prefill(self, batch_pos: int, rows: list[int], fn: str = "prefill") -> None:
        B = self.batch_size
        ids = np.array([rows], dtype=np.int32)
        inputs = {"position_ids": np.arange(batch_pos, batch_pos + B, dtype=np.int32),
                  "causal_mask": causal_mask(self.mask_width, batch_pos, B, self._fp16),
                  "current_pos": np.array([batch_pos], dtype=np.int32)}
        self.token_evaluations += B
        self._next = batch_pos + B
        if self.monolithic:  # chat.py run_monolithic_prefill; its logits (row 0) are discarded
            predictor, part = self._chunks[0][fn]
            self._call(predictor, part, fn, {"input_ids": ids, **inputs})
            return
        hidden = self._embed(ids)
        for chunk in self._chunks:
            predictor, part = chunk[fn]
            extra = {}
            declared = (part.feature(fn, "inputs", "update_mask") is not None if part is not None
                        else self.bundle.layout.update_mask_prefill and fn == "prefill")  # compiled: trust meta.yaml
            if declared:  # declared: static KV writes through the mask
                extra["update_mask"] = update_mask(self.mask_width, batch_pos, B, self._fp16)
            out = self._call(predictor, part, fn, {"hidden_states": hidden, **inputs, **extra})
            hidden = out["output_hidden_states"]  # the last chunk's prefill output is row 0 only: discarded

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        return self._call(self._embeddings, self.parts["embeddings"], None, {"input_ids": ids})["hidden_states"]

    def _call(self, predictor, part, function, inputs: dict) -> dict:
        if part is not None:
            where = f"{part.name} {function}" if function else part.name
            contract.check_inputs(where, part.signature(function), inputs, self._hints, boundary=self.boundary)
        # CoreML keeps the NumPy buffers it was given inside objects it releases later on its own queue: keep each
        # part's inputs referenced until that part is called again
        self._in_flight[id(predictor)] = inputs
        state = self._state if function else None
        return predictor.predict(inputs, state) if state is not None else predictor.predict(inputs)

    def _embedding_width(self) -> int | None:
        """The embeddings declare no output shape: run one token to learn the hidden size."""
        out = self._embeddings.predict({"input_ids": np.zeros((1, 1), dtype=np.int32)})["hidden_states"]
        return int(out.shape[-1])


def load_model(model_dir, backend: str = "auto", precision: str = "fp16", compute_units: str = "CPU_AND_NE") -> ANEModel:
    return ANEModel(model_dir, backend=backend, precision=precision, compute_units=compute_units)


__all__ = ["ANEModel", "load_model", "resolve_model", "causal_mask", "update_mask", "ContextOverflowError",
           "ContractError", "NoLogitsError"]
