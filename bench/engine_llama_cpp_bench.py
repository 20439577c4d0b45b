"""llama.cpp vs transformers on the default model, side by side in one run (docs/benchmarks.md).

Measures, for each engine on this CPU: prefill tokens/s of an N-token prompt, greedy decode
tokens/s after it, and the answer's time to first token with kv-memory (turns captured and
stored, then placed at planned positions; only the question prefilled) against a full recompute.
Medians of --repeats runs after one warm-up. Prints a markdown table with the machine, date and
commit.

    .venv/bin/python bench/engine_llama_cpp_bench.py [--prefill 512] [--decode 64] [--turns 24]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time

import numpy as np
import torch

from kv_agent.engines.base import PlannedContext
from kv_agent.engines.hf import HFEngine
from kv_agent.engines.llama_cpp import LlamaCppEngine
from kv_agent.models import load_default_model
from kv_agent.store import Segment, Store


def median_time(fn, repeats):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def machine() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()[0]
    return f"{cpu}, {os.cpu_count()} vCPUs, {platform.python_version()}, load average {load:.1f} at start"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--turns", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads of both engines (0 = all)")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {machine()}; date {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC; commit {commit}", flush=True)

    threads = args.threads or os.cpu_count() or 1
    print(f"threads per engine: {threads}", flush=True)
    lc = LlamaCppEngine(context_tokens=4096, threads=threads)
    model, tok = load_default_model()
    hf = HFEngine(model, tok)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    n_vocab = 20000
    prompt = [lc.tokenizer.bos_token_id] + [int(x) for x in rng.integers(1000, n_vocab, args.prefill - 1)]
    rows = []

    # ---- prefill
    def lc_prefill():
        lc.native.reset()
        lc.native.logits(prompt)

    def hf_prefill():
        hf.prefill(torch.tensor(prompt), hf.new_cache())

    t_lc, t_hf = median_time(lc_prefill, args.repeats), median_time(hf_prefill, args.repeats)
    rows.append(("prefill", f"{args.prefill} tokens", args.prefill / t_lc, args.prefill / t_hf, "tokens/s"))
    print(f"prefill: llama.cpp {args.prefill / t_lc:.0f} tok/s, transformers {args.prefill / t_hf:.0f} tok/s", flush=True)

    # ---- decode (greedy, after a 128-token prompt)
    short = prompt[:128]

    def lc_decode():
        lc.native.reset()
        return lc.native.generate(short, args.decode, [])

    g = [lc_decode() for _ in range(args.repeats + 1)][1:]
    lc_tps = statistics.median((len(x["tokens"]) - 1) / x["decode_s"] for x in g)
    h = [hf.generate(torch.tensor(short), max_new_tokens=args.decode, eos_ids=[]) for _ in range(args.repeats + 1)][1:]
    hf_tps = statistics.median((len(x.token_ids) - 1) / x.decode_s for x in h)
    rows.append(("decode", f"{args.decode} tokens after 128", lc_tps, hf_tps, "tokens/s"))
    print(f"decode: llama.cpp {lc_tps:.1f} tok/s, transformers {hf_tps:.1f} tok/s", flush=True)

    # ---- answer TTFT with memory (llama.cpp): turns stored, question prefilled only
    store = Store.open(None)
    fp = lc.spec.fingerprint
    items, ctx = [], None
    facts = [f"Note {i}: the locker code of person {i} is {1000 + 37 * i}." for i in range(args.turns)]
    prefix = [lc.tokenizer.bos_token_id] + lc.encode("Notes kept by an assistant.\n")
    for i, text in enumerate([None] + facts):
        ids = prefix if text is None else lc.encode(" " + text)
        cap = lc.capture(ids, ctx)
        seg = Segment(cap.kv, tokens=ids, model=fp, ns="bench", session="s", turn=i)
        store.put(seg)
        items.append((seg.key, len(ids)))
        ctx = PlannedContext.contiguous(items, store, fp)
    q = lc.encode(" Question: what is the locker code of person 7?\nAnswer:")
    mem = [lc.generate(q, ctx, max_new_tokens=8, stop_ids=[]) for _ in range(args.repeats + 1)][1:]
    full_ids = sum((list(store.get(k, fp).tokens) for k, _ in items), []) + q
    empty = PlannedContext((), store, fp)
    full = [lc.generate(full_ids, empty, max_new_tokens=8, stop_ids=[]) for _ in range(args.repeats + 1)][1:]
    ttft_mem = statistics.median(x.ttft_s for x in mem)
    load_mem = statistics.median(x.load_s for x in mem)
    ttft_full = statistics.median(x.ttft_s for x in full)
    answer = lc.tokenizer.decode(mem[0].token_ids)
    print(f"TTFT with memory ({ctx.total_positions} context tokens, {len(q)} prefilled): {ttft_mem * 1e3:.0f} ms "
          f"(placement {load_mem * 1e3:.0f} ms); full recompute of {len(full_ids)}: {ttft_full * 1e3:.0f} ms; "
          f"answer {answer!r}", flush=True)

    print("\n| measure | workload | llama.cpp | transformers | ratio |")
    print("|---|---|---|---|---|")
    for name, work, a, b, unit in rows:
        print(f"| {name} {unit} | {work} | {a:.1f} | {b:.1f} | {a / b:.1f}x |")
    print(f"\nllama.cpp answer TTFT with memory: {ttft_mem * 1e3:.0f} ms (of which placement {load_mem * 1e3:.0f} ms; "
          f"{ctx.total_positions} tokens from memory, {len(q)} prefilled) vs {ttft_full * 1e3:.0f} ms full recompute "
          f"of {len(full_ids)} tokens.")


if __name__ == "__main__":
    main()
