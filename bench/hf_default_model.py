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


def median_time(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
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
    t_cap = median_time(lambda: eng.capture(ids), args.reps)
    cap, _ = eng.capture(ids)
    t_build = median_time(lambda: eng.build_cache(cap.kv), args.reps)

    def decode():
        cache = eng.build_cache(cap.kv)
        for _ in range(args.decode):
            eng.prefill([1000], cache)

    t_dec = median_time(decode, 1) - t_build
    t_q = median_time(lambda: eng.query_q(ids[-16:], prefix_kv=cap.kv[:, :, :, :32], layers=[5]), args.reps)
    print(
        f"T={n}: prefill {n / t_plain:.0f} tok/s ({t_plain * 1e3:.0f} ms); capture {t_cap * 1e3:.0f} ms "
        f"(+{(t_cap / t_plain - 1) * 100:.0f}%); build_cache {t_build * 1e3:.1f} ms; "
        f"decode after {n} ctx {args.decode / t_dec:.1f} tok/s; query_q(16 tok, 32 prefix, layer 5) "
        f"{t_q * 1e3:.0f} ms",
        flush=True,
    )


if __name__ == "__main__":
    main()
