"""The tiered KV segment store.

A :class:`Segment` is an immutable span of tokens with its KV payload in the canonical layout
``[layer][k|v][kv_head][token][dim]`` (float32, float16 or bfloat16), the original positions and
metadata. A :class:`Store` keeps segments in a bounded host tier and, when opened with a path,
writes them behind to a disk tier (append-only checksummed files and a SQLite catalog).

Arrays cross the boundary through DLPack: numpy arrays and CPU torch tensors in, read-only
views out, without copies where the layout allows. Every store call releases the GIL.

Example::

    from kv_agent.store import Segment, Store
    with Store.open("/tmp/kv", host_capacity_bytes=1 << 30) as store:
        seg = Segment(kv, tokens=ids, model=fingerprint, ns="app", session="s1", turn=3,
                      role="user", text="hi")
        store.put(seg)
        again = store.get(seg.key, fingerprint)
        view = again.kv("torch")   # no copy; keeps the segment alive

API (all in C++, see ``help(Segment)`` / ``help(Store)``)::

    Segment(kv=None, *, k=None, v=None, tokens, model, positions=None, key=None, parent=None,
            meta=None, ns=, agent=, session=, turn=, chunk=, role=, text=, time_us=,
            pre_rope=True, summary=b"", copy=None)
        kv: [layers, 2, kv_heads, tokens, head_dim]; or k, v: [layers, kv_heads, tokens, head_dim]
        tokens/positions: sequences or 1-D integer arrays; positions default to 0..n-1
        model: Hash128 fingerprint or ModelSpec (then the layout must match it)
        key: default memory_key(ns, session, turn, chunk); meta= or the individual fields
        copy: None wraps a C-contiguous canonical block without a copy, else copies;
              False never copies (error if needed); True always copies
      .kv(framework="numpy"|"torch")        read-only view, no copy, keeps the segment alive
      .k(layer=None, framework=...), .v(...) [kv_heads, tokens, dim] or [layers, kv_heads, tokens, dim]
      .key .model .parent .layout .dtype .num_tokens .nbytes .pre_rope .meta .summary
      .tokens .positions (read-only numpy views)  .info() -> SegmentInfo  .content_hash()

    Store.open(path=None, *, host_capacity_bytes=1 GiB, disk_capacity_bytes=0, max_file_bytes=256 MiB,
               write_behind=True, write_queue_limit=64, sync=True, codec="raw"|"int8",
               device_capacity_bytes=0, device=0, remote=None, remote_namespace="default",
               remote_ttl_seconds=0, remote_timeout_ms=2000)
        remote: "redis://[user:password@]host:port[/db]" adds the shared Redis tier (puts are
        copied to it in the background, local misses read it; docs/multi-agent.md)
      .put(segment)  .get(key, model) -> Segment  .info(key) -> SegmentInfo
      .get_device(key, model) -> DeviceSegment  (device tier; see kv_agent.cuda)
      .contains(key) / `key in store`  .delete(key)
      .list(*, model=None, ns="", agent="", session="", min_time_us=None, max_time_us=None)
      .flush()  .flush_remote(timeout_ms=10000)  .stats() -> {"host": {...}, "disk": {...} | None, "device": {...} | None, "promotions",
                             "write_queue_depth", "write_errors", "has_disk", "has_device",
                             "remote": {... "queue_depth", "dropped", "errors", "connected"} | None, "has_remote"}
      .verify(progress=None) -> {"records", "ok", "corrupt", "bytes", "problems"}
      .compact(progress=None) -> {"files_before", "files_after", "bytes_before", "bytes_after",
                                  "records_moved"}
      .close()  .closed  (context manager; open stores are closed at interpreter exit)
    keys: Hash128 or 32-digit hex strings; models: Hash128, hex or ModelSpec.
    progress(done, total) runs with the GIL held, from the working thread; it must not call the
    store. An exception it raises stops further calls and is re-raised when the call returns.

    SegmentInfo: .key .model .parent .layout .pre_rope .meta .payload_bytes .stored_bytes
      (stored_bytes: bytes of the record in the tier holding it), info["meta"], .keys(), .to_dict()

Errors are the classes of :mod:`kv_agent.errors`: InvalidArgumentError (bad dtype, shape,
lengths; the store is unchanged), NotFoundError, FailedPreconditionError (model fingerprint
mismatch, closed store, path locked by another process), ResourceExhaustedError and
DataLossError (corrupt record; it is skipped, the rest stays readable).
"""

from __future__ import annotations

from kv_agent._core import DeviceSegment, Segment, SegmentInfo, SegmentLayout, Store

__all__ = ["DeviceSegment", "Segment", "SegmentInfo", "SegmentLayout", "Store", "open_store"]


def open_store(path: str | None = None, **options) -> Store:
    """``Store.open(path, **options)``.

    Options (keyword only): ``host_capacity_bytes`` (default 1 GiB), ``disk_capacity_bytes``
    (0 = unbounded), ``max_file_bytes`` (segment file roll-over, default 256 MiB),
    ``write_behind`` (default True; False writes through to disk before ``put`` returns),
    ``write_queue_limit`` (segments queued before ``put`` blocks, default 64), ``sync``
    (fdatasync every record, default True) and ``codec`` (``"raw"``, bit-exact, or ``"int8"``:
    per-(layer, k|v, head, channel) scales, error at most scale/2 per element plus dtype rounding)
    for disk payloads. ``path=None`` opens a host-only store.
    """
    return Store.open(path, **options)
