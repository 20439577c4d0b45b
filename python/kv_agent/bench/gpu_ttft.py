"""GPU timing mode: TTFT of full recompute vs kv-memory on a Llama-3.1-8B-shaped model.

The model has RANDOM weights (bf16): prefill and decode time depend on shapes, not on weight
values, so timing is representative of the real model while no checkpoint is needed. Answer
quality is not measured here (see the LoCoMo CPU run for that).

For each history length H (tokens of past conversation, in segments of --segment-tokens):
  full-recompute   prefill H + Q tokens (what a stateless server does per question)
  offloaded-cache  transformers' own offloaded DynamicCache holding the history's KV on the host;
                   prefill the Q query tokens on top (every layer's KV streams host -> device)
  kv-memory        (1) query Q vectors at the index layers (a forward of the Q tokens that stops
                   after the last index layer), (2) latent-index search over all H/segment
                   summaries on the CPU (C++ core), (3) copy the selected segments' KV (budget
                   --budget tokens) from pinned host memory to the GPU, (4) rotate keys to their
                   planned positions, (5) prefill the Q query tokens attending to them.
Prints a table and writes gpu_ttft.json / gpu_ttft.md / gpu_ttft.png under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch


def llama31_8b_config(max_pos: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=max(max_pos, 131072),
        rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        tie_word_embeddings=False, attn_implementation="sdpa")


def tiny_config(max_pos: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                       max_position_embeddings=max(max_pos, 4096), rope_theta=10000.0, attn_implementation="sdpa")


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, repeats: int):
    """Median wall time of fn() (device synchronised) after one warm-up call."""
    fn()
    sync(dev)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--histories", default="4096,16384,32768,65536,131072")
    ap.add_argument("--query-tokens", type=int, default=32)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--segment-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--index-layers", default="",
                    help="layers the index scores, e.g. '0-7' (default: 8 evenly spaced); the query-Q forward "
                         "stops after the last one, so early layers make it cheaper")
    ap.add_argument("--index-device", default="cpu",
                    help="where the latent index searches: cpu, cuda[:N] or auto (device search needs a CUDA "
                         "build of kv_agent; docs/retrieval.md)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="also time kv-memory with the adapter's CUDA-graph option (HFEngine(cuda_graphs=True)): "
                         "query-Q and the query prefill replay captured graphs over a static cache; the eager "
                         "kv-memory path is timed in the same run (kv_eager_* columns)")
    ap.add_argument("--tiny", action="store_true", help="tiny random model on any device (plumbing check)")
    ap.add_argument("--skip-offloaded", action="store_true")
    ap.add_argument("--out", default="bench/out/gpu_ttft")
    args = ap.parse_args(argv)

    from transformers import DynamicCache, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from kv_agent import index as kvindex
    from kv_agent.engines.hf import HFEngine

    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    hists = [int(h) for h in args.histories.split(",")]
    Q, S, B = args.query_tokens, args.segment_tokens, args.budget
    cfg = tiny_config(max(hists) + Q) if args.tiny else llama31_8b_config(max(hists) + Q)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(dev):
        torch.set_default_dtype(dtype)
        model = LlamaForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
    model.eval()
    init_s = time.perf_counter() - t0
    engine = HFEngine(model)
    graphs_ok = False
    if args.cuda_graphs:
        from kv_agent.engines import hf_static

        hf_static.check_supported(engine)  # the option's precondition; raises if unsupported
        graphs_ok = True
    from kv_agent import _core

    # Random weights: a fixed identity instead of hashing 16 GB of parameters.
    engine._fingerprint = _core.Hash128.of_str("random-llama-3.1-8b-shape")
    spec = engine.model_spec()
    L, Hkv, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    bytes_per_token = L * 2 * Hkv * D * torch.tensor([], dtype=dtype).element_size()
    gpu_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device {gpu_name}; model init {init_s:.1f} s; KV {bytes_per_token} bytes/token; weights random")

    # Measured limits: pinned H2D copy bandwidth.
    h2d_gbs = None
    if dev.type == "cuda":
        src = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
        dst = torch.empty_like(src, device=dev)
        med, _ = timed(lambda: dst.copy_(src, non_blocking=True), dev, 5)
        h2d_gbs = src.numel() / med / 1e9
        del src, dst
        print(f"pinned host->device copy: {h2d_gbs:.1f} GB/s")

    def bench_history(H: int) -> dict:
        nseg = math.ceil(H / S)
        ids = torch.randint(0, cfg.vocab_size, (1, H + Q), device=dev)
        row = {"history_tokens": H, "query_tokens": Q, "segments": nseg}

        # ---- full recompute
        def full():
            with torch.no_grad():
                model(ids, use_cache=True, logits_to_keep=1)
        row["full_recompute_s"], _ = timed(full, dev, args.repeats)

        # ---- history KV in pinned host memory, canonical per-segment layout, pre-RoPE
        torch.manual_seed(H)
        host = torch.empty((nseg, L, 2, Hkv, S, D), dtype=dtype, pin_memory=dev.type == "cuda")
        for i in range(nseg):  # random KV drawn on the device (fast), kept in pinned host memory
            host[i].copy_(torch.randn((L, 2, Hkv, S, D), device=dev, dtype=dtype))
        if args.index_layers:
            from kv_agent.bench.kv_system import parse_variant

            index_options = parse_variant(f"mean:softmax:max:{args.index_layers}")
        else:
            index_options = kvindex.IndexOptions()
        index_options.device = args.index_device
        index = kvindex.LatentIndex(spec, index_options)
        layers = list(index.layers)
        t_sum = time.perf_counter()
        for i in range(nseg):
            summary = kvindex.summarize(host[i, :, 0], layers=layers)
            index.add(_core.memory_key("bench", f"h{H}", i, 0), summary, session=f"h{H}", turn=i,
                      num_tokens=S, time_us=i)
        row["index_build_s"] = time.perf_counter() - t_sum
        q_ids = ids[0, H:].tolist()

        # ---- kv-memory
        def kv_memory(graphs: bool):
            t = {}
            engine.cuda_graphs = graphs
            t0 = time.perf_counter()
            qd = engine.query_q(q_ids, layers=layers)
            qv = torch.stack([qd[i] for i in layers]).float().cpu()
            t1 = time.perf_counter()
            hits = index.search(qv.numpy(), top_k=0, token_budget=B)
            t2 = time.perf_counter()
            sel = sorted(int(h.turn) for h in hits)
            if graphs:
                # The adapter's static path: pinned segments DMA'd into its staging buffer, one
                # graph rotates + fills the static cache, one graph runs the query.
                runner = engine.static_prefill(B, Q)
                n = runner.load([host[i] for i in sel])
                sync(dev)
                t3 = time.perf_counter()
                runner.inject(0)
                sync(dev)
                t4 = time.perf_counter()
                runner.forward(q_ids)
                sync(dev)
                t5 = time.perf_counter()
                t.update(query_q_s=t1 - t0, search_s=t2 - t1, load_s=t3 - t2, rotate_s=t4 - t3, prefill_s=t5 - t4,
                         total_s=t5 - t0, loaded_tokens=n,
                         load_gbs=n * bytes_per_token / max(t3 - t2, 1e-9) / 1e9)
                return t
            # Each selected segment is one contiguous pinned block: DMA it straight to the device.
            kv = torch.empty((len(sel), L, 2, Hkv, S, D), device=dev, dtype=dtype)
            for j, i in enumerate(sel):
                kv[j].copy_(host[i], non_blocking=True)
            sync(dev)
            t3 = time.perf_counter()
            n = len(sel) * S
            kv = kv.permute(1, 2, 3, 0, 4, 5).reshape(L, 2, Hkv, n, D)
            pos = torch.arange(n, device=dev).unsqueeze(0)
            cos, sin = model.model.rotary_emb(kv[0, 1].unsqueeze(0), pos)
            # Every layer shares the RoPE: rotate all keys in one pass, to planned positions 0..n-1.
            k_all, _ = apply_rotary_pos_emb(kv[:, 0], kv[:, 0], cos, sin)
            cache = DynamicCache(config=cfg)
            for li in range(L):
                cache.update(k_all[li].unsqueeze(0), kv[li, 1].unsqueeze(0), li)
            sync(dev)
            t4 = time.perf_counter()
            with torch.no_grad():
                model(torch.tensor([q_ids], device=dev), past_key_values=cache, use_cache=True, logits_to_keep=1,
                      position_ids=torch.arange(n, n + Q, device=dev).unsqueeze(0))
            sync(dev)
            t5 = time.perf_counter()
            t.update(query_q_s=t1 - t0, search_s=t2 - t1, load_s=t3 - t2, rotate_s=t4 - t3, prefill_s=t5 - t4,
                     total_s=t5 - t0, loaded_tokens=n, load_gbs=n * bytes_per_token / max(t3 - t2, 1e-9) / 1e9)
            return t

        modes = [("kv_eager_", False), ("kv_", True)] if graphs_ok else [("kv_", False)]
        for prefix, graphs in modes:
            kv_memory(graphs)  # warm-up (and graph capture)
            runs = [kv_memory(graphs) for _ in range(args.repeats)]
            for k in runs[0]:
                row[f"{prefix}{k}"] = statistics.median(r[k] for r in runs)
        engine.cuda_graphs = False
        row["speedup_vs_full"] = row["full_recompute_s"] / row["kv_total_s"]
        if graphs_ok:
            row["eager_speedup_vs_full"] = row["full_recompute_s"] / row["kv_eager_total_s"]

        # ---- transformers' offloaded cache holding the whole history
        if not args.skip_offloaded and dev.type == "cuda":
            try:
                cache = DynamicCache(config=cfg, offloading=True)
                for li in range(L):
                    k = torch.randn((1, Hkv, H, D), device=dev, dtype=dtype)
                    cache.update(k, torch.randn_like(k), li)
                    cache.offload(li)
                    del k
                torch.cuda.empty_cache()
                snapshot = [(lay.keys, lay.values) for lay in cache.layers]

                def offloaded():
                    for lay, (k, v) in zip(cache.layers, snapshot, strict=True):  # drop the query tokens again
                        lay.keys, lay.values = k, v
                    with torch.no_grad():
                        model(torch.tensor([q_ids], device=dev), past_key_values=cache, use_cache=True,
                              logits_to_keep=1, position_ids=torch.arange(H, H + Q, device=dev).unsqueeze(0))
                row["offloaded_cache_s"], _ = timed(offloaded, dev, args.repeats)
                del cache, snapshot
            except Exception as e:  # noqa: BLE001 - report, don't hide, an API difference
                row["offloaded_cache_error"] = f"{type(e).__name__}: {e}"
        return row

    rows = []
    for H in hists:
        rows.append(bench_history(H))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": gpu_name, "torch": torch.__version__, "dtype": str(dtype), "h2d_pinned_gbs": h2d_gbs,
            "kv_bytes_per_token": bytes_per_token, "weights": "random (timing only)", "tiny": args.tiny,
            "date": time.strftime("%Y-%m-%d"), "budget": B, "segment_tokens": S,
            "index_layers": args.index_layers or "default",
            "index_device": args.index_device,
            "kv_path": "cuda graphs (HFEngine cuda_graphs=True); eager path in kv_eager_*" if graphs_ok
            else "eager"}
    (out / "gpu_ttft.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    hdr = ("| history | full recompute s | offloaded cache s | kv-memory eager s | kv-memory TTFT s | speedup "
           "| query-Q ms | search ms | load ms (GB/s) | rotate ms | prefill ms |\n"
           "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        off = f"{r['offloaded_cache_s']:.3f}" if "offloaded_cache_s" in r else "-"
        eager = f"{r['kv_eager_total_s']:.4f}" if "kv_eager_total_s" in r else "-"
        lines.append(
            f"| {r['history_tokens']} | {r['full_recompute_s']:.3f} | {off} | {eager} | {r['kv_total_s']:.4f} | "
            f"{r['speedup_vs_full']:.0f}x | {1e3 * r['kv_query_q_s']:.1f} | {1e3 * r['kv_search_s']:.1f} | "
            f"{1e3 * r['kv_load_s']:.1f} ({r['kv_load_gbs']:.1f}) | {1e3 * r['kv_rotate_s']:.1f} | "
            f"{1e3 * r['kv_prefill_s']:.1f} |")
    md = hdr + "\n".join(lines) + "\n"
    (out / "gpu_ttft.md").write_text(md)
    print(md)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        xs = [r["history_tokens"] for r in rows]
        ax.plot(xs, [r["full_recompute_s"] for r in rows], "o-", label="full recompute")
        if all("offloaded_cache_s" in r for r in rows):
            ax.plot(xs, [r["offloaded_cache_s"] for r in rows], "s-", label="transformers offloaded cache")
        if all("kv_eager_total_s" in r for r in rows):
            ax.plot(xs, [r["kv_eager_total_s"] for r in rows], "v--", label=f"kv-memory eager ({B}-token budget)")
        graphs_label = ", CUDA graphs" if graphs_ok else ""
        ax.plot(xs, [r["kv_total_s"] for r in rows], "^-", label=f"kv-memory ({B}-token budget{graphs_label})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("history tokens")
        ax.set_ylabel("TTFT (s)")
        ax.set_title(f"TTFT, Llama-3.1-8B shape (random weights), {gpu_name}")
        ax.legend()
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "gpu_ttft.png", dpi=120)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
