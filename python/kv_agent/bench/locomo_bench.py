"""`kvagent bench locomo`: answer quality, retrieval recall, prefill and latency on LoCoMo.

Systems (same model, same prompt template, same answer length):
  no-memory     the question alone
  full-context  every turn in context (prefilled once per conversation and reused, but the
                prefill a stateless server would do per question is what is reported)
  rag-minilm    top turns by all-MiniLM-L6-v2 embeddings, put back as text under a token budget
  rag-bm25      top turns by BM25, same budget
  kv-memory     latent retrieval of per-turn KV segments under the same budget (ours)
"""

from __future__ import annotations

import copy
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from kv_agent.bench import scoring
from kv_agent.bench.locomo import Conversation, Question, load_locomo
from kv_agent.bench.prompts import LocomoTemplate
from kv_agent.bench.report import RECALL_KS, Record, write_outputs
from kv_agent.errors import InvalidArgumentError

ALL_SYSTEMS = ("no-memory", "full-context", "rag-minilm", "rag-bm25", "kv-memory")


@dataclass
class BenchConfig:
    locomo: str | None = None
    conversations: list[str] = field(default_factory=list)  # sample ids; empty = all
    max_conversations: int = 0  # 0 = all
    max_sessions: int = 0  # keep only the first N sessions and the questions answerable from them (0 = all)
    per_category: int = 0  # questions per category per conversation (0 = all)
    questions: int = 0  # questions per conversation, stratified round-robin over categories (0 = off)
    categories: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    systems: list[str] = field(default_factory=lambda: list(ALL_SYSTEMS))
    token_budget: int = 512  # context tokens retrieved per question (RAG and kv-memory)
    max_new_tokens: int = 24
    seed: int = 0
    out: str = "bench/out/locomo"
    model: str | None = None  # local HF model path; None = default Gemma 3 270M
    kv_variants: list[str] = field(default_factory=list)  # index ablations ("score:norm:agg[:layers]")
    variants_answer: bool = False  # ablations also generate answers (default: retrieval and recall only)
    prefill_chunk: int = 2048  # full-context prefill chunk (bounds attention memory on long conversations)


def truncate_sessions(conv: Conversation, n: int) -> Conversation:
    """The first ``n`` sessions of ``conv`` and only the questions whose evidence lies in them."""
    if n <= 0 or len(conv.sessions) <= n:
        return conv
    keep = sorted(conv.sessions)[:n]
    turns = [t for t in conv.turns if t.session in keep]
    ids = {t.dia_id for t in turns}
    questions = [q for q in conv.questions if q.evidence and all(e in ids for e in q.evidence)]
    return Conversation(conv.sample_id, conv.speaker_a, conv.speaker_b, {s: conv.sessions[s] for s in keep},
                        turns, questions)


def select_questions(conv: Conversation, cfg: BenchConfig) -> list[Question]:
    """Stratified sample, seeded: up to ``per_category`` questions of each wanted category, or
    (``questions``) N per conversation taken round-robin over the categories, so small categories
    are kept whole and large ones share the rest. Returned in the conversation's order."""
    rng = random.Random(f"{cfg.seed}/{conv.sample_id}")
    by_cat: dict[int, list[Question]] = defaultdict(list)
    for q in conv.questions:
        if q.category in cfg.categories:
            by_cat[q.category].append(q)
    out: list[Question] = []
    if cfg.questions:
        pools = {c: rng.sample(qs, len(qs)) for c, qs in sorted(by_cat.items())}
        while len(out) < cfg.questions and any(pools.values()):
            for c in sorted(pools):
                if pools[c] and len(out) < cfg.questions:
                    out.append(pools[c].pop())
    else:
        for _, qs in sorted(by_cat.items()):
            if cfg.per_category and len(qs) > cfg.per_category:
                qs = rng.sample(qs, cfg.per_category)
            out.extend(qs)
    return sorted(out, key=lambda q: int(q.qid.rsplit("q", 1)[1]))


