"""One side of the real-scale benchmark (tests/bench/test_realscale_bench.py) in a process of its own, so that
its peak resident memory (ru_maxrss) is its own: `python -m tests.bench.realscale mil|torch DIR --prompt N
--decode-prompt N --decode N` prints one JSON line of load seconds, prefill and decode seconds, and peak RSS."""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np

from .test_runtime_bench import ane_decode, ane_prefill, best_of, hf_decode, hf_model, hf_prefill, \
    hf_prefill_in_batches


def measure(side: str, path: str, prompt_len: int, decode_prompt: int, decode: int, rounds: int, batch: int) -> dict:
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(2, 30000, prompt_len)]
    short = prompt[:decode_prompt]
    extra = {}
    t = time.perf_counter()
    if side == "mil":
        import ane_eval

        model = ane_eval.load_model(path, backend="mil", precision="fp16")
        load = time.perf_counter() - t
        prefill, decode_n, decode_0 = ane_prefill(model, prompt), ane_decode(model, short, decode), \
            ane_decode(model, short, 0)
    else:
        model = hf_model(path)
        load = time.perf_counter() - t
        prefill, decode_n, decode_0 = hf_prefill(model, prompt), hf_decode(model, short, decode), \
            hf_decode(model, short, 0)
        extra["prefill_in_batches_s"] = best_of(hf_prefill_in_batches(model, prompt, batch), rounds)
    prefill_s = best_of(prefill, rounds)
    # per generated token: the short prompt's prefill timed alone and subtracted
    decode_s = (best_of(decode_n, rounds) - best_of(decode_0, rounds)) / decode
    return {"side": side, "load_s": load, "prefill_s": prefill_s, "prefill_tokens": prompt_len,
            "decode_s_per_token": decode_s, "peak_rss_bytes": peak_rss(), **extra}


def peak_rss() -> int:
    """This process's peak resident set: VmHWM (Linux), which starts afresh at exec. ru_maxrss does not: a child
    of a large parent reports the parent's peak."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("side", choices=("mil", "torch"))
    p.add_argument("path")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--decode-prompt", type=int, default=64)
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=64, help="torch: also prefill in batches of this many tokens")
    a = p.parse_args(argv)
    print(json.dumps(measure(a.side, a.path, a.prompt, a.decode_prompt, a.decode, a.rounds, a.batch)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
