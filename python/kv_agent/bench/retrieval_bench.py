"""`kvagent bench retrieval`: evidence recall@k on LoCoMo without generating answers.

Every question with annotated evidence is scored for evidence recall@5/10/25 (fractional, any,
all; dia_ids normalised as in ``locomo.py``) by:

  rag-bm25, rag-minilm   one document per turn ("speaker: text"), the question as the query
  kv-memory              the product path: ``CacheManager.retrieve`` with the current defaults,
                         the template suffix (question + answer cue) as the query
  kv-memory[variant]     other index configurations ("score:norm:agg[:layers]") over the same
                         stored summaries; one query forward per question serves them all
  oracle-*               the question's own attention over the whole conversation in context
                         (``attention_oracle``): summed over (layer, head), max over (layer, head),
                         and the single best (layer, head) chosen on the tuning split

The dev conversations are split: choices are made on ``tuning`` and the ``report`` part is only
run for a final table; every number records the split it came from. Ingested stores are cached
on disk (``ingest_cache``), so a rerun costs only the query forwards and the index searches.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kv_agent.bench import scoring
from kv_agent.bench.locomo import Conversation, Question, load_locomo
from kv_agent.bench.prompts import LocomoTemplate
from kv_agent.bench.report import RECALL_KS, git_commit, machine_info
from kv_agent.errors import InvalidArgumentError

SPLITS = {
    "tuning": ("conv-26", "conv-30", "conv-41"),
    "report": ("conv-42", "conv-43", "conv-44", "conv-47"),
}
ALL_SYSTEMS = ("rag-bm25", "rag-minilm", "kv-memory", "oracle")
ORACLE_ROWS = ("oracle-sum", "oracle-max")
METRICS = ("recall", "recall_any", "recall_all")
HEAD_K = 10  # the oracle's best (layer, head) is the one with the highest mean recall@HEAD_K on tuning


@dataclass
class RetrievalConfig:
    locomo: str | None = None
    split: str = "tuning"  # a key of ``splits`` or "all"
    conversations: list[str] = field(default_factory=list)  # a subset of the split (empty = all of it)
    max_sessions: int = 0  # first N sessions and the questions answerable from them (0 = all)
    systems: list[str] = field(default_factory=lambda: list(ALL_SYSTEMS))
    kv_variants: list[str] = field(default_factory=list)
    cache_dir: str | None = None  # ingested stores; None = temporary (ingest every run)
    out: str = "bench/out/retrieval"
    model: str | None = None  # local HF model directory; None = the default model
    max_segment_tokens: int = 256
    oracle_chunk: int = 1024  # context tokens per forward when the oracle runs a conversation
    oracle_heads_from: str | None = None  # a retrieval.json whose tuning per-head table picks the head
    splits: dict = field(default_factory=lambda: {k: list(v) for k, v in SPLITS.items()})


@dataclass
class RetrievalRecord:
    system: str
    qid: str
    conversation: str
    split: str
    category: int
    evidence: list[str]
    retrieved: list[str]  # dia_ids best first (at most max(RECALL_KS))
    recall: dict = field(default_factory=dict)  # "@k" -> {recall, recall_any, recall_all}
    seconds: float = 0.0  # this question's retrieval time (query forward + search)


def split_conversations(cfg: RetrievalConfig) -> dict[str, str]:
    """conversation id -> split name, in run order; InvalidArgumentError on a bad split or subset."""
    names = list(cfg.splits) if cfg.split == "all" else [cfg.split]
    for n in names:
        if n not in cfg.splits:
            raise InvalidArgumentError(f"unknown split {n!r}; choose one of {sorted(cfg.splits)} or 'all'")
    chosen = {c: n for n in names for c in cfg.splits[n]}
    if cfg.conversations:
        bad = [c for c in cfg.conversations if c not in chosen]
        if bad:
            raise InvalidArgumentError(f"conversations {bad} are not in split {cfg.split!r} ({sorted(chosen)})")
        chosen = {c: chosen[c] for c in chosen if c in set(cfg.conversations)}
    return chosen


def check_config(cfg: RetrievalConfig) -> None:
    """Rejects bad options before anything is loaded or run."""
    from kv_agent.bench.kv_system import parse_variant

    unknown = [s for s in cfg.systems if s not in ALL_SYSTEMS]
    if unknown or not cfg.systems:
        raise InvalidArgumentError(f"unknown systems {unknown}; choose from {list(ALL_SYSTEMS)}")
    if cfg.kv_variants and "kv-memory" not in cfg.systems:
        raise InvalidArgumentError("--kv-variants needs the kv-memory system")
    for v in cfg.kv_variants:
        try:
            parse_variant(v)
        except (ValueError, RuntimeError) as e:
            raise InvalidArgumentError(f"bad index variant {v!r}: {e}") from e
    if cfg.max_segment_tokens < 1 or cfg.oracle_chunk < 1 or cfg.max_sessions < 0:
        raise InvalidArgumentError("max_segment_tokens and oracle_chunk must be >= 1, max_sessions >= 0")
    if cfg.oracle_heads_from and not Path(cfg.oracle_heads_from).is_file():
        raise InvalidArgumentError(f"--oracle-heads-from: no file {cfg.oracle_heads_from}")
    split_conversations(cfg)


def make_record(system: str, conv: Conversation, split: str, q: Question, retrieved: list[str],
                seconds: float) -> RetrievalRecord:
    r = RetrievalRecord(system, q.qid, conv.sample_id, split, q.category, list(q.evidence), retrieved[:max(RECALL_KS)],
                        seconds=seconds)
    for k in RECALL_KS:
        rec = scoring.recall_at(retrieved[:k], q.evidence)
        if rec is not None:
            r.recall[f"@{k}"] = rec
    return r


def dedupe(ids) -> list:
    return list(dict.fromkeys(ids))


# ------------------------------------------------------------------ systems
def text_rows(kind: str, conv: Conversation, split: str, questions: list[Question]) -> tuple[list, dict]:
    from kv_agent.bench.retrievers import make_retriever

    t0 = time.perf_counter()
    retriever = make_retriever(kind, [f"{t.speaker}: {t.text}" for t in conv.turns])
    index_s = time.perf_counter() - t0
    rows = []
    for q in questions:
        t1 = time.perf_counter()
        ranked = retriever.search(q.question, max(RECALL_KS))
        rows.append(make_record(f"rag-{kind}", conv, split, q, [conv.turns[i].dia_id for i, _ in ranked],
                                time.perf_counter() - t1))
    return rows, {"index_s": index_s, "query_s": sum(r.seconds for r in rows)}


def kv_rows(ing, template: LocomoTemplate, variants: list[str], split: str, questions: list[Question],
            progress: bool) -> tuple[list, dict]:
    """kv-memory through the public ``CacheManager.retrieve``; variants over the same summaries."""
    import torch
    from tqdm.auto import tqdm

    from kv_agent.bench.kv_system import parse_variant
    from kv_agent.index import LatentIndex, default_layers

    cm, conv = ing.cm, ing.conv
    indexes = {}
    t0 = time.perf_counter()
    if variants:
        infos = [i for i in cm.memory.store.list(ns=conv.sample_id) if i.key in ing.key_to_dia and i.summary]
        for v in variants:
            opts = parse_variant(v)
            if opts.layers is None:
                opts.layers = default_layers(cm.spec.num_layers)
            idx = LatentIndex(cm.spec, opts)
            for i in infos:
                m = i.meta
                idx.add(i.key, i.summary, ns=m.ns, agent=m.agent, session=m.session, turn=m.turn, chunk=m.chunk,
                        time_us=m.time_us, num_tokens=i.layout.num_tokens)
            indexes[v] = idx
    build_s = time.perf_counter() - t0
    layers = sorted({layer for idx in indexes.values() for layer in idx.layers})
    rows, variant_query_s = [], 0.0
    for q in tqdm(questions, desc=f"{conv.sample_id} kv-memory", leave=False, disable=not progress):
        suffix = cm.tokenizer(template.suffix(q), add_special_tokens=False)["input_ids"]
        t1 = time.perf_counter()
        hits = sorted(cm.retrieve("", top_k=max(RECALL_KS), query_ids=suffix), key=lambda h: h.rank)
        got = dedupe(ing.key_to_dia[h.key] for h in hits if h.key in ing.key_to_dia)
        rows.append(make_record("kv-memory", conv, split, q, got, time.perf_counter() - t1))
        if not indexes:
            continue
        t2 = time.perf_counter()
        stacked = cm.engine.query_vectors(suffix, cm.prefix_context, layers)  # the Engine interface
        qs = {layer: stacked[n] for n, layer in enumerate(layers)}
        fwd = time.perf_counter() - t2
        variant_query_s += fwd
        for v, idx in indexes.items():
            t3 = time.perf_counter()
            qv = torch.stack([qs[i] for i in idx.layers]).float().contiguous()
            ranked = sorted(idx.search(qv, top_k=max(RECALL_KS), ns=conv.sample_id), key=lambda h: h.rank)
            got = dedupe(ing.key_to_dia[h.key] for h in ranked if h.key in ing.key_to_dia)
            rows.append(make_record(f"kv-memory[{v}]", conv, split, q, got, fwd + time.perf_counter() - t3))
    timing = {"kv-memory": {"query_s": sum(r.seconds for r in rows if r.system == "kv-memory")},
              "variants": {"index_build_s": build_s, "query_forward_s": variant_query_s,
                           "search_s": {v: sum(r.seconds for r in rows if r.system == f"kv-memory[{v}]")
                                        - variant_query_s for v in indexes}}}
    return rows, timing


def oracle_rows(model, tok, template: LocomoTemplate, conv: Conversation, split: str, questions: list[Question],
                chunk: int, progress: bool) -> tuple[list, dict, dict]:
    """Rows oracle-sum and oracle-max, the per-head top-25 turn lists (qid -> int16 [L, Hq, 25])
    and timing."""
    from tqdm.auto import tqdm

    from kv_agent.bench.attention_oracle import AttentionOracle, ranked_spans

    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    oracle = AttentionOracle(model, chunk_tokens=chunk)
    t0 = time.perf_counter()
    oracle.prepare([bos + ids(template.prefix(conv))] + [ids(template.line(t)) for t in conv.turns])
    prepare_s = time.perf_counter() - t0
    dias = [t.dia_id for t in conv.turns]
    rows, heads = [], {}
    for q in tqdm(questions, desc=f"{conv.sample_id} oracle", leave=False, disable=not progress):
        t1 = time.perf_counter()
        mass = oracle.turn_mass(ids(template.suffix(q)))  # [L, Hq, turns]
        s = time.perf_counter() - t1
        for name, agg in (("oracle-sum", mass.sum(axis=(0, 1))), ("oracle-max", mass.max(axis=(0, 1)))):
            rows.append(make_record(name, conv, split, q, [dias[i] for i in ranked_spans(agg, max(RECALL_KS))], s))
        heads[q.qid] = ranked_spans(mass, max(RECALL_KS)).astype(np.int16)
    info = {"prepare_s": prepare_s, "context_tokens": oracle.context_tokens,
            "query_s": sum(r.seconds for r in rows if r.system == "oracle-sum"),
            "layer_types": oracle.layer_types}
    return rows, heads, info


# ------------------------------------------------------------------ oracle heads
def head_recall(heads: dict, questions: dict[str, tuple[Question, list[str]]]) -> dict:
    """Mean recall (fractional) per (layer, head) at every k over the given qids:
    {"@k": [[...per head...] per layer], "questions": n}."""
    qids = [qid for qid in heads if qid in questions]
    if not qids:
        return {"questions": 0}
    L, H, _ = heads[qids[0]].shape
    out = {"questions": len(qids)}
    for k in RECALL_KS:
        acc = np.zeros((L, H))
        for qid in qids:
            q, dias = questions[qid]
            for li in range(L):
                for h in range(H):
                    acc[li, h] += scoring.recall_at([dias[i] for i in heads[qid][li, h, :k]], q.evidence)["recall"]
        out[f"@{k}"] = (acc / len(qids)).round(5).tolist()
    return out


def best_head(table: dict) -> tuple[int, int]:
    m = np.asarray(table[f"@{HEAD_K}"])
    li, h = np.unravel_index(int(np.argmax(m)), m.shape)  # first maximum in (layer, head) order
    return int(li), int(h)


# ------------------------------------------------------------------ report
def aggregate(records: list[RetrievalRecord]) -> dict:
    """{split: {system: {questions, recall@k: {recall, recall_any, recall_all}, retrieval_ms_median}}}"""
    groups: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        groups[r.split][r.system].append(r)
    out: dict = {}
    for split, systems in groups.items():
        out[split] = {}
        for name, recs in systems.items():
            a: dict = {"questions": len(recs), "conversations": sorted({r.conversation for r in recs})}
            for k in RECALL_KS:
                rs = [r.recall[f"@{k}"] for r in recs if f"@{k}" in r.recall]
                if rs:
                    a[f"recall@{k}"] = {m: float(np.mean([x[m] for x in rs])) for m in METRICS}
            a["retrieval_ms_median"] = 1000 * float(np.median([r.seconds for r in recs]))
            out[split][name] = a
    return out


def markdown(doc: dict) -> str:
    lines = []
    head = " | ".join(f"recall@{k} (frac / any / all)" for k in RECALL_KS)
    for split, systems in doc["aggregates"].items():
        convs = sorted({c for a in systems.values() for c in a["conversations"]})
        lines += [f"### split `{split}` ({', '.join(convs)})", "",
                  f"| system | questions | {head} | retrieval median ms |", "|---|---|" + "---|" * (len(RECALL_KS) + 1)]
        for name, a in systems.items():
            cells = [" / ".join(f"{100 * a[f'recall@{k}'][m]:.1f}" for m in METRICS) if f"recall@{k}" in a else "-"
                     for k in RECALL_KS]
            lines.append(f"| {name} | {a['questions']} | " + " | ".join(cells) + f" | {a['retrieval_ms_median']:.1f} |")
        lines.append("")
    oracle = doc.get("oracle", {})
    if oracle.get("selected_head"):
        sh = oracle["selected_head"]
        lines += [f"Oracle best head: layer {sh['layer']} head {sh['head']} ({sh['layer_type']}), chosen on "
                  f"`{sh['selected_on']}` by mean recall@{HEAD_K} ({100 * sh['recall_on_selection']:.1f}); "
                  + ("its row on `tuning` is in-sample." if "tuning" in doc["aggregates"] else ""), ""]
    for split, table in oracle.get("per_head", {}).items():
        if not table.get("questions"):
            continue
        m = np.asarray(table[f"@{HEAD_K}"])
        order = np.argsort(-m, axis=None, kind="stable")[:10]
        cells = [f"L{li}.H{h} {100 * m[li, h]:.1f}" for li, h in (np.unravel_index(i, m.shape) for i in order)]
        lines += [f"Oracle top heads on `{split}` (recall@{HEAD_K}): " + ", ".join(cells), ""]
    t = doc.get("timing", {})
    if t:
        def sec(x: dict, *path: str) -> str:
            for p in path:
                x = x.get(p, {}) if isinstance(x, dict) else {}
            return f"{x:.1f}" if isinstance(x, (int, float)) else "-"

        lines += ["| conversation | split | kv store | open / ingest s | kv-memory queries s | variants forward s "
                  "| oracle prepare s | oracle queries s | questions |", "|---|---|---|---|---|---|---|---|---|"]
        for conv, x in t.items():
            kv = x.get("kv")
            state = "-" if not kv else "cached" if kv.get("cached") else "ingested"
            lines.append(f"| {conv} | {x['split']} | {state} | {sec(x, 'kv', 'open_s')} | {sec(x, 'kv-memory', 'query_s')} "
                         f"| {sec(x, 'variants', 'query_forward_s')} | {sec(x, 'oracle', 'prepare_s')} "
                         f"| {sec(x, 'oracle', 'query_s')} | {x['questions']} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(doc["aggregates"])
    fig, axes = plt.subplots(1, len(splits), figsize=(6.5 * len(splits), 4.5), squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        for name, a in doc["aggregates"][split].items():
            ks = [k for k in RECALL_KS if f"recall@{k}" in a]
            ax.plot(ks, [100 * a[f"recall@{k}"]["recall"] for k in ks], marker="o", label=name)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(list(RECALL_KS))
        ax.set_xticklabels([str(k) for k in RECALL_KS])
        ax.set_xlabel("k (turns retrieved)")
        ax.set_ylabel("evidence recall@k (%)")
        ax.set_title(f"LoCoMo evidence recall, split {split}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    p = out_dir / "recall_at_k.png"
    fig.tight_layout()
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def write_outputs(cfg: RetrievalConfig, records: list, timing: dict, heads: dict, known: dict, chosen: dict,
                  wall_s: float, plots: bool = True) -> dict:
    """Writes retrieval.json, retrieval.md, oracle_heads.npz and (``plots``) recall_at_k.png; the
    oracle's per-head tables and best-head rows are derived here from ``heads``, so a checkpoint
    written after any conversation is a complete report of what was measured so far."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    oracle, head_rows = {}, []
    if heads:
        layer_types = next(t["oracle"]["layer_types"] for t in timing.values() if "oracle" in t)
        oracle = oracle_summary(cfg, heads, known, chosen, layer_types)
        head_rows = oracle.pop("_rows")
    rows = records + head_rows
    doc = {"config": asdict(cfg), "machine": machine_info(), "git_commit": git_commit(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "splits": cfg.splits,
           "conversations_done": sorted(timing), "aggregates": aggregate(rows), "timing": timing, "oracle": oracle,
           "wall_s": wall_s, "records": [asdict(r) for r in rows]}
    (out / "retrieval.json").write_text(json.dumps(doc, indent=1))
    (out / "retrieval.md").write_text(markdown(doc))
    if heads:
        qids = sorted(heads)
        np.savez_compressed(out / "oracle_heads.npz", qids=np.asarray(qids), top=np.stack([heads[q] for q in qids]))
    doc["plots"] = [str(plot(doc, out))] if plots and rows else []
    return doc


def scored_questions(conv: Conversation) -> list[Question]:
    return [q for q in conv.questions if q.evidence]


def finalize(out_dir: str | Path) -> dict:
    """Rebuilds the full report (oracle head tables, best-head rows, markdown, plot) from the
    checkpoint a run leaves in ``out_dir`` after every conversation, e.g. of a run stopped early."""
    from kv_agent.bench.locomo_bench import truncate_sessions

    out = Path(out_dir)
    if not (out / "retrieval.json").is_file():
        raise InvalidArgumentError(f"no retrieval.json in {out}")
    doc = json.loads((out / "retrieval.json").read_text())
    cfg = RetrievalConfig(**{**doc["config"], "out": str(out)})
    timing = doc["timing"]
    chosen = {c: t["split"] for c, t in timing.items()}
    records = [RetrievalRecord(**r) for r in doc["records"] if not r["system"].startswith("oracle-head[")]
    heads, known = {}, {}
    if (out / "oracle_heads.npz").is_file():
        z = np.load(out / "oracle_heads.npz")
        heads = {str(q): t for q, t in zip(z["qids"], z["top"], strict=True)}
    for conv in load_locomo(cfg.locomo):
        if conv.sample_id in chosen:
            conv = truncate_sessions(conv, cfg.max_sessions)
            for q in scored_questions(conv):
                known[q.qid] = (q, [x.dia_id for x in conv.turns])
    return write_outputs(cfg, records, timing, heads, known, chosen, doc["wall_s"])


# ------------------------------------------------------------------ run
def run(cfg: RetrievalConfig, progress: bool = True, model_and_tokenizer=None) -> dict:
    """Runs the retrieval benchmark; ``model_and_tokenizer`` overrides cfg.model (tests)."""
    from tqdm.auto import tqdm

    from kv_agent.bench.ingest_cache import open_ingested
    from kv_agent.bench.locomo_bench import truncate_sessions

    check_config(cfg)
    t_start = time.perf_counter()
    chosen = split_conversations(cfg)
    by_id = {c.sample_id: c for c in load_locomo(cfg.locomo)}
    missing = [c for c in chosen if c not in by_id]
    if missing:
        raise InvalidArgumentError(f"conversations {missing} are not in the LoCoMo file")
    template = LocomoTemplate()
    model = tok = engine = None
    if {"kv-memory", "oracle"} & set(cfg.systems):
        import torch

        from kv_agent.engines.hf import HFEngine
        from kv_agent.models import load_default_model, load_model

        torch.set_grad_enabled(False)
        if model_and_tokenizer is not None:
            model, tok = model_and_tokenizer
        else:
            model, tok = load_model(cfg.model) if cfg.model else load_default_model()
        engine = HFEngine(model, tok)
    records: list[RetrievalRecord] = []
    timing: dict = {}
    heads: dict = {}
    known: dict = {}  # qid -> (question, dia_ids of its conversation's turns)
    for cid in tqdm(list(chosen), desc="conversations", disable=not progress):
        split = chosen[cid]
        conv = truncate_sessions(by_id[cid], cfg.max_sessions)
        questions = scored_questions(conv)
        t = timing[cid] = {"split": split, "questions": len(questions), "turns": len(conv.turns)}
        for q in questions:
            known[q.qid] = (q, [x.dia_id for x in conv.turns])
        for kind in ("bm25", "minilm"):
            if f"rag-{kind}" in cfg.systems:
                rows, t[f"rag-{kind}"] = text_rows(kind, conv, split, questions)
                records += rows
        if "kv-memory" in cfg.systems:
            ing = open_ingested(engine, conv, template, cfg.cache_dir, cfg.max_segment_tokens, progress)
            try:
                t["kv"] = {"cached": ing.cached, "open_s": ing.seconds, "path": str(ing.path), **ing.info}
                rows, kt = kv_rows(ing, template, cfg.kv_variants, split, questions, progress)
                records += rows
                t.update(kt)
            finally:
                ing.close()
        if "oracle" in cfg.systems:
            rows, h, t["oracle"] = oracle_rows(model, tok, template, conv, split, questions, cfg.oracle_chunk,
                                               progress)
            records += rows
            heads.update(h)
        # A checkpoint after every conversation: a run that stops keeps what it measured.
        write_outputs(cfg, records, timing, heads, known, chosen, time.perf_counter() - t_start, plots=False)
    return write_outputs(cfg, records, timing, heads, known, chosen, time.perf_counter() - t_start)


def oracle_summary(cfg: RetrievalConfig, heads: dict, known: dict, chosen: dict, layer_types: list) -> dict:
    """Per-(layer, head) recall tables per split and the best-head rows (head chosen on tuning)."""
    per_head = {}
    for split in sorted(set(chosen.values())):
        qs = {qid: v for qid, v in known.items() if v[0].qid.split("/")[0] in chosen
              and chosen[v[0].qid.split("/")[0]] == split}
        per_head[split] = head_recall(heads, qs)
    selected, source = None, None
    if per_head.get("tuning", {}).get("questions"):
        selected, source = best_head(per_head["tuning"]), per_head["tuning"]
    elif cfg.oracle_heads_from:
        prev = json.loads(Path(cfg.oracle_heads_from).read_text())
        table = prev.get("oracle", {}).get("per_head", {}).get("tuning")
        if not table or not table.get("questions"):
            raise InvalidArgumentError(f"{cfg.oracle_heads_from} has no tuning per-head oracle table")
        selected, source = best_head(table), table
    out: dict = {"per_head": per_head, "layer_types": layer_types, "head_k": HEAD_K, "_rows": []}
    if selected is None:
        return out
    li, h = selected
    out["selected_head"] = {"layer": li, "head": h, "layer_type": layer_types[li], "selected_on": "tuning",
                            "from": cfg.oracle_heads_from or "this run",
                            "recall_on_selection": float(np.asarray(source[f"@{HEAD_K}"])[li, h])}
    name = f"oracle-head[L{li}.H{h}]"
    for qid, top in heads.items():
        q, dias = known[qid]
        conv = Conversation(qid.split("/")[0], "", "")
        out["_rows"].append(make_record(name, conv, chosen[conv.sample_id], q, [dias[i] for i in top[li, h]], 0.0))
    return out