def stop_ids(engine, tokenizer) -> list[int]:
    """End of sequence or end of line: every system answers one line (the template asks for a
    short phrase and ``clean_answer`` keeps the first line), so decoding stops at the newline."""
    from kv_agent.models.chat import stop_token_ids

    return stop_token_ids(engine, tokenizer, at_newline=True)


class TextSystem:
    """Plaintext systems: the context is text, prefilled for every question after a cached prefix."""

    def __init__(self, name: str, engine, tokenizer, template: LocomoTemplate, cfg: BenchConfig):
        self.name, self.engine, self.tok, self.template, self.cfg = name, engine, tokenizer, template, cfg
        self.retriever = None
        self.stop = stop_ids(engine, tokenizer)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prepare(self, conv: Conversation) -> None:
        self.conv = conv
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        self.prefix_ids = bos + self._ids(self.template.prefix(conv))
        self.line_ids = [self._ids(self.template.line(t)) for t in conv.turns]
        _, self.prefix_cache = self.engine.capture_on_cache(self.prefix_ids)
        self.full_prefill_s = 0.0
        self.dropped_turns = 0
        if self.name == "full-context":
            # Keep the most recent turns that fit the model's context with the question and answer.
            limit = getattr(self.engine.config, "max_position_embeddings", None) or 1 << 30
            room = limit - len(self.prefix_ids) - 128 - self.cfg.max_new_tokens
            first, total = len(self.line_ids), 0
            while first > 0 and total + len(self.line_ids[first - 1]) <= room:
                first -= 1
                total += len(self.line_ids[first])
            self.first_turn, self.dropped_turns = first, first
            t0 = time.perf_counter()
            ctx = [i for ids in self.line_ids[first:] for i in ids]
            self.full_cache = copy.deepcopy(self.prefix_cache)
            step = max(1, self.cfg.prefill_chunk)
            for s in range(0, len(ctx), step):
                self.engine.prefill(ctx[s:s + step], self.full_cache)
            self.full_prefill_s = time.perf_counter() - t0
            self.footprint = {"context_tokens": len(ctx), "dropped_turns": first}
        elif self.name in ("rag-minilm", "rag-bm25"):
            from kv_agent.bench.retrievers import make_retriever

            docs = [f"{t.speaker}: {t.text}" for t in conv.turns]
            self.retriever = make_retriever("minilm" if self.name == "rag-minilm" else "bm25", docs)

    def answer(self, q: Question) -> Record:
        suffix = self._ids(self.template.suffix(q))
        retrieved: list[str] = []
        used_idx: list[int] = []
        t0 = time.perf_counter()
        if self.retriever is not None:
            ranked = self.retriever.search(q.question, max(RECALL_KS))
            retrieval_s = time.perf_counter() - t0
            retrieved = [self.conv.turns[i].dia_id for i, _ in ranked]
            budget = self.cfg.token_budget
            for i, _ in ranked:
                if len(self.line_ids[i]) <= budget:
                    used_idx.append(i)
                    budget -= len(self.line_ids[i])
            used_idx.sort()
        else:
            retrieval_s = 0.0
        if self.name == "full-context":
            cache = copy.deepcopy(self.full_cache)
            new = suffix
            used_idx = list(range(self.first_turn, len(self.conv.turns)))
        else:
            cache = copy.deepcopy(self.prefix_cache)
            new = [i for j in used_idx for i in self.line_ids[j]] + suffix
        gen = self.engine.generate_on_cache(new, cache, max_new_tokens=self.cfg.max_new_tokens, eos_ids=self.stop)
        ctx_tokens = len(self.prefix_ids) + sum(len(self.line_ids[j]) for j in used_idx) + len(suffix)
        prefill = ctx_tokens - len(self.prefix_ids)  # the instruction prefix is cached for every system
        ttft = retrieval_s + gen.ttft_s + (self.full_prefill_s if self.name == "full-context" else 0.0)
        pred = self.template.clean_answer(self.tok.decode(gen.token_ids, skip_special_tokens=True))
        return make_record(self.name, self.conv, q, pred, retrieved, [self.conv.turns[j].dia_id for j in used_idx],
                           ctx_tokens, prefill, 0, retrieval_s, ttft, retrieval_s + gen.total_s)


