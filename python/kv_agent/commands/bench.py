"""`kvagent bench locomo`: the LoCoMo benchmark harness."""

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


def _merge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kv_agent.bench.report import ablation_table, markdown_table, merge_runs

    paths = [Path(r) / "locomo.json" if Path(r).is_dir() else Path(r) for r in args.runs]
    doc = merge_runs(paths, Path(args.out))
    print(markdown_table(doc["aggregates"]))
    print(ablation_table(doc["aggregates"]))
    print(f"wrote {args.out}/locomo.json, locomo.md and plots ({len(doc['records'])} records)")
    return 0
