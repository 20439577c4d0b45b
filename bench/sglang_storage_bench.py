"""SGLang reading prefix pages through the kv-agent HiCache backend, against hardware limits.

Run in .venv-sglang (``make sglang-venv``)::

    PYTHONPATH=tests/python .venv-sglang/bin/python bench/sglang_storage_bench.py [--pages 32] [--dir /tmp]

Host tier: SGLang's own ``HiCacheController._page_get_zero_copy`` (the ``interface_v1`` read it
runs in its prefetch thread) loads N resident pages from a host-only store into fresh host-pool
slots; the limit is a cache-cold memcpy of the same bytes (one contiguous copy per page over the
same working-set size). Disk tier: the same read after the store is closed and reopened (host
tier empty, records read from the segment files); the limit is a sequential O_DIRECT read of a
file of the same size in page-sized chunks, written just before the store's pages (a file just
written may be cached below the VM: same age for both). Reports wall-clock and process CPU time rates
(the machine is shared: CPU time is the fairer host comparison) and medians over --reps.
Copies run with one torch thread unless ``--threads`` says otherwise.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import tempfile
import time

import torch

from sglang_harness import Harness

SHAPES = {  # name: (layers, kv_heads, head_dim, page_size, dtype)
    "llama-8b-shape": (32, 8, 128, 64, torch.bfloat16),  # 8 MiB pages
    "gemma3-270m-shape": (18, 1, 256, 64, torch.float32),  # 2.25 MiB pages
}


def rate(nbytes, seconds):
    return nbytes / seconds / 1e9


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def memcpy_limit(page_bytes, pages):
    src = [torch.empty(page_bytes, dtype=torch.uint8).fill_(1) for _ in range(pages)]
    dst = [torch.empty(page_bytes, dtype=torch.uint8).fill_(0) for _ in range(pages)]
    return timed(lambda: [d.copy_(s) for d, s in zip(dst, src, strict=True)])


def write_limit_file(path, page_bytes, pages):
    """The sequential-read limit's file, written just before the store's pages (same age on disk)."""
    fn = os.path.join(path, "seq_limit.bin")
    buf = mmap.mmap(-1, page_bytes)
    buf.write(b"\1" * page_bytes)
    with open(fn, "wb") as f:
        for _ in range(pages):
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    return fn


def disk_limit(fn, page_bytes, pages):
    buf = mmap.mmap(-1, page_bytes)
    fd = os.open(fn, os.O_RDONLY | os.O_DIRECT)
    try:

        def read():
            off = 0
            for _ in range(pages):
                off += os.preadv(fd, [buf], off)

        return timed(read)
    finally:
        os.close(fd)


def sglang_read(h, hashes, pages):
    """SGLang's interface_v1 page read into fresh host slots; returns (wall, cpu, pages loaded)."""
    P = h.page_size
    idx = h.host_pool.alloc(pages * P)
    cc = h.controller
    op = type("Op", (), {"request_id": "bench", "is_terminated": lambda self: False})()
    n = [0]

    def run():
        n[0] = cc._page_get_zero_copy(op, hashes, idx)

    wall, cpu = timed(run)
    h.host_pool.free(idx)
    return wall, cpu, n[0]


def bench_shape(name, pages, reps, disk_dir):
    L, H, D, P, dtype = SHAPES[name]
    page_bytes = L * 2 * H * P * D * dtype.itemsize
    total = page_bytes * pages
    rows = []
    ids = list(range(1, pages * P + 1))
    with tempfile.TemporaryDirectory(dir=disk_dir) as d:
        store_dir = os.path.join(d, "store")
        limit_file = write_limit_file(d, page_bytes, pages)
        extra = {"interface_v1": 1, "path": store_dir, "host_capacity_bytes": 4 * total, "sync": False}

        def open_harness():
            return Harness(layers=L, heads=H, head_dim=D, page_size=P, dtype=dtype, tokens=pages * P,
                           layout="page_first_direct", extra=extra)

        h = open_harness()
        hashes = h.page_hashes(ids)
        idx = h.fill(ids, seed=0)
        assert h.backup(idx, ids) == len(ids)
        h.host_pool.free(idx)
        h.backend.store.flush()
        host, disk, lim_m, lim_d = [], [], [], []
        for _ in range(reps):
            w, c, n = sglang_read(h, hashes, pages)
            assert n == pages
            host.append((w, c))
            lim_m.append(memcpy_limit(page_bytes, pages))
        h.close()
        for _ in range(reps):
            h = open_harness()  # reopened: host tier empty
            w, c, n = sglang_read(h, hashes, pages)
            assert n == pages
            disk.append((w, c))
            h.close()
            lim_d.append(disk_limit(limit_file, page_bytes, pages))
    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    rows.append(
        (
            name,
            "host",
            page_bytes,
            rate(total, med(host, 0)),
            rate(total, med(lim_m, 0)),
            rate(total, med(host, 1)),
            rate(total, med(lim_m, 1)),
        )
    )
    rows.append(
        (
            name,
            "disk",
            page_bytes,
            rate(total, med(disk, 0)),
            rate(total, med(lim_d, 0)),
            rate(total, med(disk, 1)),
            rate(total, med(lim_d, 1)),
        )
    )
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default=os.environ.get("KVAGENT_BENCH_DIR", "/tmp"))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:  # on 2 shared cores torch's intra-op workers spin-wait and slow every copy down
        torch.set_num_threads(a.threads)
    print(
        "| shape | tier | page | read GB/s (wall) | limit GB/s (wall) | wall ratio | read GB/s (CPU) | "
        "limit GB/s (CPU) | CPU ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in a.shapes.split(","):
        print(f"# {name}: {a.pages} pages x {a.reps} reps ...", flush=True)
        for s, tier, pb, rw, lw, rc, lc in bench_shape(name, a.pages, a.reps, a.dir):
            print(
                f"| {s} | {tier} | {pb / 2**20:.2f} MiB | {rw:.2f} | {lw:.2f} | {rw / lw:.0%} | {rc:.2f} | "
                f"{lc:.2f} | {rc / lc:.0%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
