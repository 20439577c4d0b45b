"""``kvagent store stats|ls|show|verify|gc PATH``: inspect and maintain an on-disk store."""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys

from kv_agent import _core


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "store",
        help="inspect and maintain a segment store",
        description="Inspect and maintain an on-disk segment store.",
    )
    sub = p.add_subparsers(dest="store_command", metavar="ACTION", required=True)

    s = sub.add_parser("stats", help="segment counts and bytes per tier")
    _path(s)
    _json(s)
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("ls", help="list segments with their metadata")
    _path(s)
    s.add_argument("--ns", default="", help="only this namespace")
    s.add_argument("--agent", default="", help="only this agent")
    s.add_argument("--session", default="", help="only this session")
    s.add_argument("--model", default=None, help="only segments of this model fingerprint (hex)")
    s.add_argument(
        "--since", default=None, help="only segments at or after this time (ISO 8601, UTC if naive)"
    )
    s.add_argument("--until", default=None, help="only segments at or before this time (ISO 8601)")
    s.add_argument("--limit", type=int, default=0, help="show at most N segments (0 = all)")
    s.add_argument("--width", type=int, default=40, help="characters of text preview (default 40)")
    _json(s)
    s.set_defaults(func=cmd_ls)

    s = sub.add_parser("show", help="one segment's details; reads and checks its record")
    _path(s)
    s.add_argument("key", help="segment key: 32 hex digits or a unique prefix (as printed by ls)")
    _json(s)
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("verify", help="read every record and check its checksums")
    _path(s)
    _progress(s)
    _json(s)
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("gc", help="compact segment files (drop dead space)")
    _path(s)
    _progress(s)
    _json(s)
    s.set_defaults(func=cmd_gc)


def _path(p):
    p.add_argument("path", help="store directory")


def _json(p):
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _progress(p):
    p.add_argument(
        "--progress",
        choices=("auto", "on", "off"),
        default="auto",
        help="progress bar on stderr (auto: only on a terminal)",
    )


def _open(path: str):
    from kv_agent.errors import NotFoundError
    from kv_agent.store import Store

    if not os.path.isdir(path):
        raise NotFoundError(f"no store at {path!r} (not a directory)")
    # Read-mostly use: no write-behind thread work, small host tier.
    return Store.open(path, host_capacity_bytes=256 << 20, write_behind=False)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _time(us: int) -> str:
    if us <= 0:
        return "-"
    t = _dt.datetime.fromtimestamp(us / 1e6, tz=_dt.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M:%S")


_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


def _parse_time(s: str | None) -> int | None:
    if s is None:
        return None
    t = _dt.datetime.fromisoformat(s)
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return (t - _EPOCH) // _dt.timedelta(microseconds=1)


def _preview(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: max(width - 1, 0)] + "\u2026"


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells):
        out = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in rows])


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def cmd_stats(args) -> int:
    with _open(args.path) as store:
        st = store.stats()
    if args.json:
        _print_json(st)
        return 0
    rows = []
    for tier in ("host", "disk"):
        t = st[tier]
        if t is None:
            continue
        cap = _bytes(t["capacity_bytes"]) if t["capacity_bytes"] else "unbounded"
        files = _bytes(t["file_bytes"]) if tier == "disk" else "-"
        rows.append(
            [
                tier,
                str(t["segments"]),
                _bytes(t["bytes"]),
                cap,
                files,
                str(t["hits"]),
                str(t["misses"]),
                str(t["evictions"]),
            ]
        )
    print(
        _table(
            ["TIER", "SEGMENTS", "BYTES", "CAPACITY", "FILES", "HITS", "MISSES", "EVICTIONS"],
            rows,
            {1, 2, 4, 5, 6, 7},
        )
    )
    if st["disk"] is not None:
        d = st["disk"]
        dead = max(d["file_bytes"] - d["bytes"], 0)
        print(
            f"disk: {_bytes(d['file_bytes'])} in segment files, {_bytes(dead)} dead (reclaimed by gc), "
            f"{d['corrupt_records']} corrupt records skipped"
        )
    return 0


def _infos(store, args):
    infos = store.list(
        model=args.model,
        ns=args.ns,
        agent=args.agent,
        session=args.session,
        min_time_us=_parse_time(args.since),
        max_time_us=_parse_time(args.until),
    )
    infos.sort(
        key=lambda i: (
            i.meta.ns,
            i.meta.agent,
            i.meta.session,
            i.meta.turn,
            i.meta.chunk,
            i.meta.time_us,
            i.key.hex(),
        )
    )
    return infos[: args.limit] if args.limit > 0 else infos


