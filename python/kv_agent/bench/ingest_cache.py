"""An on-disk cache of ingested kv-memory stores, one per (model, conversation, prefix, chunking).

Ingest (every turn's KV captured after the shared prefix, stored and summarised) is the slow part
of a retrieval benchmark on a CPU: minutes per LoCoMo conversation. The store it builds does not
depend on the index configuration (every layer is summarised), so it is built once per

    (model weights fingerprint, conversation id and the exact text of its turns, prefix text,
     max_segment_tokens)

under ``cache_dir/<conversation>-<hash of all of that>/`` and reopened by later runs through the
public ``AgentMemory``/``CacheManager`` API; a reopened memory's index is rebuilt from the stored
summaries. A directory is only reused once ``complete.json`` is written after the last turn was
flushed; a run that dies half way leaves no marker, and the next run deletes and rebuilds it.
Without ``cache_dir`` the store lives in a temporary directory removed by ``close()``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kv_agent.bench.locomo import Conversation
from kv_agent.bench.prompts import LocomoTemplate

CACHE_FORMAT = 1  # bump when what is stored per turn changes
MARKER = "complete.json"


def ingest_id(fingerprint_hex: str, conv: Conversation, template: LocomoTemplate, max_segment_tokens: int) -> str:
    """The cache directory name of one ingest: ``<sample_id>-<16 hex digits>``."""
    h = hashlib.sha256()
    h.update(json.dumps({
        "format": CACHE_FORMAT, "model": fingerprint_hex, "conversation": conv.sample_id,
        "prefix": template.prefix(conv), "max_segment_tokens": int(max_segment_tokens),
        "turns": [[t.dia_id, t.session, t.index, t.speaker, template.line(t)] for t in conv.turns],
    }, sort_keys=True).encode())
    return f"{conv.sample_id}-{h.hexdigest()[:16]}"


def dia_of(meta) -> str | None:
    """The LoCoMo dia_id of a stored turn segment (session ``S<n>``, turn ``i`` -> ``D<n>:<i>``)."""
    if meta.role == "system" or not meta.session.startswith("S") or not meta.session[1:].isdigit():
        return None
    return f"D{int(meta.session[1:])}:{int(meta.turn)}"


@dataclass
class IngestedConversation:
    """A conversation's turns in a kv-memory store, with the CacheManager that reads it."""

    conv: Conversation
    cm: object  # kv_agent.api.CacheManager
    key_to_dia: dict = field(default_factory=dict)  # segment key -> dia_id
    cached: bool = False  # True: reopened from the cache, no turn was encoded
    seconds: float = 0.0  # ingest (fresh) or reopen (cached) wall time
    info: dict = field(default_factory=dict)  # the marker's content: tokens, segments, ingest_s
    path: Path | None = None
    _temporary: bool = False

    @property
    def memory(self):
        return self.cm.memory

    def close(self) -> None:
        self.cm.memory.close()
        if self._temporary and self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)


def open_ingested(engine, conv: Conversation, template: LocomoTemplate, cache_dir: str | Path | None,
                  max_segment_tokens: int = 256, progress: bool = True) -> IngestedConversation:
    """Returns ``conv`` ingested into a kv-memory store: reopened from ``cache_dir`` when a
    complete ingest of the same key is there, else encoded now (and kept there)."""
    from kv_agent.api import AgentMemory, CacheManager
    from kv_agent.bench.kv_system import session_time_us

    t0 = time.perf_counter()
    fingerprint = engine.weights_fingerprint().hex()
    temporary = cache_dir is None
    if temporary:
        path = Path(tempfile.mkdtemp(prefix=f"kvagent-retrieval-{conv.sample_id}-"))
    else:
        path = Path(cache_dir) / ingest_id(fingerprint, conv, template, max_segment_tokens)
    marker = path / MARKER
    cached = marker.is_file()
    if path.exists() and not cached:
        shutil.rmtree(path)  # an ingest that did not finish
    # The disk tier keeps the KV; a small host tier keeps this process well below its memory share.
    mem = AgentMemory(path, backend="cpu", namespace=conv.sample_id, host_capacity_bytes=256 << 20)
    cm = CacheManager(model=engine, memory=mem, session="locomo", max_segment_tokens=max_segment_tokens)
    cm.set_prefix_text(template.prefix(conv))
    if cached:
        info = json.loads(marker.read_text())
    else:
        from tqdm.auto import tqdm

        tokens = 0
        for t in tqdm(conv.turns, desc=f"{conv.sample_id} ingest KV", unit="turn", leave=False, disable=not progress):
            line = template.line(t)
            cm.store_text(line, session=f"S{t.session}", turn=t.index, role=t.speaker,
                          time_us=session_time_us(t.date_time, t.session) + t.index)
            tokens += len(cm.tokenizer(line, add_special_tokens=False)["input_ids"])
        mem.flush()
        info = {"conversation": conv.sample_id, "model": fingerprint, "turns": len(conv.turns),
                "ingested_tokens": tokens, "max_segment_tokens": max_segment_tokens,
                "ingest_s": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    key_to_dia = {}
    for i in mem.store.list(ns=conv.sample_id):
        d = dia_of(i.meta)
        if d is not None:
            key_to_dia[i.key] = d
    info["segments"] = len(key_to_dia)
    if not cached and not temporary:
        marker.write_text(json.dumps(info, indent=1))
    return IngestedConversation(conv, cm, key_to_dia, cached, time.perf_counter() - t0, info, path, temporary)
