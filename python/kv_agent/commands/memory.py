"""`kvagent chat` and `kvagent demo`: the memory on a real model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="interactive multi-session chat with KV memory")
    p.add_argument("--store", default=None, help="memory directory (default: $KVAGENT_HOME/memory)")
    p.add_argument("--engine", default="hf", choices=("hf", "llama.cpp"),
                   help="inference engine (llama.cpp: the GGUF runs on llama.cpp, see docs/engine-llama-cpp.md)")
    p.add_argument("--model", default=None,
                   help="local HF model directory, or a GGUF file with --engine llama.cpp "
                        "(default: Gemma 3 270M from PyPI)")
    p.add_argument("--session", default=None, help="session id (default: a new one; sessions share memory)")
    p.add_argument("--namespace", default="default")
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--budget", type=int, default=512, help="token budget of retrieved memory per turn")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.set_defaults(func=_chat)

    d = sub.add_parser("demo", help="LoCoMo demo: KV memory vs full context on one conversation")
    d.add_argument("--locomo", default=None, help="LoCoMo json (default: ../shared/data/locomo/locomo10_dev.json)")
    d.add_argument("--conversation", default="conv-30", help="sample id (default: conv-30, the shortest)")
    d.add_argument("--per-category", type=int, default=2, help="questions per category (1-5)")
    d.add_argument("--max-sessions", type=int, default=8,
                   help="use the first N sessions and the questions answerable from them (0 = all)")
    d.add_argument("--budget", type=int, default=512, help="token budget of retrieved KV per question")
    d.add_argument("--model", default=None, help="local HF model directory (default: Gemma 3 270M from PyPI)")
    d.add_argument("--out", default="bench/out/demo", help="where the JSON/markdown/plots go")
    d.set_defaults(func=_demo)


def _chat(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kv_agent.api import AgentMemory, CacheManager

    console = Console()
    with console.status("loading model and memory..."):
        memory = AgentMemory(args.store, backend="gpu", namespace=args.namespace)
        cm = CacheManager(engine=args.engine, model=args.model, memory=memory, session=args.session)
    console.print(f"[bold]kv-agent chat[/] session [cyan]{cm.session}[/], memory {memory.path or 'in RAM'}, "
                  f"{len(memory.index)} segments indexed. Commands: /session NAME, /sessions, /quit")
    while True:
        try:
            line = console.input("[bold green]you> [/]").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/sessions":
            console.print(", ".join(memory.sessions()) or "(none)")
            continue
        if line.startswith("/session "):
            cm.session = line.split(None, 1)[1]
            console.print(f"switched to session [cyan]{cm.session}[/]")
            continue
        ans = cm.chat(line, top_k=args.top_k, token_budget=args.budget, max_new_tokens=args.max_new_tokens)
        console.print(f"[bold blue]model>[/] {ans.text}")
        for h in ans.hits:
            console.print(f"   [dim]memory {h.session}#{h.turn} score {h.score:.3f} ({h.num_tokens} tok): "
                          f"{h.text.strip()[:80]!r}[/]")
        console.print(f"   [dim]prefilled {ans.prefill_tokens} tok, reused {ans.reused_tokens} tok from memory, "
                      f"retrieval {1e3 * ans.retrieval_s:.0f} ms, TTFT {1e3 * ans.ttft_s:.0f} ms, "
                      f"total {ans.total_s:.2f} s[/]")
    memory.close()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kv_agent.bench.locomo_bench import BenchConfig, run

    console = Console()
    cfg = BenchConfig(locomo=args.locomo, conversations=[args.conversation], per_category=args.per_category,
                      max_sessions=args.max_sessions,
                      systems=["kv-memory", "full-context"], token_budget=args.budget, model=args.model,
                      out=args.out)
    doc = run(cfg, progress=True)
    recs = doc["records"]
    table = Table(title=f"LoCoMo {args.conversation}: KV memory vs full context")
    for col in ("cat", "question", "gold", "kv-memory", "F1", "full-context", "F1"):
        table.add_column(col, overflow="fold")
    by_q: dict[str, dict] = {}
    for r in recs:
        by_q.setdefault(r["qid"], {})[r["system"]] = r
    for rs in by_q.values():
        kv, full = rs.get("kv-memory"), rs.get("full-context")
        if kv is None or full is None:
            continue
        table.add_row(str(kv["category"]), kv["question"], kv["answer"], kv["prediction"], f"{kv['score']:.2f}",
                      full["prediction"], f"{full['score']:.2f}")
    console.print(table)
    summary = Table(title="summary (per question)")
    for col in ("system", "F1 cat 1-4", "adversarial", "prefill tokens (mean)", "reused tokens (mean)",
                "TTFT median (s)", "total median (s)"):
        summary.add_column(col)
    for name, a in doc["aggregates"].items():
        summary.add_row(name, f"{100 * a['f1_cat1_4']:.1f}", f"{100 * a['adversarial_cat5']:.1f}",
                        f"{a['prefill_tokens_mean']:.0f}", f"{a['reused_tokens_mean']:.0f}",
                        f"{a['ttft_s_median']:.3f}", f"{a['total_s_median']:.2f}")
    console.print(summary)
    kv = doc["aggregates"].get("kv-memory", {})
    if "prefill_reduction_vs_full-context" in kv:
        console.print(f"kv-memory prefills {kv['prefill_reduction_vs_full-context']:.0f}x fewer tokens per question "
                      f"than full context (stateless). Full results: {Path(args.out) / 'locomo.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(0)
