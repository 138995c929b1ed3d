"""Data-parallel evaluation over torch.distributed (gloo): lm-eval's own protocol, as its HF backend implements it.

lm-eval's `evaluate()` gives rank r the documents r, r + W, r + 2W, ... of every task, pads the request counts with
`all_gather`, waits at `barrier`, gathers per-document metrics and samples on rank 0 with `gather_object` and
returns results on rank 0 only (lm_eval/evaluator.py). An LM provides those hooks; `Group` does it for ANELM
from the environment `torchrun` and `accelerate launch` set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), with gloo (CPU; Linux and macOS) and a timeout on every collective.

A rank that dies closes its sockets, so the others fail at their next collective at once; the timeout covers a rank
that is alive but stuck. Ranks finish their shares at different times and wait at the barrier for the slowest, so
the timeout must exceed that imbalance (default one hour, `ANE_EVAL_DIST_TIMEOUT` or --dist-timeout seconds).
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta

DEFAULT_TIMEOUT = 3600.0


class DistributedError(RuntimeError):
    """A collective failed: another rank stopped, or it timed out. One line."""


def env_world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) when not launched by one."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise DistributedError(f"RANK={os.environ.get('RANK')!r} WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}: "
                               "expected integers as torchrun sets them") from None
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    return rank, world


def timeout_seconds(value=None) -> float:
    raw = value if value is not None else os.environ.get("ANE_EVAL_DIST_TIMEOUT", DEFAULT_TIMEOUT)
    try:
        seconds = float(raw)
    except ValueError:
        raise DistributedError(f"ANE_EVAL_DIST_TIMEOUT={raw!r}: expected seconds, e.g. 3600") from None
    if seconds <= 0:
        raise DistributedError(f"distributed timeout {seconds}: expected a positive number of seconds")
    return seconds


def quiet_other_ranks(rank: int) -> None:
    """Ranks other than 0 print nothing but errors: lm-eval's, datasets' and our logs at ERROR (progress bars:
    ane_eval/__init__.py)."""
    if rank == 0:
        return
    for name in ("lm_eval", "ane_eval", "datasets", "transformers", "coremltools"):
        logging.getLogger(name).setLevel(logging.ERROR)


class Group:
    """The process group of one data-parallel run (gloo), joined from the launcher's environment."""

    def __init__(self, timeout: float | None = None):
        self.rank, self.world_size = env_world()
        self.timeout = timeout_seconds(timeout)
        if self.world_size == 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            for var in ("MASTER_ADDR", "MASTER_PORT"):
                if var not in os.environ:
                    raise DistributedError(f"WORLD_SIZE={self.world_size} but {var} is not set; launch with "
                                           "torchrun (or accelerate launch), which sets it")
            self._call("init_process_group", dist.init_process_group, backend="gloo", init_method="env://",
                       rank=self.rank, world_size=self.world_size, timeout=timedelta(seconds=self.timeout))
        elif (dist.get_rank(), dist.get_world_size()) != (self.rank, self.world_size):
            raise DistributedError(f"an initialized process group is rank {dist.get_rank()} of "
                                   f"{dist.get_world_size()}, the environment says {self.rank} of {self.world_size}")
        quiet_other_ranks(self.rank)

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ValueError) as e:  # DistBackendError and gloo errors are RuntimeErrors
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistributedError(f"rank {self.rank} of {self.world_size}: {what} failed (another rank stopped, "
                                   f"or {self.timeout:g} s passed): {first}") from None

    # lm-eval's hooks, with HFLM's semantics (lm_eval/models/huggingface.py: accelerate's gather of a 0-d tensor is
    # a 1-d tensor of one value per rank; gather_object is torch.distributed.gather_object, None off dst)
    def all_gather(self, tensor):
        if self.world_size <= 1:
            return tensor
        import torch
        import torch.distributed as dist

        part = tensor.detach().reshape(1) if tensor.ndim == 0 else tensor.detach().contiguous()
        parts = [torch.empty_like(part) for _ in range(self.world_size)]
        self._call("all_gather", dist.all_gather, parts, part)
        return torch.cat(parts, dim=0)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size <= 1:
            return [obj]
        import torch.distributed as dist

        result = [None] * self.world_size if self.rank == dst else None
        self._call("gather_object", dist.gather_object, obj=obj, object_gather_list=result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            self._call("barrier", dist.barrier)
