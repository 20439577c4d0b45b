"""kv-memory (ours) as a LoCoMo system: per-turn KV segments, latent retrieval, KV reuse.

Ingest: every turn line is encoded after the shared instruction prefix (so no segment grows an
attention sink of its own) and stored as a segment with its compressed keys. Question: the
suffix tokens (question + answer cue) are the new tokens; their pre-RoPE queries score the
segments; the best ones under the token budget are placed in original order between the prefix
and the suffix, re-positioned, and only the suffix is prefilled.

Index ablations ("variants") reuse the same stored segments and only build another index.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from datetime import datetime

from kv_agent.bench.locomo import Conversation, Question
from kv_agent.bench.report import RECALL_KS, Record
from kv_agent.errors import InvalidArgumentError

_DATE_FORMATS = ("%I:%M %p on %d %B, %Y", "%I:%M %p on %d %b, %Y", "%I:%M %p on %B %d, %Y")


def session_time_us(date_time: str, session: int) -> int:
    """Microseconds since the epoch of a LoCoMo session date ('1:56 pm on 8 May, 2023');
    unparseable dates fall back to the session number (order is all that matters here)."""
    s = re.sub(r"\s+", " ", date_time.strip())
    for fmt in _DATE_FORMATS:
        try:
            return int(datetime.strptime(s, fmt).timestamp() * 1e6)
        except ValueError:
            continue
    return session * 86_400_000_000


def parse_variant(variant: str):
    """'score:norm:agg[:layers]' -> IndexOptions, e.g. 'mean:zscore:max:0-17' or 'bbox:softmax:top_p'."""
    from kv_agent.index import IndexOptions

    parts = variant.split(":")
    if len(parts) < 3:
        raise InvalidArgumentError(f"variant {variant!r}: expected score:norm:agg[:layers]")
    opts = IndexOptions(score=parts[0], norm=parts[1], agg=parts[2])
    if len(parts) > 3 and parts[3]:
        layers = []
        for piece in parts[3].split("+"):
            a, _, b = piece.partition("-")
            layers.extend(range(int(a), int(b) + 1) if b else [int(a)])
        opts.layers = layers
    return opts


class KVMemorySystem:
    def __init__(self, name, engine, tokenizer, template, cfg, variant: str | None = None, base=None):
        self.name, self.engine, self.tok, self.template, self.cfg = name, engine, tokenizer, template, cfg
        self.variant = variant
        self.base = base
        self.footprint: dict = {}
        self.query_cache: dict = {}  # qid -> (suffix ids, {layer: pre-RoPE queries}, seconds), for ablations
        self.variant_options = [] if base is not None else [parse_variant(v) for v in cfg.kv_variants]
        if self.variant_options:
            from kv_agent.index import default_layers

            for o in self.variant_options:
                o.layers = o.layers if o.layers is not None else default_layers(engine.num_layers)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prepare(self, conv: Conversation) -> None:
        from kv_agent.api import AgentMemory, CacheManager
        from kv_agent.index import LatentIndex

        self.conv = conv
        if self.base is not None:  # an ablation: same segments, another index
            self.cm = self.base.cm
            self.key_to_dia = self.base.key_to_dia
            self.index = LatentIndex(self.cm.spec, parse_variant(self.variant))
            for key, (summary, meta, n) in self.base.summaries.items():
                self.index.add(key, summary, ns=meta.ns, agent=meta.agent, session=meta.session, turn=meta.turn,
                               chunk=meta.chunk, time_us=meta.time_us, num_tokens=n)
            return
        self._dir = tempfile.mkdtemp(prefix=f"kvagent-locomo-{conv.sample_id}-")
        index_options = parse_variant(self.variant) if self.variant else None
        mem = AgentMemory(self._dir, backend="cpu", namespace=conv.sample_id, index_options=index_options)
        self.cm = CacheManager(self.engine, memory=mem, session="locomo", max_segment_tokens=256)
        self.cm.set_prefix_text(self.template.prefix(conv))
        self.key_to_dia: dict = {}
        self.summaries: dict = {}
        t0 = time.perf_counter()
        tokens = 0
        from tqdm.auto import tqdm

        for t in tqdm(conv.turns, desc=f"{conv.sample_id} ingest KV", unit="turn", leave=False):
            line = self.template.line(t)
            keys = self.cm.store_text(line, session=f"S{t.session}", turn=t.index, role=t.speaker,
                                      time_us=session_time_us(t.date_time, t.session) + t.index)
            for k in keys:
                self.key_to_dia[k] = t.dia_id
            tokens += len(self._ids(line))
        mem.flush()
        for info in mem.store.list(ns=conv.sample_id):
            if info.key in self.key_to_dia:
                seg = mem.store.get(info.key, self.cm.spec.fingerprint)
                self.summaries[info.key] = (seg.summary, info.meta, info.layout.num_tokens)
        self.index = mem.index
        st = mem.store.stats()
        self.footprint = {"ingest_s": time.perf_counter() - t0, "ingested_tokens": tokens,
                          "segments": len(self.key_to_dia), "kv_bytes_per_token": self.cm.spec.kv_bytes_per_token(),
                          "store_stats": st, "index_bytes": getattr(self.index, "memory_bytes", lambda: None)()}

    def answer(self, q: Question) -> Record:
        from kv_agent.bench.locomo_bench import make_record

        cm = self.cm
        t0 = time.perf_counter()
        cached = self.base.query_cache.get(q.qid) if self.base is not None else None
        if cached is None:
            # Queries of every layer the base or an ablation scores, from one forward.
            suffix = self._ids(self.template.suffix(q))
            layers = sorted(set(self.index.layers).union(*(v.layers for v in self.variant_options)))
            qv = self.engine.query_vectors(suffix, cm.prefix_context, layers)
            qs = {layer: qv[j] for j, layer in enumerate(layers)}
            query_s = time.perf_counter() - t0
            self.query_cache[q.qid] = (suffix, qs, query_s)
        else:
            suffix, qs, query_s = cached  # the base row's forward: count its time
        t1 = time.perf_counter()
        import torch

        qv = torch.stack([qs[i] for i in self.index.layers]).float().contiguous()
        ranked = self.index.search(qv, top_k=max(RECALL_KS), ns=self.conv.sample_id)
        ranked = sorted(ranked, key=lambda h: h.rank)
        retrieval_s = query_s + time.perf_counter() - t1
        retrieved = []
        for h in ranked:
            d = self.key_to_dia.get(h.key)
            if d is not None and d not in retrieved:
                retrieved.append(d)
        if self.base is not None and not self.cfg.variants_answer:  # ablation: retrieval only
            return make_record(self.name, self.conv, q, "", retrieved, [], 0, 0, 0, retrieval_s, retrieval_s,
                               retrieval_s, answered=False)
        # Same budget rule as the text baselines: best first while it fits.
        budget, chosen = self.cfg.token_budget, []
        for h in ranked:
            if h.key in self.key_to_dia and h.num_tokens <= budget:
                chosen.append(h)
                budget -= h.num_tokens
        hits = _as_memory_hits(cm, chosen)
        ans = cm.answer_ids(suffix, hits=hits, max_new_tokens=self.cfg.max_new_tokens, recent_turns=0)
        pred = self.template.clean_answer(ans.text)
        used = sorted({self.key_to_dia[h.key] for h in hits}, key=lambda d: tuple(int(x) for x in d[1:].split(":")))
        return make_record(self.name, self.conv, q, pred, retrieved, used, ans.context_tokens, ans.prefill_tokens,
                           ans.reused_tokens, retrieval_s, retrieval_s + ans.ttft_s, retrieval_s + ans.total_s)

    def close(self) -> None:
        if self.base is None and getattr(self, "_dir", None):
            self.cm.memory.close()
            shutil.rmtree(self._dir, ignore_errors=True)


def _as_memory_hits(cm, index_hits):
    from kv_agent.api import MemoryHit

    out = []
    for h in index_hits:
        info = cm.memory.store.info(h.key)
        m = info.meta
        out.append(MemoryHit(key=h.key, score=float(h.score), rank=int(h.rank), text=m.text, role=m.role, ns=m.ns,
                             agent=m.agent, session=m.session, turn=int(m.turn), chunk=int(m.chunk),
                             num_tokens=int(info.layout.num_tokens), time_us=int(m.time_us), _memory=cm.memory))
    return out
