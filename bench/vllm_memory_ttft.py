"""vLLM with the kv-agent connector: TTFT with and without memory, save-path overhead, Q cost.

Run in the vLLM environment (``make vllm-venv``)::

    .venv-vllm/bin/python bench/vllm_memory_ttft.py --history 2048 8192 --out bench/out/vllm.json

For each history length N (a multiple of the 128-token chunk):
1. without memory: vLLM prefills history + question (a plain request; vLLM's own TTFT). The
   connector saves the history's 128-token chunks into the store on the way (its save time is
   the save-path overhead, reported per 1k tokens next to vLLM's prefill time).
2. with memory: the same question after the history planned from the stored chunks; vLLM
   prefills only the question (its reported cached tokens and TTFT).
3. the question's pre-RoPE Q at 4 layers after the history (``query_vectors``), timed.
Medians over ``--repeats`` runs of 2 and 3.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--history", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--dtype", default="auto", help="vLLM dtype (auto: vLLM's choice for the model)")
    args = ap.parse_args()

    from vllm import SamplingParams, TokensPrompt

    from kv_agent import _core
    from kv_agent.engines.base import PlannedContext, create

    store_dir = Path(tempfile.mkdtemp(prefix="kvagent-vllm-bench-"))
    t0 = time.perf_counter()
    eng = create("vllm", store_path=str(store_dir / "store"), dtype=args.dtype,
                 max_model_len=max(args.history) + 256)
    print(f"engine ready in {time.perf_counter() - t0:.1f} s", flush=True)
    tok = eng.tokenizer
    base = ("User: I think the weather was fine this week and the train was late again. "
            "Assistant: I see, thanks for telling me about it. ")
    q = eng.encode("\nQuestion: What did I say about the train?\nAnswer:")
    results = []
    for n in args.history:
        if n % 128:
            raise SystemExit("--history values must be multiples of 128")
        ids = [tok.bos_token_id] + eng.encode(base * (n // 20 + 1))
        ids = ids[:n]
        before = eng.connector_stats()
        out = eng.llm.generate(TokensPrompt(prompt_token_ids=ids + q), SamplingParams(temperature=0.0, max_tokens=1),
                               use_tqdm=False)[0]
        after = eng.connector_stats()
        from kv_agent.engines.vllm import _ttft

        ttft_full = _ttft(out)
        save_s = after["save_s"] - before["save_s"]
        saved = after["saved_tokens"] - before["saved_tokens"]
        print(f"N={n}: full prefill TTFT {ttft_full:.3f} s, saved {saved} tokens in {save_s * 1e3:.1f} ms", flush=True)
        store = eng.plain_store  # where the plain request's chunks went
        parent, items = _core.Hash128(), []
        for s in range(0, n, 128):
            key = _core.prefix_key(eng.spec.fingerprint, parent, ids[s:s + 128])
            items.append((key, 128))
            parent = key
        ctx = PlannedContext.contiguous(items, store, eng.spec.fingerprint)
        gens, qts = [], []
        for _ in range(args.repeats):
            gens.append(eng.generate(q, ctx, max_new_tokens=1, stop_ids=[]))
            t = time.perf_counter()
            eng.query_vectors(q, ctx, [2, 5, 8, 11][: eng.spec.num_layers])
            qts.append(time.perf_counter() - t)
        g = gens[-1]
        row = {
            "history_tokens": n, "question_tokens": len(q),
            "ttft_full_s": ttft_full, "prefill_tokens_full": len(ids) + len(q) - int(out.num_cached_tokens or 0),
            "ttft_memory_s": statistics.median(x.ttft_s for x in gens),
            "prefill_tokens_memory": g.prefill_tokens, "reused_tokens_memory": g.reused_tokens,
            "save_ms": save_s * 1e3, "saved_tokens": saved,
            "save_ms_per_1k": save_s * 1e3 / (saved / 1000) if saved else None,
            "prefill_ms_per_1k_full": ttft_full * 1e3 / ((n + len(q)) / 1000),
            "query_vectors_s": statistics.median(qts),
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"machine": platform.processor() or platform.machine(), "cpus": _cpus(), "commit": commit,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dtype": str(eng.dtype),
              "model": str(eng.model_dir.name), "results": results}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    eng.close()


def _cpus() -> str:
    import os

    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{os.cpu_count()} x {names[0] if names else platform.machine()}"


if __name__ == "__main__":
    main()
