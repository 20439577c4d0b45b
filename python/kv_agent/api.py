"""The front door: AgentMemory (store + latent index) and CacheManager (product logic over an engine).

    from kv_agent import CacheManager, AgentMemory
    memory = AgentMemory(backend="gpu")        # "gpu" falls back to "cpu" with a warning
    cache_manager = CacheManager(engine="hf")    # default model; attaches to the one open AgentMemory
    cache_manager.store_kv(prompt, response)     # stores the turn's KV in memory
    relevant_kv = memory.retrieve(new_query, top_k=5)
    answer = cache_manager.generate(new_query)   # prefills only the query's tokens

Engines: ``CacheManager(engine=NAME, model=..., **engine_options)`` creates the engine through
the registry (:mod:`kv_agent.engines.base`: "hf", and "vllm", "sglang", "llama.cpp" where their
adapters are installed), or takes an :class:`~kv_agent.engines.base.Engine` instance. The
manager decides what to store, what to retrieve and how the context is laid out
(``_core.make_plan``); the engine places the planned segments (it loads them from the store
itself) and computes. The manager never touches engine tensors.

Wiring rule (explicit, never a guess): a CacheManager attaches to the AgentMemory passed as
``memory=``. Without one it attaches to the only *open* AgentMemory of this process, or creates
a default one when none is open; when several are open it raises InvalidArgumentError (pass
``memory=``). A closed memory is never attached (FailedPreconditionError when passed). One
memory serves one model: a manager for another model needs its own memory.

Data safety: turn numbers are allocated per (namespace, session) by the memory, so several
managers (or a chat that switches sessions) never reuse a key; a write stores all chunks of a
turn and indexes them, or leaves the store and index as they were (an existing key is
AlreadyExistsError, never overwritten). Bad input raises a :class:`kv_agent.KvAgentError`
subclass and changes nothing.
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
from kv_agent.engines import base as engines
from kv_agent.errors import AlreadyExistsError, FailedPreconditionError, InvalidArgumentError

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant with a long-term memory of earlier conversations with this user. "
    "Answer briefly and use the remembered conversations when they are relevant."
)

_OPEN_MEMORIES: weakref.WeakSet = weakref.WeakSet()  # AgentMemory objects not yet closed


def default_memory_path() -> Path:
    return Path(os.environ.get("KVAGENT_HOME", Path.home() / ".kv_agent")).expanduser() / "memory"


def _check_text(text, what: str) -> str:
    if not isinstance(text, str):
        raise InvalidArgumentError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgumentError(f"{what} is not valid Unicode ({e.reason} at index {e.start})") from None
    return text


def _check_int(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidArgumentError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


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
    segments and scope retrieval. ``remote="redis://[user:password@]host:port[/db]"`` shares the
    namespace's memories through Redis (docs/multi-agent.md).

    ``backend="gpu"`` (default) on a CUDA build with a usable device: the store gets a device
    tier of ``device_capacity_bytes`` (default :data:`DEFAULT_DEVICE_FRACTION` of the device's
    free memory at open) that keeps recently used segments resident (engines on CUDA read them
    with ``store.get_device``: no host -> device copy on a hit), and the latent index searches on
    the device (``IndexOptions.device``: the default -1 becomes the device, an explicit ``"cpu"`` is kept; a
    kind the device index cannot score, ``score="tokens"``, stays on the CPU with a warning).
    Without CUDA (in torch or in the kv_agent build) it warns and runs as ``"cpu"``: host and
    disk tiers, CPU index. ``backend`` tells which one is in use.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, backend: str = "gpu", namespace: str = "default",
                 agent: str = "agent", host_capacity_bytes: int = 2 << 30, disk_capacity_bytes: int = 0,
                 codec: str = "raw", index_options=None, write_behind: bool = True, remote: str | None = None,
                 device_capacity_bytes: int | None = None, device: int = 0):
        if backend not in ("gpu", "cpu"):
            raise InvalidArgumentError(f"backend must be 'gpu' or 'cpu', got {backend!r}")
        _check_text(namespace, "namespace")
        _check_text(agent, "agent")
        device = _check_int(device, "device", 0)
        if device_capacity_bytes is not None:
            device_capacity_bytes = _check_int(device_capacity_bytes, "device_capacity_bytes", 1)
        if backend == "gpu":
            why = _gpu_unusable(device)
            if why:
                warnings.warn(f"AgentMemory(backend='gpu'): {why}; falling back to 'cpu'", RuntimeWarning,
                              stacklevel=2)
                backend = "cpu"
        self._index_options_given = index_options is not None  # else a model's retrieval profile may set them
        if backend == "gpu":
            if device_capacity_bytes is None:
                device_capacity_bytes = _default_device_capacity(device)
            index_options = _device_index_options(index_options, device)
        else:
            device_capacity_bytes = 0
        self.backend = backend
        self.namespace = namespace
        self.agent = agent
        from kv_agent.store import Store

        self.path = None if str(path) == ":memory:" else Path(path or default_memory_path()).expanduser()
        if self.path is not None:
            self.path.mkdir(parents=True, exist_ok=True)
        tier = {"device_capacity_bytes": device_capacity_bytes, "device": device} if device_capacity_bytes else {}
        self.store = Store.open(str(self.path) if self.path else None, host_capacity_bytes=host_capacity_bytes,
                                disk_capacity_bytes=disk_capacity_bytes, codec=codec, write_behind=write_behind,
                                remote=remote, remote_namespace=namespace, **tier)
        self.device_capacity_bytes = device_capacity_bytes
        self.index_options = index_options
        self.spec: _core.ModelSpec | None = None
        self.index = None
        self.profile = None  # the attached model's retrieval profile, if it has one
        self._special_ids: frozenset = frozenset()
        self._manager = None
        self._next_turns: dict[str, int] = {}  # session -> next free turn number (this namespace)
        self._lock = threading.RLock()
        _OPEN_MEMORIES.add(self)

    @property
    def closed(self) -> bool:
        return self.store.closed

    @staticmethod
    def open_memories() -> list[AgentMemory]:
        """The AgentMemory objects of this process that are not closed (the wiring rule's candidates)."""
        return [m for m in list(_OPEN_MEMORIES) if not m.closed]

    # ---------------------------------------------------------------- model binding
    def attach(self, manager) -> None:
        """Binds the memory to a CacheManager's engine; loads that model's segments into the index.

        Segments stamped with one of the engine's ``fingerprint_aliases`` (what an earlier
        kv-agent called the same weights) are re-stamped with the current fingerprint first."""
        from kv_agent.index import IndexOptions, LatentIndex

        spec = manager.spec
        with self._lock:
            if self.closed:
                raise FailedPreconditionError("this AgentMemory is closed; open a new one")
            if self.spec is not None and self.spec.fingerprint != spec.fingerprint:
                raise FailedPreconditionError(
                    f"this AgentMemory serves model {self.spec.fingerprint.hex()}; a CacheManager for model "
                    f"{spec.fingerprint.hex()} needs its own AgentMemory")
            self._manager = manager
            if self.index is not None:
                return
            for alias in getattr(manager.engine, "fingerprint_aliases", ()):
                if alias != spec.fingerprint:
                    self._migrate_model(alias, spec.fingerprint)
            self.spec = spec
            from kv_agent.retrieval_profile import profile_for

            self.profile = profile_for(getattr(manager.engine, "model_name", None))
            if self.profile is not None and not self._index_options_given:
                self.index_options = self.profile.index_options()
            self.index = LatentIndex(spec, self.index_options or IndexOptions())
            self._special_ids = _special_ids(manager.tokenizer)
            for info in self.store.list(model=spec.fingerprint):
                if info.summary:  # segments stored without compressed keys are not retrievable
                    try:
                        self._index_add(info.key, info.summary, info.meta, info.layout.num_tokens)
                    except InvalidArgumentError:
                        if not self.token_scoring:
                            raise
                        # Stored before token-level scoring was configured: token keys come from the KV.
                        seg = self.store.get(info.key, spec.fingerprint)
                        summary = self.summarize(seg.kv(framework="torch")[:, 0], [int(t) for t in seg.tokens])
                        self._index_add(info.key, summary, info.meta, info.layout.num_tokens)

    def _migrate_model(self, old: _core.Hash128, new: _core.Hash128) -> int:
        """Re-stamps every segment of model ``old`` with ``new`` (same KV, tokens, metadata and
        summary). Memory keys stay; prefix-chained keys (which hash the model) are recomputed.
        Each segment is written before the old one is dropped, so a crash leaves it readable
        under one of the two. Returns the number of segments migrated."""
        from kv_agent.store import Segment

        n = 0
        for info in self.store.list(model=old):
            seg = self.store.get(info.key, old)
            tokens = [int(t) for t in seg.tokens]
            key = info.key
            if info.parent.is_zero() and key == _core.prefix_key(old, _core.Hash128(), tokens):
                key = _core.prefix_key(new, _core.Hash128(), tokens)
            self.store.put(Segment(seg.kv(framework="torch"), tokens=tokens, model=new, positions=seg.positions,
                                   key=key, meta=seg.meta, pre_rope=seg.pre_rope, summary=seg.summary, copy=True))
            if key != info.key:
                self.store.delete(info.key)
            n += 1
        if n:
            self.store.flush()
        return n

    @property
    def token_scoring(self) -> bool:
        """True when the index scores token by token (``IndexOptions(score="tokens")``)."""
        return self.index is not None and getattr(self.index.options, "score", None) == "tokens"

    def summarize(self, keys, token_ids: list[int]) -> bytes:
        """The compressed keys stored with a segment: every layer's box and mean, plus (token-level
        scoring) the per-token keys of the index layers for every token that is not a special
        token of the tokenizer (chat-template markers would otherwise attract the heads)."""
        from kv_agent.index import summarize

        if not self.token_scoring:
            return summarize(keys)
        mask = [t not in self._special_ids for t in token_ids]
        if not any(mask):
            mask = [True] * len(token_ids)
        return summarize(keys, token_layers=list(self.index.layers), token_mask=mask)

    def _index_add(self, key, summary: bytes, meta, num_tokens: int, pinned: bool = False) -> None:
        self.index.add(key, summary, ns=meta.ns, agent=meta.agent, session=meta.session, turn=meta.turn,
                       chunk=meta.chunk, time_us=meta.time_us, num_tokens=num_tokens, pinned=pinned)

    def _require_manager(self):
        if self._manager is None:
            raise FailedPreconditionError(
                "AgentMemory has no model attached: create CacheManager(memory=this_memory) first")
        return self._manager

    # ---------------------------------------------------------------- writes
    def next_turn(self, session: str) -> int:
        """Allocates the next turn number of ``session`` in this namespace (never one already
        stored or handed out, whichever model or manager wrote it)."""
        _check_text(session, "session")
        with self._lock:
            self._check_open()
            turn = self._next_turns.get(session)
            if turn is None:
                turn = 1 + max((int(i.meta.turn) for i in self.store.list(ns=self.namespace, session=session)
                                if i.meta.session == session and i.meta.role != "system"), default=0)
            self._next_turns[session] = turn + 1
            return turn

    def _reserve_turn(self, session: str, turn: int) -> None:
        with self._lock:
            if self._next_turns.get(session, 0) <= turn:
                self.next_turn(session)  # loads the stored maximum first
                self._next_turns[session] = max(self._next_turns[session], turn + 1)

    def _check_open(self) -> None:
        if self.closed:
            raise FailedPreconditionError("this AgentMemory is closed")

    def add_segment(self, segment, *, index: bool = True) -> None:
        """Stores a Segment (and indexes its summary, when it has one); see :meth:`add_segments`."""
        self.add_segments([segment], index=index)

    def add_segments(self, segments, *, index: bool = True) -> None:
        """Stores segments and indexes their summaries, all or nothing.

        AlreadyExistsError if a key is stored already (or repeated): nothing is overwritten.
        InvalidArgumentError for non-finite KV or a summary the index rejects. On any error the
        segments this call stored are deleted again and the index is left as it was."""
        segments = list(segments)
        with self._lock:
            self._check_open()
            seen = set()
            for seg in segments:
                if seg.key in seen or self.store.contains(seg.key):
                    raise AlreadyExistsError(f"segment {seg.key.hex()} is already stored; a stored turn is never "
                                             "overwritten (forget it first, or use another turn number)")
                seen.add(seg.key)
                if not _finite(seg):
                    raise InvalidArgumentError(f"segment {seg.key.hex()}: KV holds NaN or infinite values")
            stored, indexed = [], []
            try:
                for seg in segments:
                    self.store.put(seg)
                    stored.append(seg.key)
                    if index and self.index is not None and seg.summary:
                        self._index_add(seg.key, seg.summary, seg.meta, len(seg))
                        indexed.append(seg.key)
            except BaseException:
                for k in indexed:
                    self.index.remove(k)
                for k in stored:
                    self.store.delete(k)
                raise

    def forget(self, *, session: str | None = None, key: _core.Hash128 | None = None) -> int:
        """Deletes one segment (``key``) or a whole session of this namespace; returns the count."""
        if (session is None) == (key is None):
            raise InvalidArgumentError("forget needs exactly one of session= or key=")
        with self._lock:
            self._check_open()
            if key is not None:
                keys = [key] if self.store.contains(key) else []
            else:
                keys = [i.key for i in self.store.list(ns=self.namespace, session=_check_text(session, "session"))
                        if i.meta.session == session]
            for k in keys:
                self.store.delete(k)
                if self.index is not None and k in self.index:
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
        _OPEN_MEMORIES.discard(self)
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _memory_for_manager(memory: AgentMemory | None) -> AgentMemory:
    """The wiring rule (module docstring)."""
    if memory is not None:
        if not isinstance(memory, AgentMemory):
            raise InvalidArgumentError(f"memory must be an AgentMemory, got {type(memory).__name__}")
        if memory.closed:
            raise FailedPreconditionError("memory is closed; a CacheManager needs an open AgentMemory")
        return memory
    candidates = AgentMemory.open_memories()
    if len(candidates) > 1:
        raise InvalidArgumentError(f"{len(candidates)} AgentMemory objects are open; pass memory= to say which one "
                                   "this CacheManager uses")
    return candidates[0] if candidates else AgentMemory()


class CacheManager:
    """Writes turns to memory and answers from it, over one inference engine.

    ``engine``: a registered engine name ("hf"; "vllm", "sglang", "llama.cpp" where installed) or
    an :class:`~kv_agent.engines.base.Engine` instance. ``model`` and ``engine_options`` go to the
    engine's factory (for "hf": None = the default model, a local HF model directory, a
    ``(model, tokenizer)`` pair or an HFEngine; ``device=``, ``dtype=``, ``cuda_graphs=``).
    ``memory``: see the wiring rule in the module docstring.
    """

    def __init__(self, engine: str | engines.Engine = "hf", model=None, memory: AgentMemory | None = None, *,
                 system_prompt: str = DEFAULT_SYSTEM_PROMPT, session: str | None = None,
                 max_segment_tokens: int = 256, recent_turns: int = 0, **engine_options):
        self.max_segment_tokens = _check_int(max_segment_tokens, "max_segment_tokens", 1)
        self.recent_turns = _check_int(recent_turns, "recent_turns", 0)
        _check_text(system_prompt, "system_prompt")
        if session is not None and (not _check_text(session, "session")):
            raise InvalidArgumentError("session must be non-empty")
        if memory is not None:
            _memory_for_manager(memory)  # checks before an engine (and its model) is loaded
        if isinstance(engine, engines.Engine):
            if model is not None or engine_options:
                raise InvalidArgumentError("model= and engine options go to the engine's factory; an Engine "
                                           "instance comes configured")
            self.engine = engine
        elif isinstance(engine, str):
            self.engine = engines.create(engine, model=model, **engine_options)
        else:
            raise InvalidArgumentError(f"engine must be an engine name or an Engine, got {type(engine).__name__}")
        self.tokenizer = self.engine.tokenizer
        if self.tokenizer is None:
            raise InvalidArgumentError("CacheManager needs an engine with a tokenizer")
        self.spec = self.engine.spec
        self.format = self.engine.chat_format
        self._stop_ids = list(self.engine.stop_token_ids())
        self.memory = _memory_for_manager(memory)
        self.memory.attach(self)
        self.session = session or time.strftime("session-%Y%m%d-%H%M%S")
        self._lock = threading.RLock()
        self._set_prefix(system_prompt)

    # ---------------------------------------------------------------- tokens
    def _ids(self, text: str) -> list[int]:
        return list(self.engine.encode(text))

    def _check_fits(self, n: int, what: str) -> None:
        limit = self.engine.max_context_tokens
        if limit and n > limit:
            raise InvalidArgumentError(f"{what}: {n} positions exceed the model's context of {limit} tokens")

    def _set_prefix(self, system_prompt: str) -> None:
        self.set_prefix_text(self.format.prefix(system_prompt), label=system_prompt)

    def set_prefix_text(self, text: str, label: str | None = None) -> None:
        """Sets the shared prefix (BOS + ``text``, already formatted) that every stored turn is
        encoded after and every answer starts with. Captured once and stored as a segment keyed by
        its tokens (prefix-chained key), so reopening the memory reuses it."""
        _check_text(text, "prefix text")
        bos = self.engine.bos_ids
        system_prompt = label if label is not None else text
        prefix_ids = list(bos) + self._ids(text)
        if not prefix_ids:
            raise InvalidArgumentError("the prefix is empty: give a system prompt or a tokenizer with BOS")
        self._check_fits(len(prefix_ids) + 1, "the prefix")
        key = _core.prefix_key(self.spec.fingerprint, _core.Hash128(), prefix_ids)
        mem = self.memory
        with mem._lock:
            if not mem.store.contains(key):
                cap = self.engine.capture(prefix_ids)
                from kv_agent.store import Segment

                mem.add_segments([Segment(_cpu(cap.kv), tokens=prefix_ids, model=self.spec.fingerprint, key=key,
                                          positions=_cpu(cap.positions), ns=mem.namespace, role="system",
                                          text=system_prompt)], index=False)
        self.prefix_ids = prefix_ids
        self.prefix_key = key
        self.prefix_context = engines.PlannedContext.contiguous([(key, len(prefix_ids))], mem.store,
                                                                self.spec.fingerprint)

    # ---------------------------------------------------------------- writes
    def store_text(self, text: str, *, session: str | None = None, turn: int | None = None, role: str = "turn",
                   time_us: int | None = None, agent: str | None = None) -> list[_core.Hash128]:
        """Encodes ``text`` (already in the model's chat format) after the shared prefix and stores
        its KV as one or more segments (chunks of at most max_segment_tokens), all or none.
        ``turn`` defaults to the session's next free turn (allocated by the memory); a turn that
        is stored already raises AlreadyExistsError. Returns the keys."""
        from kv_agent.store import Segment

        _check_text(text, "text")
        _check_text(role, "role")
        session = _check_text(session, "session") if session is not None else self.session
        if not session:
            raise InvalidArgumentError("session must be non-empty")
        if turn is not None:
            turn = _check_int(turn, "turn", 0)
        if time_us is not None:
            time_us = _check_int(time_us, "time_us", 0)
        ids = self._ids(text)
        if not ids:
            raise InvalidArgumentError("nothing to store: the text has no tokens")
        self._check_fits(len(self.prefix_ids) + len(ids), "the turn after the prefix")
        mem = self.memory
        with self._lock:
            if turn is None:
                turn = mem.next_turn(session)
            else:
                keys = [_core.memory_key(mem.namespace, session, turn, c)
                        for c in range(-(-len(ids) // self.max_segment_tokens))]
                if any(mem.store.contains(k) for k in keys):
                    raise AlreadyExistsError(f"turn {turn} of session {session!r} is already stored")
                mem._reserve_turn(session, turn)
            cap = self.engine.capture(ids, self.prefix_context)
            now = int(time.time() * 1e6) if time_us is None else time_us
            segs = []
            for chunk, start in enumerate(range(0, len(ids), self.max_segment_tokens)):
                part = cap.slice(start, min(start + self.max_segment_tokens, len(ids)))
                kv = _cpu(part.kv)
                key = _core.memory_key(mem.namespace, session, int(turn), chunk)
                segs.append(Segment(kv, tokens=part.token_ids, model=self.spec.fingerprint, key=key,
                                    positions=_cpu(part.positions), ns=mem.namespace,
                                    agent=agent or mem.agent, session=session, turn=int(turn), chunk=chunk,
                                    role=role, text=self.tokenizer.decode(part.token_ids), time_us=now,
                                    # every layer is summarised, so any index configuration can be built later
                                    summary=mem.summarize(kv[:, 0], [int(t) for t in part.token_ids]),
                                    copy=True))
            mem.add_segments(segs)
            return [s.key for s in segs]

    def store_kv(self, prompt: str, response: str | None = None, *, session: str | None = None,
                 turn: int | None = None) -> list[_core.Hash128]:
        """Stores one exchange (user ``prompt`` and the model's ``response``) as memory KV."""
        _check_text(prompt, "prompt")
        if response is not None:
            _check_text(response, "response")
        return self.store_text(self.format.turn(prompt, response), session=session, turn=turn, role="exchange")

    # ---------------------------------------------------------------- reads
    def _content_span(self, ids: list[int]) -> tuple[int, int]:
        """[lo, hi) of the query's own tokens inside its chat format (the template's leading and
        trailing tokens, found by formatting an empty query, do not vote in token-level scoring)."""
        empty = self._ids(self.format.query(""))
        lo = 0
        while lo < min(len(ids), len(empty)) and ids[lo] == empty[lo]:
            lo += 1
        hi, k = len(ids), len(empty)
        while hi > lo and k > lo and ids[hi - 1] == empty[k - 1]:
            hi, k = hi - 1, k - 1
        return (lo, hi) if hi > lo else (0, len(ids))

    def _query_q(self, query_ids: list[int]):
        """Pre-RoPE Q of the query at the index's layers, in the index's order (its first axis)."""
        return self.engine.query_vectors(query_ids, self.prefix_context, list(self.memory.index.layers))

    def retrieve(self, query: str, top_k: int = 5, token_budget: int | None = None, *, session: str | None = None,
                 agent: str | None = None, all_namespaces: bool = False, query_ids: list[int] | None = None,
                 exclude: set | None = None) -> list[MemoryHit]:
        top_k = _check_int(top_k, "top_k", 0)
        if token_budget is not None:
            token_budget = _check_int(token_budget, "token_budget", 0)
        if query_ids is None:
            ids = self._ids(self.format.query(_check_text(query, "query")))
        else:
            ids = [int(i) for i in query_ids]
        if not ids:
            raise InvalidArgumentError("the query has no tokens")
        self._check_fits(len(self.prefix_ids) + len(ids), "the query after the prefix")
        q = self._query_q(ids)
        mem = self.memory
        if mem.token_scoring:
            lo, hi = self._content_span(ids)
            q = q[:, :, lo:hi].contiguous()
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

    def plan(self, new_tokens: int, hits: list[MemoryHit], recent: list = ()):
        """The context layout [prefix][retrieved (original order)][recent turns][new tokens] as a
        PlannedContext (planned positions from ``_core.make_plan``) and the plan itself."""
        ret_sorted = sorted(hits, key=lambda h: (h.time_us, h.session, h.turn, h.chunk))
        rec_sorted = sorted(recent, key=lambda i: (i.meta.time_us, i.meta.session, i.meta.turn, i.meta.chunk))
        pi = _core.PlanInput
        opts = _core.PlanOptions()
        opts.max_context = int(self.engine.max_context_tokens or 0)
        plan = _core.make_plan([pi(self.prefix_key, len(self.prefix_ids))],
                               [pi(h.key, h.num_tokens, h.score, n) for n, h in enumerate(ret_sorted)],
                               [pi(i.key, i.layout.num_tokens, 0.0, n) for n, i in enumerate(rec_sorted)],
                               int(new_tokens), opts)
        return engines.PlannedContext.from_plan(plan, self.memory.store, self.spec.fingerprint), plan

    def answer_ids(self, new_ids: list[int], *, retrieval_ids: list[int] | None = None, top_k: int = 5,
                   token_budget: int | None = None, max_new_tokens: int = 128, session: str | None = None,
                   recent_turns: int | None = None, hits: list[MemoryHit] | None = None) -> Answer:
        """Answers with the planned context [prefix][retrieved][recent turns] + ``new_ids``.

        Retrieval scores ``retrieval_ids`` (default: ``new_ids``); pass ``hits`` to skip it."""
        new_ids = [int(i) for i in new_ids]
        if not new_ids:
            raise InvalidArgumentError("nothing to answer: no new tokens")
        max_new_tokens = _check_int(max_new_tokens, "max_new_tokens", 1)
        t0 = time.perf_counter()
        session = session or self.session
        recent = self._recent(session, self.recent_turns if recent_turns is None else
                              _check_int(recent_turns, "recent_turns", 0))
        recent_keys = {i.key for i in recent}
        if hits is None:
            hits = self.retrieve("", top_k=top_k, token_budget=token_budget,
                                 query_ids=retrieval_ids if retrieval_ids is not None else new_ids,
                                 exclude=recent_keys)
        t_ret = time.perf_counter()
        context, plan = self.plan(len(new_ids), hits, recent)
        dropped = {k.hex() for k in plan.dropped}
        hits = [h for h in hits if h.key.hex() not in dropped]
        gen = self.engine.generate(new_ids, context, max_new_tokens=max_new_tokens, stop_ids=self._stop_ids)
        text = self.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
        for stop in self.format.stop_strings:
            text = text.split(stop)[0]
        t_end = time.perf_counter()
        return Answer(text=text.strip(), hits=hits, prefill_tokens=int(gen.prefill_tokens),
                      reused_tokens=int(plan.reused_tokens), context_tokens=int(plan.total_positions),
                      retrieval_s=t_ret - t0, load_s=gen.load_s, ttft_s=(t_ret - t0) + gen.ttft_s,
                      total_s=t_end - t0, token_ids=list(gen.token_ids))

    def generate(self, query: str, *, top_k: int = 5, token_budget: int | None = None, max_new_tokens: int = 128,
                 session: str | None = None, recent_turns: int | None = None, remember: bool = False) -> Answer:
        """Answers ``query`` from memory: only the query's tokens are prefilled."""
        ids = self._ids(self.format.query(_check_text(query, "query")))
        ans = self.answer_ids(ids, top_k=top_k, token_budget=token_budget, max_new_tokens=max_new_tokens,
                              session=session, recent_turns=recent_turns)
        if remember:
            self.store_kv(query, ans.text, session=session)
        return ans

    def chat(self, message: str, **kwargs) -> Answer:
        """generate() with the last turns of this session in context, remembering the exchange."""
        kwargs.setdefault("recent_turns", max(self.recent_turns, 2))
        return self.generate(message, remember=True, **kwargs)


def _finite(seg) -> bool:
    import torch

    return bool(torch.isfinite(seg.kv(framework="torch")).all())


def _cpu(x):
    """A CPU array for a Segment (captures may live on the engine's device)."""
    dev = getattr(x, "device", None)
    if dev is not None and getattr(dev, "type", "cpu") != "cpu":
        return x.cpu()
    return x


DEFAULT_DEVICE_FRACTION = 0.25  # of the device's free memory, for the device tier of backend="gpu"


def _gpu_unusable(device: int) -> str:
    """Why backend="gpu" cannot run on CUDA device ``device`` here ("" when it can)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device available"
    if device >= torch.cuda.device_count():
        return f"CUDA device {device} does not exist ({torch.cuda.device_count()} present)"
    from kv_agent import cuda as kcuda

    if not kcuda.is_available():
        return "this kv_agent build has no CUDA support (build with KVAGENT_CUDA=ON)"
    return ""


def _default_device_capacity(device: int) -> int:
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    return max(1, int(free * DEFAULT_DEVICE_FRACTION))


def _special_ids(tokenizer) -> frozenset:
    ids = getattr(tokenizer, "all_special_ids", None) or []
    return frozenset(int(i) for i in ids)


def _device_index_options(options, device: int):
    """The index options of backend="gpu": the default ``device=-1`` becomes ``device`` (an
    explicit ``"cpu"``, ``"auto"`` or ordinal is kept); a kind the device index cannot score
    (``score="tokens"``, ``agg="top_p"``) stays on the CPU with a warning."""
    import dataclasses

    from kv_agent.index import IndexOptions

    options = options or IndexOptions()
    if options.device != -1:
        return options
    unsupported = [w for w, bad in (("score='tokens'", getattr(options, "score", None) == "tokens"),
                                    ("agg='top_p'", getattr(options, "agg", None) == "top_p")) if bad]
    if unsupported:
        warnings.warn(f"AgentMemory(backend='gpu'): the device index does not support {unsupported[0]}; the "
                      "latent index searches on the CPU", RuntimeWarning, stacklevel=3)
        return options
    return dataclasses.replace(options, device=device)
