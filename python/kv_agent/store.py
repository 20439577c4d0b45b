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

Errors are the classes of :mod:`kv_agent.errors`: InvalidArgumentError (bad dtype, shape,
lengths; the store is unchanged), NotFoundError, FailedPreconditionError (model fingerprint
mismatch, closed store, path locked by another process), ResourceExhaustedError and
DataLossError (corrupt record; it is skipped, the rest stays readable).
"""

from __future__ import annotations

from kv_agent._core import Segment, SegmentInfo, SegmentLayout, Store

__all__ = ["Segment", "SegmentInfo", "SegmentLayout", "Store", "open_store"]


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