def cmd_ls(args) -> int:
    with _open(args.path) as store:
        infos = _infos(store, args)
    if args.json:
        _print_json([i.to_dict() for i in infos])
        return 0
    rows = [
        [
            i.key.hex()[:12],
            i.meta.ns,
            i.meta.agent,
            i.meta.session,
            str(i.meta.turn),
            str(i.meta.chunk),
            i.meta.role,
            str(i.layout.num_tokens),
            _bytes(i.payload_bytes),
            _bytes(i.stored_bytes),
            _time(i.meta.time_us),
            _preview(i.meta.text, args.width),
        ]
        for i in infos
    ]
    print(
        _table(
            [
                "KEY",
                "NS",
                "AGENT",
                "SESSION",
                "TURN",
                "CHUNK",
                "ROLE",
                "TOKENS",
                "BYTES",
                "STORED",
                "TIME (UTC)",
                "TEXT",
            ],
            rows,
            {4, 5, 7, 8, 9},
        )
    )
    print(f"{len(infos)} segment(s)")
    return 0


def _resolve(store, key: str):
    from kv_agent import Hash128
    from kv_agent.errors import InvalidArgumentError, NotFoundError

    key = key.lower()
    if len(key) == 32:
        return Hash128.from_hex(key)
    if not key or any(c not in "0123456789abcdef" for c in key):
        raise InvalidArgumentError(f"key {key!r} is not hex")
    hits = [i.key for i in store.list() if i.key.hex().startswith(key)]
    if not hits:
        raise NotFoundError(f"no segment key starts with {key}")
    if len(hits) > 1:
        raise InvalidArgumentError(f"key prefix {key} is ambiguous ({len(hits)} segments)")
    return hits[0]


def cmd_show(args) -> int:
    from kv_agent.errors import DataLossError

    with _open(args.path) as store:
        key = _resolve(store, args.key)
        info = store.info(key)
        check, positions, tokens, summary = "ok", None, None, None
        try:
            seg = store.get(key, info.model)  # a fresh store reads the disk record: checksums verified
            positions = (int(seg.positions.min()), int(seg.positions.max()))
            tokens = [int(t) for t in seg.tokens[:16]]
            summary = len(seg.summary)
        except DataLossError as e:
            check = f"CORRUPT: {e}"
    d = info.to_dict()
    d.update(
        codec=f"{info.codec} ({_core.codec_encoded_size(info.layout, info.codec)} encoded payload bytes)"
        if info.stored_bytes else info.codec,
        checksums=check,
        positions_range=positions,
        first_tokens=tokens,
        summary_bytes=summary,
    )
    if args.json:
        _print_json(d)
        return 0 if check == "ok" else 1
    lay = info.layout
    m = info.meta
    lines = [
        ("key", info.key.hex()),
        ("model", info.model.hex()),
        ("parent", "-" if info.parent.is_zero() else info.parent.hex()),
        (
            "layout",
            f"[layers={lay.num_layers}][k|v][kv_heads={lay.num_kv_heads}][tokens={lay.num_tokens}]"
            f"[head_dim={lay.head_dim}]",
        ),
        ("dtype", lay.dtype.name),
        ("pre_rope", str(info.pre_rope)),
        ("codec", d["codec"]),
        ("payload", f"{_bytes(info.payload_bytes)} ({info.payload_bytes} bytes)"),
        ("stored", f"{_bytes(info.stored_bytes)} ({info.stored_bytes} bytes)"),
        ("positions", "-" if positions is None else f"{positions[0]}..{positions[1]}"),
        (
            "tokens",
            "-" if tokens is None else " ".join(map(str, tokens)) + (" ..." if lay.num_tokens > 16 else ""),
        ),
        ("summary", "-" if summary is None else f"{summary} bytes"),
        ("ns", m.ns),
        ("agent", m.agent),
        ("session", m.session),
        ("turn", str(m.turn)),
        ("chunk", str(m.chunk)),
        ("role", m.role),
        ("time", _time(m.time_us)),
        ("text", _preview(m.text, 200)),
        ("checksums", check),
    ]
    for k, v in lines:
        print(f"{k + ':':<11}{v}")
    return 0 if check == "ok" else 1


class _Bar:
    """A tqdm bar fed by (done, total) callbacks from the store."""

    def __init__(self, mode: str, desc: str):
        from tqdm import tqdm

        disable = {"on": False, "off": True, "auto": None}[mode]
        self.bar = tqdm(
            total=0, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=disable, file=sys.stderr
        )

    def __call__(self, done: int, total: int) -> None:
        if self.bar.total != total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


def cmd_verify(args) -> int:
    with _open(args.path) as store, _Bar(args.progress, "verify") as bar:
        report = store.verify(bar)
    if args.json:
        _print_json(report)
    else:
        for p in report["problems"]:
            print(f"CORRUPT {p}")
        print(
            f"{report['records']} records, {report['ok']} ok, {report['corrupt']} corrupt, "
            f"{_bytes(report['bytes'])} checked"
        )
    return 0 if report["corrupt"] == 0 else 1


def cmd_gc(args) -> int:
    with _open(args.path) as store, _Bar(args.progress, "compact") as bar:
        report = store.compact(bar)
    if args.json:
        _print_json(report)
    else:
        print(
            f"files {report['files_before']} -> {report['files_after']}, "
            f"{_bytes(report['bytes_before'])} -> {_bytes(report['bytes_after'])}, "
            f"{report['records_moved']} records moved"
        )
    return 0


__all__ = ["add_parser"]
