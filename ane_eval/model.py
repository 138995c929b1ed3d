"""ANEModel: the prefill/infer protocol over embeddings -> FFN chunks -> LM head (ANEMLL-CONTRACT.md §4).

One KV-cache state is shared by every chunk and both functions. The model remembers which tokens its cache
holds (`history`), so a caller can rewind to a shared prefix and feed only the new tokens: stale slots beyond the
current position are hidden by the causal mask and overwritten later, so no state copy is ever needed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import contract
from .backends import select
from .bundle import discover, load_tokenizer
from .contract import ContractError
from .protocol import read_protocol


class ContextOverflowError(ValueError):
    pass


def update_mask(width: int, batch_pos: int, batch: int) -> np.ndarray:
    """fp16 (1, 1, width, B): 1 at [batch_pos + i, i], where row i of a prefill batch is written (chat.py
    make_update_mask)."""
    mask = np.zeros((1, 1, width, batch), dtype=np.float16)
    rows = np.arange(batch)
    keep = batch_pos + rows < width
    mask[0, 0, (batch_pos + rows)[keep], rows[keep]] = 1
    return mask


def causal_mask(context: int, first: int = 0, rows: int | None = None) -> np.ndarray:
    """Additive fp16 (1, 1, rows, C) for the queries at positions first.. (all C by default): 0 where key <= query,
    -inf elsewhere. Built per call: the whole C x C mask of a 4096-token context would hold 32 MB."""
    queries = np.arange(first, first + (context if rows is None else rows))[:, None]
    return np.where(np.arange(context) <= queries, np.float16(0), np.float16(-np.inf))[None, None]


class ANEModel:
    def __init__(self, model_dir, backend: str = "auto", precision: str = "fp16", compute_units: str = "CPU_AND_NE"):
        self.backend_impl = select(backend, precision=precision, compute_units=compute_units)
        self.backend = self.backend_impl.name
        self.precision = precision
        self.bundle = discover(Path(model_dir), backend=self.backend)
        self.tokenizer = load_tokenizer(self.bundle)
        b = self.bundle
        self.parts = contract.describe_parts(b)
        self.chunk_parts = contract.chunks_of(self.parts)
        self.protocol = read_protocol(b.meta)
        load = self.backend_impl.load
        self._embeddings = load(b.embeddings)
        self._chunks = [self._load_functions(i) for i in range(len(b.chunks))]
        self._lm_head = load(b.lm_head)
        width = self._embedding_width()
        self.geometry = contract.cross_check(b, self.parts, len(self.tokenizer), embeddings_width=width)
        self.context_length = self.geometry.context_length
        self.batch_size = self.geometry.batch_size
        self.mask_width = self.geometry.mask_width or self.context_length  # attention_size (0.3.5)
        self.rotates = "infer_rotate" in self._chunks[0]  # positions >= sliding_window use the rotate functions
        self.num_chunks = len(b.chunks)
        self._hints = {"hidden_states": f"pad to the compiled batch {self.batch_size}",
                       "input_ids": f"input_ids are int32 of shape (1, 1) or (1, {self.batch_size})",
                       "causal_mask": f"the mask is fp16 (1, 1, rows, {self.mask_width})",
                       "position_ids": "position_ids are int32", "current_pos": "current_pos is int32 (1,)"}
        self._widen_fp16 = self.backend == "mil" and precision == "fp32"
        self.token_evaluations = 0  # embedding rows pushed through the chunks (prefill rows + infer tokens)
        self.reset()

    # --- properties ------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def vocab_size(self) -> int:
        return sum(self.geometry.logits_widths) if self.geometry.logits_widths else len(self.tokenizer)

    @property
    def history(self) -> list[int]:
        """Tokens whose keys/values the cache holds at positions 0..len-1."""
        return list(self._history)

    def __repr__(self) -> str:
        return (f"<ANEModel {self.name} backend={self.backend_impl.describe()} context={self.context_length} "
                f"batch={self.batch_size} chunks={self.num_chunks}>")

    # --- protocol --------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """A fresh zeroed state: nothing from an earlier prompt can leak into the next. Every state the chunks
        declare (local and global caches for Gemma 3) is made at once and passed to every call."""
        self._state = self._chunks[0]["prefill"][0].make_state()
        self._history: list[int] = []
        self._next = 0  # the position after the last one written since the reset

    def prefill(self, token_ids, start: int = 0) -> None:
        """Put `token_ids` at positions start.. in the cache, in batches of the compiled size (right-padded).
        Positions before `start` must already hold the caller's prefix (from earlier calls)."""
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
        if self.protocol.is_035:
            self._feed_035(start, end)
            return
        B, C = self.batch_size, self.context_length
        pos = start
        while pos < end:
            # a batch never runs past the context end: start it earlier and re-feed tokens already in the cache
            batch_pos = min(pos, C - B)
            rows = seq[batch_pos:batch_pos + B]
            self._run_prefill("prefill", batch_pos, rows + [0] * (B - len(rows)))
            pos = batch_pos + B

    def infer(self, token_id: int, pos: int) -> np.ndarray:
        """Logits (V,) float32 for the token after position `pos`, given `token_id` at `pos` and the cached
        prefix 0..pos-1 (which must be in the cache)."""
        if pos < 0 or pos > len(self._history):
            raise ValueError(f"infer at position {pos} needs positions 0..{pos - 1} in the cache, which holds "
                             f"{len(self._history)}")
        if pos >= self.context_length:
            raise ContextOverflowError(f"position {pos} is past the context length {self.context_length}; "
                                       "truncate the input")
        self._prepare_write(pos)
        self._history = self._history[:pos] + [int(token_id)]
        hidden = self._run_infer(pos, token_id)
        out = self._call(self._lm_head, self.parts["lm_head"], None, {"hidden_states": hidden})
        return np.concatenate([out[f"logits{k}"].reshape(-1) for k in range(1, len(out) + 1)]).astype(np.float32)

    # --- internals -------------------------------------------------------------------------------------------
    def _load_functions(self, i: int) -> dict:
        """Chunk i's functions: name -> (predictor, Part). infer/prefill from the chunk file; with a context past
        meta.yaml's sliding_window, infer_rotate/prefill_rotate too, from the split-rotate `_rot` file when there
        is one (combine_models.py combine_chunks_split_rotate), else from the chunk file (chat.py load_models)."""
        b, load = self.bundle, self.backend_impl.load
        main, rot = self.chunk_parts[i], self.parts.get(f"chunk{i + 1:02d}_rot")
        found = {fn: (load(b.chunks[i], fn), main) for fn in ("infer", "prefill")}
        for fn in contract.expected_rotate_functions(b.meta, b.meta_int("context_length")):
            path, part = (b.rotate_chunks[i], rot) if b.rotate_chunks else (b.chunks[i], main)
            try:
                found[fn] = (load(path, fn), part)
            except (ValueError, RuntimeError, KeyError) as e:
                raise ContractError(f"{path.name}: meta.yaml sliding_window {self.protocol.sliding_window} is shorter "
                                    f"than the context, but the {fn} function cannot be loaded ({e}); re-convert "
                                    "with rotate functions") from None
        return found

    def _infer_function(self, pos: int) -> str:
        """Functions chosen by position (chat.py): past the sliding window the local cache rotates."""
        return "infer_rotate" if self.rotates and pos >= self.protocol.sliding_window else "infer"

    def _prefill_function(self, batch_pos: int) -> str | None:
        """The prefill function for a full batch at batch_pos, or None when it must go token by token: a filling
        batch must end inside the window, a rotating one start past it (chat.py
        run_monolithic_prefill_with_rotation)."""
        if not self.rotates:
            return "prefill"
        sw = self.protocol.sliding_window
        if batch_pos + self.batch_size <= sw:
            return "prefill"
        return "prefill_rotate" if batch_pos >= sw else None

    def _prepare_write(self, pos: int) -> None:
        """Once the local cache has rotated it holds only the last window before `_next`: writing anywhere else
        (a rewind to a shared prefix) cannot reuse it, so the prefix is replayed from a fresh state. Without
        rotation a rewind just overwrites (the mask hides stale slots)."""
        if self.rotates and self._next > self.protocol.sliding_window and pos != self._next:
            prefix = self._history[:pos]
            self._state = self._chunks[0]["prefill"][0].make_state()
            self._next = 0
            self._feed_035(0, len(prefix), prefix)
        self._next = pos

    def _feed_035(self, start: int, end: int, seq: list[int] | None = None) -> None:
        """0.3.5's prefill rule (chat.py run_prefill): full batches through a prefill function, the rest token by
        token through infer / infer_rotate; no padded batch. Models without update_mask_prefill or
        prefill_dynamic_slice go token by token throughout (chat.py chat_loop)."""
        seq = self._history if seq is None else seq
        B, pos = self.batch_size, start
        while pos < end:
            fn = self._prefill_function(pos) if self.protocol.batch_prefill and pos + B <= end else None
            if fn is None:
                self._run_infer(pos, seq[pos])
                pos += 1
            else:
                self._run_prefill(fn, pos, seq[pos:pos + B])
                pos += B

    def _run_infer(self, pos: int, token_id: int) -> np.ndarray:
        fn = self._infer_function(pos)
        hidden = self._embed(np.array([[token_id]], dtype=np.int32))
        position = np.array([pos], dtype=np.int32)
        mask = causal_mask(self.mask_width, pos, 1)
        for chunk in self._chunks:
            predictor, part = chunk[fn]
            inputs = {"hidden_states": hidden, "position_ids": position, "causal_mask": mask, "current_pos": position}
            hidden = self._call(predictor, part, fn, inputs)["output_hidden_states"]
        self.token_evaluations += 1
        self._next = pos + 1
        return hidden

    def _run_prefill(self, fn: str, batch_pos: int, rows: list[int]) -> None:
        B = self.batch_size
        hidden = self._embed(np.array([rows], dtype=np.int32))
        inputs = {"position_ids": np.arange(batch_pos, batch_pos + B, dtype=np.int32),
                  "causal_mask": causal_mask(self.mask_width, batch_pos, B),
                  "current_pos": np.array([batch_pos], dtype=np.int32)}
        for chunk in self._chunks:
            predictor, part = chunk[fn]
            extra = {}
            declared = (part.feature(fn, "inputs", "update_mask") is not None if part is not None
                        else self.protocol.update_mask_prefill and fn == "prefill")  # compiled: trust meta.yaml
            if declared:
                extra["update_mask"] = update_mask(self.mask_width, batch_pos, B)  # declared: static KV writes
            out = self._call(predictor, part, fn, {"hidden_states": hidden, **inputs, **extra})
            hidden = out["output_hidden_states"]  # the last chunk's prefill output is row 0 only: discarded
        self.token_evaluations += B
        self._next = batch_pos + B

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        return self._call(self._embeddings, self.parts["embeddings"], None, {"input_ids": ids})["hidden_states"]

    def _call(self, predictor, part, function, inputs: dict) -> dict:
        if part is not None:
            where = f"{part.name} {function}" if function else part.name
            contract.check_inputs(where, part.signature(function), inputs, self._hints, widen_fp16=self._widen_fp16)
        state = self._state if function else None
        return predictor.predict(inputs, state) if state is not None else predictor.predict(inputs)

    def _embedding_width(self) -> int | None:
        """The embeddings declare no output shape: run one token to learn the hidden size."""
        out = self._embeddings.predict({"input_ids": np.zeros((1, 1), dtype=np.int32)})["hidden_states"]
        return int(out.shape[-1])


def load_model(model_dir, backend: str = "auto", precision: str = "fp16", compute_units: str = "CPU_AND_NE") -> ANEModel:
    return ANEModel(model_dir, backend=backend, precision=precision, compute_units=compute_units)


__all__ = ["ANEModel", "load_model", "causal_mask", "update_mask", "ContextOverflowError", "ContractError"]
