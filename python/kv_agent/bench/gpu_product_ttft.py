"""Time to first token through the public API on the GPU: ``AgentMemory(backend="gpu")`` +
``CacheManager.answer_ids`` on a Llama-3.1-8B-shaped model with RANDOM bf16 weights (timing
depends on shapes, not values; no checkpoint is needed; answer quality is not measured here).

For each history length H: the memory holds H tokens of history as H / --segment-tokens stored
segments (random KV of the model's shape, with their index summaries), the manager answers a
--query-tokens query with a --budget token retrieval budget and one new token. Reported:

  ttft_cold   first answer: the device tier holds none of the retrieved segments (host -> device
              copies into the tier, then the fused load + re-position into the engine cache)
  ttft_hit    the same answer again: every segment is resident in the device tier (no host ->
              device copy)
  breakdown   the hit answer's steps timed one by one (device synchronised): query-Q forward,
              index search (on the device), load + rotate (one fused kernel per segment), prefill
  recompute   a stateless server: prefill of H + Q tokens (logits of the last token only)
  memory      GPU bytes one agent needs beyond the weights: memory path (the placed context's
              KV + activations, peak, plus the device-tier bytes of its segments) vs full
              context (the H + Q token prefill's peak)
  limits      pinned host -> device and device -> device copy bandwidth, measured in the same run

Writes gpu_product_ttft.json and .md under --out and prints progress and a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def _sync():
    torch.cuda.synchronize()


def _timed(fn, repeats: int) -> tuple[float, list[float]]:
    fn()
    _sync()
    ts = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def _bandwidth() -> dict:
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8).pin_memory()
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    h2d, _ = _timed(lambda: dst.copy_(src, non_blocking=True), 5)
    d2 = torch.empty_like(dst)
    d2d, _ = _timed(lambda: d2.copy_(dst), 5)
    return {"h2d_pinned_GBps": n / h2d / 1e9, "d2d_GBps": 2 * n / d2d / 1e9}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--histories", default="4096,32768,131072")
    ap.add_argument("--query-tokens", type=int, default=32)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--segment-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--index-layers", default="", help="layers the index scores, e.g. '0-7' (default: the index's)")
    ap.add_argument("--recompute-max", type=int, default=131072, help="largest H timed with full recompute")
    ap.add_argument("--out", default="bench/out/gpu_product_ttft")
    args = ap.parse_args(argv)

    from kv_agent import _core
    from kv_agent import cuda as kcuda
    from kv_agent.api import AgentMemory, CacheManager
    from kv_agent.bench.gpu_ttft import llama31_8b_config
    from kv_agent.engines.hf import HFEngine
    from kv_agent.errors import UnavailableError
    from kv_agent.index import IndexOptions, summarize
    from kv_agent.models.byte_tokenizer import ByteTokenizer
    from kv_agent.store import Segment

    if not torch.cuda.is_available() or not kcuda.is_available():
        raise UnavailableError("gpu_product_ttft needs a CUDA device and a CUDA build of kv_agent")
    torch.set_grad_enabled(False)
    kcuda.install_pinned_host_allocator()
    hists = [int(h) for h in args.histories.split(",")]
    Q, S, B = args.query_tokens, args.segment_tokens, args.budget
    cfg = llama31_8b_config(max(hists) + Q + 1024)
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(cfg).eval()
        torch.set_default_dtype(torch.float32)
    print(f"model init {time.perf_counter() - t0:.1f} s", flush=True)
    engine = HFEngine(model, ByteTokenizer())
    # Random weights: a fixed identity instead of hashing 16 GB of parameters.
    engine._fingerprint = engine._legacy_fingerprint = _core.Hash128.of_str("random-llama-3.1-8b-shape")
    L, Hkv, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    bytes_per_token = L * 2 * Hkv * D * 2
    limits = _bandwidth()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}; KV {bytes_per_token} B/token; limits {limits}", flush=True)
    idx_opts = IndexOptions()
    if args.index_layers:
        lo, _, hi = args.index_layers.partition("-")
        idx_opts = IndexOptions(layers=list(range(int(lo), int(hi or lo) + 1)))
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d"),
            "model": "Llama-3.1-8B shape, random bf16 weights", "query_tokens": Q, "budget": B,
            "segment_tokens": S, "kv_bytes_per_token": bytes_per_token, "limits": limits}
    g = torch.Generator(device="cuda").manual_seed(1)
    def run_history(H: int) -> dict:
        t_fill = time.perf_counter()
        mem = AgentMemory(":memory:", backend="gpu", host_capacity_bytes=(H + 4 * S) * bytes_per_token + (1 << 30),
                          index_options=idx_opts, write_behind=False)
        assert mem.backend == "gpu"
        mgr = CacheManager(engine, memory=mem, session="now")
        fp = engine.spec.fingerprint
        nseg = -(-H // S)
        base = len(mgr.prefix_ids)
        for n in range(nseg):
            kv = torch.randn((L, 2, Hkv, S, D), generator=g, device="cuda", dtype=torch.bfloat16).cpu()
            tokens = torch.randint(3, 259, (S,)).tolist()
            mem.add_segments([Segment(kv, tokens=tokens, model=fp, key=_core.memory_key(mem.namespace, "history", n, 0),
                                      positions=list(range(base, base + S)), ns=mem.namespace, agent=mem.agent,
                                      session="history", turn=n, chunk=0, role="exchange", text="", time_us=n,
                                      summary=summarize(kv[:, 0]), copy=True)])
            if (n + 1) % 128 == 0 or n + 1 == nseg:
                print(f"  H={H}: stored {n + 1}/{nseg} segments ({time.perf_counter() - t_fill:.0f} s)", flush=True)
        qids = torch.randint(3, 259, (Q,)).tolist()
        kw = {"top_k": B // S, "token_budget": B, "max_new_tokens": 1, "session": "now"}
        # one answer on another query warms kernels and allocator; its segments may stay resident
        mgr.answer_ids(torch.randint(3, 259, (Q,)).tolist(), **kw)
        _sync()
        dev_before = mem.store.stats()["device"]
        cold = mgr.answer_ids(qids, **kw)
        st = mem.store.stats()["device"]
        cold_copies = st["puts"] - dev_before["puts"]
        hits = []
        for _ in range(args.repeats):
            _sync()
            hits.append(mgr.answer_ids(qids, **kw))
        st2 = mem.store.stats()["device"]
        assert st2["puts"] == st["puts"], "hit answers copied host -> device"
        hit_tokens = [a.token_ids for a in hits]
        # the breakdown of the hit answer, step by step
        q_s, _ = _timed(lambda: mgr._query_q(qids), args.repeats)
        q = mgr._query_q(qids)
        search_s, _ = _timed(lambda: mem.index.search(q, top_k=kw["top_k"], token_budget=B, ns=mem.namespace),
                             args.repeats)
        found = mgr.retrieve("", top_k=kw["top_k"], token_budget=B, query_ids=qids)
        context, _plan = mgr.plan(Q, found)
        load_s, _ = _timed(lambda: engine._place(context, remember=False), args.repeats)

        def prefill():
            cache = engine._place(context, remember=False)
            _sync()
            t = time.perf_counter()
            engine.prefill(qids, cache)
            _sync()
            return time.perf_counter() - t

        prefill()
        prefill_s = statistics.median(prefill() for _ in range(args.repeats))
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
        mgr.answer_ids(qids, **kw)
        _sync()
        mem_path = torch.cuda.max_memory_allocated() - base_alloc
        tier_bytes = sum(int(mem.store.info(h.key).payload_bytes) for h in found) + \
            int(mem.store.info(mgr.prefix_key).payload_bytes)
        row = {"history_tokens": H, "segments": nseg, "index_device": mem.index.device,
               "index_layers": list(mem.index.layers), "context_tokens": int(cold.context_tokens),
               "reused_tokens": int(cold.reused_tokens), "prefill_tokens": int(cold.prefill_tokens),
               "ttft_cold_ms": cold.ttft_s * 1e3, "cold_host_to_device_segments": int(cold_copies),
               "ttft_hit_ms": statistics.median(a.ttft_s for a in hits) * 1e3,
               "ttft_hit_all_ms": [a.ttft_s * 1e3 for a in hits], "hit_same_tokens": all(t == hit_tokens[0]
                                                                                        for t in hit_tokens),
               "query_q_ms": q_s * 1e3, "search_ms": search_s * 1e3, "load_rotate_ms": load_s * 1e3,
               "prefill_ms": prefill_s * 1e3, "gpu_bytes_memory_path_peak": mem_path,
               "gpu_bytes_memory_tier_segments": tier_bytes, "kv_bytes_full_context": (H + Q) * bytes_per_token}
        print(f"  H={H}: {json.dumps({k: v for k, v in row.items() if not isinstance(v, list)})}", flush=True)
        mem.close()
        if args.recompute_max >= H:
            ids = torch.randint(3, 259, (1, H + Q), device="cuda")
            reps = 1 if H > 32768 else args.repeats
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base_alloc = torch.cuda.memory_allocated()
            try:
                rec_s, _ = _timed(lambda: model(ids, logits_to_keep=1), reps)
                row["recompute_ms"] = rec_s * 1e3
                row["gpu_bytes_full_context_peak"] = torch.cuda.max_memory_allocated() - base_alloc
                row["speedup_hit_vs_recompute"] = row["recompute_ms"] / row["ttft_hit_ms"]
                print(f"  H={H}: recompute {rec_s * 1e3:.1f} ms", flush=True)
            except torch.OutOfMemoryError as e:
                row["recompute_error"] = str(e).splitlines()[0]
            del ids
        torch.cuda.empty_cache()
        return row

    for H in hists:
        rows.append(run_history(H))
        out.joinpath("gpu_product_ttft.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "gpu_product_ttft.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    cols = ["history_tokens", "ttft_cold_ms", "ttft_hit_ms", "query_q_ms", "search_ms", "load_rotate_ms",
            "prefill_ms", "recompute_ms", "speedup_hit_vs_recompute", "gpu_bytes_memory_path_peak",
            "gpu_bytes_memory_tier_segments", "gpu_bytes_full_context_peak"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, "-"))
                                      for c in cols) + " |")
    (out / "gpu_product_ttft.md").write_text(json.dumps(meta) + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
