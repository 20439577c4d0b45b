"""Default model on this machine: load time, prefill and decode speed, adapter overheads.

Run: PYTHONPATH=python python bench/hf_default_model.py [--lengths 128 512]
Prints medians of --reps runs after one warm-up. No network.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

CPU_S = {}  # last median's process CPU seconds (all threads), keyed by id of the function


def median_time(fn, reps):
    """Median wall seconds of fn() after one warm-up; also records its median process CPU time
    (on a shared, oversubscribed machine CPU time is the contention-independent figure)."""
    fn()
    ts, cs = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        ts.append(time.perf_counter() - t)
        cs.append(time.process_time() - c)
    CPU_S["last"] = statistics.median(cs)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    from kv_agent.engines.hf import HFEngine
    from kv_agent.models import load_default_model

    with open("/proc/cpuinfo") as f:
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.processor()
        )
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    print(
        f"machine: {cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"threads {torch.get_num_threads()}"
    )
    t = time.perf_counter()
    model, tok = load_default_model()
    print(f"load_default_model (cached conversion): {time.perf_counter() - t:.1f} s")
    torch.set_grad_enabled(False)
    eng = HFEngine(model, tok)
    g = torch.Generator().manual_seed(0)
    for n in args.lengths:
        measure(eng, torch.randint(1000, 20000, (n,), generator=g), args)


def measure(eng, ids, args):
    n = ids.numel()
    model = eng.model
    t_plain = median_time(lambda: model(input_ids=ids[None], logits_to_keep=1), args.reps)
    c_plain = CPU_S["last"]
    t_cap = median_time(lambda: eng.capture_on_cache(ids), args.reps)
    c_cap = CPU_S["last"]
    cap, _ = eng.capture_on_cache(ids)
    t_build = median_time(lambda: eng.build_cache(cap.kv), args.reps)

    def decode():
        cache = eng.build_cache(cap.kv)
        for _ in range(args.decode):
            eng.prefill([1000], cache)

    t_dec = median_time(decode, 1) - t_build
    c_dec = CPU_S["last"]
    t_q = median_time(lambda: eng.query_q(ids[-16:], prefix_kv=cap.kv[:, :, :, :32], layers=[5]), args.reps)
    print(
        f"T={n} (load {os.getloadavg()[0]:.1f}): prefill {n / t_plain:.1f} tok/s wall, "
        f"{n / c_plain:.1f} tok/CPU-s; capture {t_cap:.2f} s wall, {n / c_cap:.1f} tok/CPU-s; "
        f"build_cache {t_build * 1e3:.0f} ms; decode {args.decode} tokens after {n}: "
        f"{args.decode / t_dec:.2f} tok/s wall, {args.decode / c_dec:.2f} tok/CPU-s; "
        f"query_q(16 tok after 32, up to layer 5) {t_q * 1e3:.0f} ms",
        flush=True,
    )


if __name__ == "__main__":
    main()
