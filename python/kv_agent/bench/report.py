"""Aggregation, JSON/markdown output and plots for the LoCoMo benchmark."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kv_agent.bench.locomo import CATEGORY_NAMES
from kv_agent.errors import InvalidArgumentError

RECALL_KS = (5, 10, 25)


@dataclass
class Record:
    system: str
    qid: str
    conversation: str
    category: int
    question: str
    answer: str
    prediction: str
    score: float  # NaN when not answered
    evidence: list[str]
    retrieved: list[str] = field(default_factory=list)  # dia_ids best first (retrieval systems)
    used: list[str] = field(default_factory=list)  # dia_ids actually placed in the context
    context_tokens: int = 0  # tokens the model attends to (context + question)
    prefill_tokens: int = 0  # tokens computed for this question (stateless server view)
    reused_tokens: int = 0  # tokens whose KV came from memory
    retrieval_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0
    recall: dict[str, dict[str, float]] = field(default_factory=dict)  # "@k" -> recall dict
    answered: bool = True  # False: retrieval-only row (index ablations): recall and timing, no answer


def _pct(values, q):
    return float(np.percentile(values, q)) if len(values) else float("nan")


def aggregate(records: list[Record]) -> dict:
    """Per-system aggregates: scores per category, prefill and latency statistics, recall@k."""
    by_sys: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_sys[r.system].append(r)
    out = {}
    for sys_name, recs in by_sys.items():
        a: dict = {"questions": len(recs)}
        for k in RECALL_KS:
            rs = [r.recall[f"@{k}"] for r in recs if f"@{k}" in r.recall]
            if rs:
                a[f"recall@{k}"] = {m: float(np.mean([x[m] for x in rs])) for m in ("recall", "recall_any", "recall_all")}
        ret = [r.retrieval_s for r in recs]
        a["retrieval_s_median"], a["retrieval_s_p95"] = _pct(ret, 50), _pct(ret, 95)
        recs = [r for r in recs if r.answered]
        a["answered"] = len(recs)
        if not recs:  # retrieval-only ablation row
            out[sys_name] = a
            continue
        cats = defaultdict(list)
        for r in recs:
            cats[r.category].append(r.score)
        a["f1_by_category"] = {CATEGORY_NAMES[c]: float(np.mean(v)) for c, v in sorted(cats.items())}
        a["count_by_category"] = {CATEGORY_NAMES[c]: len(v) for c, v in sorted(cats.items())}
        main = [r.score for r in recs if r.category in (1, 2, 3, 4)]
        a["f1_cat1_4"] = float(np.mean(main)) if main else float("nan")
        adv = [r.score for r in recs if r.category == 5]
        a["adversarial_cat5"] = float(np.mean(adv)) if adv else float("nan")
        a["overall"] = float(np.mean([r.score for r in recs]))
        pre = [r.prefill_tokens for r in recs]
        a["prefill_tokens_mean"] = float(np.mean(pre))
        a["prefill_tokens_p95"] = _pct(pre, 95)
        a["context_tokens_mean"] = float(np.mean([r.context_tokens for r in recs]))
        a["reused_tokens_mean"] = float(np.mean([r.reused_tokens for r in recs]))
        ctx = sum(r.context_tokens for r in recs)
        a["cache_hit_rate"] = (sum(r.reused_tokens for r in recs) / ctx) if ctx else 0.0
        for key in ("ttft_s", "total_s"):
            vals = [getattr(r, key) for r in recs]
            a[f"{key}_median"] = _pct(vals, 50)
            a[f"{key}_p95"] = _pct(vals, 95)
        out[sys_name] = a
    # Reduction factors of every system's prefill relative to the baselines.
    for a in out.values():
        for base in ("full-context", "rag-minilm", "rag-bm25"):
            if base in out and a.get("prefill_tokens_mean", 0) > 0 and "prefill_tokens_mean" in out[base]:
                a[f"prefill_reduction_vs_{base}"] = out[base]["prefill_tokens_mean"] / a["prefill_tokens_mean"]
    return out


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_total_kb"] = int(f.readline().split()[1])
    except OSError:
        pass
    try:
        import torch
        import transformers

        info["torch"] = torch.__version__
        info["transformers"] = transformers.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[3]
        return subprocess.check_output(["git", "-C", str(root), "rev-parse", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def markdown_table(agg: dict) -> str:
    cats = ["multi-hop", "temporal", "open-domain", "single-hop"]
    lines = [
        "| system | F1 cat 1-4 | " + " | ".join(cats) + " | adversarial (cat 5) | overall | prefill tok (mean / p95) "
        "| reused tok | TTFT median s | total median s | recall@5 | recall@10 | recall@25 |",
        "|---|" + "---|" * (len(cats) + 10),
    ]
    def pct(x: float) -> str:
        return "-" if x != x else f"{100 * x:.1f}"  # NaN: no question of that kind

    for name, a in agg.items():
        if not a.get("answered"):
            continue  # retrieval-only rows are in ablation_table
        f1c = [pct(a["f1_by_category"].get(c, float("nan"))) for c in cats]
        rec = [f"{100 * a[f'recall@{k}']['recall']:.1f}" if f"recall@{k}" in a else "-" for k in RECALL_KS]
        lines.append(
            f"| {name} | {pct(a['f1_cat1_4'])} | " + " | ".join(f1c)
            + f" | {pct(a['adversarial_cat5'])} | {pct(a['overall'])}"
            + f" | {a['prefill_tokens_mean']:.0f} / {a['prefill_tokens_p95']:.0f} | {a['reused_tokens_mean']:.0f}"
            + f" | {a['ttft_s_median']:.3f} | {a['total_s_median']:.3f} | " + " | ".join(rec) + " |"
        )
    return "\n".join(lines) + "\n"


def ablation_table(agg: dict) -> str:
    """Retrieval rows (kv-memory and its index variants, and the RAG baselines for reference):
    evidence recall@k (fractional / any / all) and retrieval time; F1 where the row answered."""
    rows = {n: a for n, a in agg.items() if "recall@5" in a}
    if not rows:
        return ""
    head = " | ".join(f"recall@{k} (frac / any / all)" for k in RECALL_KS)
    lines = [f"| retrieval | {head} | retrieval median ms | F1 cat 1-4 |", "|---|" + "---|" * (len(RECALL_KS) + 2)]
    for name, a in rows.items():
        cells = []
        for k in RECALL_KS:
            r = a.get(f"recall@{k}")
            cells.append("-" if r is None else " / ".join(f"{100 * r[m]:.1f}" for m in ("recall", "recall_any", "recall_all")))
        f1 = a.get("f1_cat1_4", float("nan"))
        f1s = "-" if f1 != f1 else f"{100 * f1:.1f}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {1000 * a['retrieval_s_median']:.1f} | {f1s} |")
    return "\n".join(lines) + "\n"


def plot(agg: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, a in agg.items():
        if not a.get("answered"):
            continue
        ax.scatter(max(a["prefill_tokens_mean"], 1), 100 * a["f1_cat1_4"], s=60)
        ax.annotate(name, (max(a["prefill_tokens_mean"], 1), 100 * a["f1_cat1_4"]), textcoords="offset points",
                    xytext=(5, 5))
    ax.set_xscale("log")
    ax.set_xlabel("prefill tokens per question (mean, log scale)")
    ax.set_ylabel("F1, categories 1-4 (%)")
    ax.set_title("LoCoMo: accuracy vs prefill")
    ax.grid(True, alpha=0.3)
    p = out_dir / "accuracy_vs_prefill.png"
    fig.tight_layout()
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)

    with_recall = {n: a for n, a in agg.items() if "recall@5" in a}
    if with_recall:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        width = 0.8 / len(with_recall)
        for i, (name, a) in enumerate(with_recall.items()):
            vals = [100 * a.get(f"recall@{k}", {}).get("recall", 0) for k in RECALL_KS]
            ax.bar(np.arange(len(RECALL_KS)) + i * width, vals, width, label=name)
        ax.set_xticks(np.arange(len(RECALL_KS)) + width * (len(with_recall) - 1) / 2)
        ax.set_xticklabels([f"@{k}" for k in RECALL_KS])
        ax.set_ylabel("evidence recall (%)")
        ax.set_title("LoCoMo: retrieval recall@k")
        ax.legend()
        p = out_dir / "recall_at_k.png"
        fig.tight_layout()
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def _record_json(r: Record) -> dict:
    d = asdict(r)
    if not r.answered:
        d["score"] = None  # JSON has no NaN
    return d


def write_outputs(out_dir: Path, config: dict, records: list[Record], extra: dict | None = None,
                  plots: bool = True) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    agg = aggregate(records)
    doc = {
        "config": config,
        "machine": machine_info(),
        "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "aggregates": agg,
        "records": [_record_json(r) for r in records],
    }
    if extra:
        doc.update(extra)
    with open(out_dir / "locomo.json", "w") as f:
        json.dump(doc, f, indent=1)
    with open(out_dir / "locomo.md", "w") as f:
        f.write(markdown_table(agg))
        abl = ablation_table(agg)
        if abl:
            f.write("\n" + abl)
    doc["plots"] = [str(p) for p in plot(agg, out_dir)] if plots else []
    return doc


def load_records(doc: dict) -> list[Record]:
    """Records of a saved locomo.json (scores of retrieval-only rows come back as NaN)."""
    out = []
    for d in doc["records"]:
        d = dict(d)
        if d.get("score") is None:
            d["score"] = float("nan")
        out.append(Record(**d))
    return out


def merge_runs(paths: list[Path], out_dir: Path) -> dict:
    """Combines runs over disjoint conversations (e.g. run in parallel processes) into one
    report. Refuses runs whose configurations differ other than in conversations/out, or that
    repeat a (system, question)."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    ignore = {"conversations", "out", "max_conversations"}
    base = {k: v for k, v in docs[0]["config"].items() if k not in ignore}
    for p, d in zip(paths, docs, strict=True):
        other = {k: v for k, v in d["config"].items() if k not in ignore}
        if other != base:
            diff = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
            raise InvalidArgumentError(f"{p}: configuration differs from {paths[0]} in {diff}")
    records: list[Record] = []
    seen: set = set()
    ingest: dict = {}
    for p, d in zip(paths, docs, strict=True):
        for r in load_records(d):
            if (r.system, r.qid) in seen:
                raise InvalidArgumentError(f"{p}: {r.system} {r.qid} appears in more than one run")
            seen.add((r.system, r.qid))
            records.append(r)
        ingest.update(d.get("ingest", {}))
    config = dict(docs[0]["config"])
    config["conversations"] = sorted({r.conversation for r in records})
    extra = {"ingest": ingest, "wall_s": sum(d.get("wall_s", 0.0) for d in docs),
             "merged_from": [{"path": str(p), "git_commit": d.get("git_commit"), "date": d.get("date"),
                              "wall_s": d.get("wall_s"), "machine": d.get("machine")} for p, d in zip(paths, docs, strict=True)]}
    return write_outputs(Path(out_dir), config, records, extra)
