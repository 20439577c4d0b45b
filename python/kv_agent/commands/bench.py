"""`kvagent bench locomo|retrieval|planted|merge`: the LoCoMo benchmark harnesses."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", metavar="BENCH", required=True)
    p = bsub.add_parser("locomo", help="LoCoMo accuracy, recall, prefill and latency vs baselines")
    p.add_argument("--locomo", default=None, help="LoCoMo json (default: ../shared/data/locomo/locomo10_dev.json)")
    p.add_argument("--conversations", default="", help="comma-separated sample ids (default: all)")
    p.add_argument("--max-conversations", type=int, default=0)
    p.add_argument("--max-sessions", type=int, default=0, help="first N sessions per conversation (0 = all)")
    p.add_argument("--per-category", type=int, default=0, help="questions per category per conversation (0 = all)")
    p.add_argument("--questions", type=int, default=0,
                   help="questions per conversation, stratified round-robin over categories (0 = off)")
    p.add_argument("--categories", default="1,2,3,4,5")
    p.add_argument("--systems", default="no-memory,full-context,rag-minilm,rag-bm25,kv-memory")
    p.add_argument("--budget", type=int, default=512, help="retrieved context tokens per question")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--kv-variants", default="", help="index ablations, e.g. 'mean:softmax:mean,bbox:zscore:max'")
    p.add_argument("--variants-answer", action="store_true",
                   help="index ablations also generate answers (default: retrieval and recall only)")
    p.add_argument("--model", default=None, help="local HF model directory (default: Gemma 3 270M)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/out/locomo")
    p.set_defaults(func=_locomo)
    r = bsub.add_parser("retrieval", help="LoCoMo evidence recall@k only (no answers): RAG, kv-memory, variants, oracle")
    r.add_argument("--locomo", default=None, help="LoCoMo json (default: ../shared/data/locomo/locomo10_dev.json)")
    r.add_argument("--split", default="tuning", help="tuning (conv-26,30,41), report (conv-42,43,44,47) or all")
    r.add_argument("--conversations", default="", help="comma-separated subset of the split (default: all of it)")
    r.add_argument("--max-sessions", type=int, default=0, help="first N sessions per conversation (0 = all)")
    r.add_argument("--systems", default="rag-bm25,rag-minilm,kv-memory,oracle")
    r.add_argument("--kv-variants", default="", help="index variants over the same store, e.g. 'mean:zscore:max'")
    r.add_argument("--cache-dir", default=None, help="keep ingested kv-memory stores here and reuse them")
    r.add_argument("--max-segment-tokens", type=int, default=256)
    r.add_argument("--oracle-chunk", type=int, default=1024, help="context tokens per oracle forward")
    r.add_argument("--oracle-heads-from", default=None,
                   help="retrieval.json of a tuning run: its per-head table picks the oracle's best head")
    r.add_argument("--model", default=None, help="local HF model directory (default: the default model)")
    r.add_argument("--out", default="bench/out/retrieval")
    r.add_argument("--finalize", action="store_true",
                   help="only rebuild the report from the checkpoint in --out (a run stopped early); runs nothing")
    r.set_defaults(func=_retrieval)
    pl = bsub.add_parser("planted", help="planted-fact suite: top-1/top-5 through memory.retrieve, BM25 and MiniLM")
    pl.add_argument("--suite", default=None, help="suite JSON (default: the committed kv_agent/bench/data/planted_v1.json)")
    pl.add_argument("--split", default="tuning", help="tuning, report or all")
    pl.add_argument("--systems", default="rag-bm25,rag-minilm,kv-memory")
    pl.add_argument("--episodes", type=int, default=0, help="first N episodes of the split (0 = all)")
    pl.add_argument("--cache-dir", default=None, help="keep the stored exchanges here and reuse them")
    pl.add_argument("--model", default=None, help="local HF model directory (default: the default model)")
    pl.add_argument("--out", default="bench/out/planted")
    pl.set_defaults(func=_planted)
    m = bsub.add_parser("merge", help="combine LoCoMo runs over disjoint conversations into one report")
    m.add_argument("runs", nargs="+", help="locomo.json files (or their directories)")
    m.add_argument("--out", required=True)
    m.set_defaults(func=_merge)


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _locomo(args: argparse.Namespace) -> int:
    from kv_agent.bench.locomo_bench import BenchConfig, run
    from kv_agent.bench.report import ablation_table, markdown_table

    cfg = BenchConfig(locomo=args.locomo, conversations=_split(args.conversations),
                      max_conversations=args.max_conversations, max_sessions=args.max_sessions,
                      per_category=args.per_category, questions=args.questions,
                      variants_answer=args.variants_answer,
                      categories=[int(c) for c in _split(args.categories)], systems=_split(args.systems),
                      token_budget=args.budget, max_new_tokens=args.max_new_tokens, seed=args.seed, out=args.out,
                      model=args.model, kv_variants=_split(args.kv_variants))
    doc = run(cfg, progress=True)
    print(markdown_table(doc["aggregates"]))
    print(ablation_table(doc["aggregates"]))
    print(f"wrote {args.out}/locomo.json, locomo.md and plots ({doc['wall_s']:.0f} s)")
    return 0


def _retrieval(args: argparse.Namespace) -> int:
    from kv_agent.bench.retrieval_bench import RetrievalConfig, finalize, markdown, run

    if args.finalize:
        doc = finalize(args.out)
        print(markdown(doc))
        print(f"rebuilt {args.out}/retrieval.json, retrieval.md and recall_at_k.png from its checkpoint")
        return 0
    cfg = RetrievalConfig(locomo=args.locomo, split=args.split, conversations=_split(args.conversations),
                          max_sessions=args.max_sessions, systems=_split(args.systems),
                          kv_variants=_split(args.kv_variants), cache_dir=args.cache_dir, out=args.out,
                          model=args.model, max_segment_tokens=args.max_segment_tokens,
                          oracle_chunk=args.oracle_chunk, oracle_heads_from=args.oracle_heads_from)
    doc = run(cfg, progress=True)
    print(markdown(doc))
    print(f"wrote {args.out}/retrieval.json, retrieval.md and recall_at_k.png ({doc['wall_s']:.0f} s)")
    return 0


def _planted(args: argparse.Namespace) -> int:
    from kv_agent.bench.planted import PlantedConfig, planted_markdown, run_planted

    cfg = PlantedConfig(suite=args.suite, split=args.split, systems=_split(args.systems), cache_dir=args.cache_dir,
                        out=args.out, model=args.model, episodes=args.episodes)
    doc = run_planted(cfg, progress=True)
    print(planted_markdown(doc))
    print(f"wrote {args.out}/planted.json and planted.md ({doc['wall_s']:.0f} s)")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kv_agent.bench.report import ablation_table, markdown_table, merge_runs

    paths = [Path(r) / "locomo.json" if Path(r).is_dir() else Path(r) for r in args.runs]
    doc = merge_runs(paths, Path(args.out))
    print(markdown_table(doc["aggregates"]))
    print(ablation_table(doc["aggregates"]))
    print(f"wrote {args.out}/locomo.json, locomo.md and plots ({len(doc['records'])} records)")
    return 0