def make_record(system, conv, q, pred, retrieved, used, ctx_tokens, prefill, reused, retrieval_s, ttft, total,
                answered: bool = True):
    score = scoring.score_answer(pred, q.answer, q.category) if answered else float("nan")
    r = Record(system=system, qid=q.qid, conversation=conv.sample_id, category=q.category, question=q.question,
               answer=q.answer, prediction=pred, score=score, answered=answered,
               evidence=list(q.evidence), retrieved=retrieved, used=used, context_tokens=ctx_tokens,
               prefill_tokens=prefill, reused_tokens=reused, retrieval_s=retrieval_s, ttft_s=ttft, total_s=total)
    if retrieved:
        for k in RECALL_KS:
            rec = scoring.recall_at(retrieved[:k], q.evidence)
            if rec is not None:
                r.recall[f"@{k}"] = rec
    return r


def run(cfg: BenchConfig, progress: bool = True, model_and_tokenizer=None) -> dict:
    """Runs the benchmark; ``model_and_tokenizer`` overrides cfg.model (tests use tiny models)."""
    from tqdm.auto import tqdm

    from kv_agent.bench.kv_system import KVMemorySystem
    from kv_agent.engines.hf import HFEngine
    from kv_agent.models import load_default_model, load_model

    t_start = time.perf_counter()
    convs = load_locomo(cfg.locomo)
    if cfg.conversations:
        wanted = set(cfg.conversations)
        convs = [c for c in convs if c.sample_id in wanted]
    if cfg.max_conversations:
        convs = convs[: cfg.max_conversations]
    convs = [truncate_sessions(c, cfg.max_sessions) for c in convs]
    if model_and_tokenizer is not None:
        model, tok = model_and_tokenizer
    else:
        model, tok = load_model(cfg.model) if cfg.model else load_default_model()
    engine = HFEngine(model, tok)
    template = LocomoTemplate()
    records: list[Record] = []
    ingest: dict[str, dict] = {}
    for conv in tqdm(convs, desc="conversations", disable=not progress):
        questions = select_questions(conv, cfg)
        systems = []
        for name in cfg.systems:
            if name == "kv-memory":
                base = KVMemorySystem("kv-memory", engine, tok, template, cfg)
                systems.append(base)
                for v in cfg.kv_variants:
                    systems.append(KVMemorySystem(f"kv-memory[{v}]", engine, tok, template, cfg, variant=v, base=base))
            elif name in ALL_SYSTEMS:
                systems.append(TextSystem(name, engine, tok, template, cfg))
            else:
                raise InvalidArgumentError(f"unknown system {name!r}; choose from {ALL_SYSTEMS}")
        for system in systems:
            t0 = time.perf_counter()
            system.prepare(conv)
            ingest[f"{conv.sample_id}/{system.name}"] = {"prepare_s": time.perf_counter() - t0,
                                                         **getattr(system, "footprint", {})}
            if getattr(system, "full_prefill_s", 0.0):
                ingest[f"{conv.sample_id}/{system.name}"]["full_prefill_s"] = system.full_prefill_s
            for q in tqdm(questions, desc=f"{conv.sample_id} {system.name}", leave=False, disable=not progress):
                records.append(system.answer(q))
        for system in reversed(systems):  # variants before the base whose memory they borrow
            if hasattr(system, "close"):
                system.close()
        # A checkpoint after every conversation: a long run that dies keeps what it measured.
        write_outputs(Path(cfg.out), dict(cfg.__dict__), records,
                            {"ingest": ingest, "wall_s": time.perf_counter() - t_start}, plots=False)
    return write_outputs(Path(cfg.out), dict(cfg.__dict__), records,
                         {"ingest": ingest, "wall_s": time.perf_counter() - t_start})
