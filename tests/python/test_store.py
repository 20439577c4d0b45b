"""Store bindings: round trips through host and disk tiers, codecs, errors, GIL, processes."""

from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

import kv_agent as ka
from kv_agent.store import Segment, Store, open_store

torch = pytest.importorskip("torch")

MODEL = ka.Hash128.of_str("store-test-model")
OTHER_MODEL = ka.Hash128.of_str("another-model")
PYTHONPATH = str(Path(ka.__file__).resolve().parent.parent)
DTYPES = ["np-f32", "np-f16", "torch-f32", "torch-f16", "torch-bf16"]


def random_kv(kind: str, shape, seed: int):
    """Random payload with arbitrary bit patterns (NaN payloads, -0, Inf, subnormals)."""
    lib, dt = kind.split("-")
    rng = np.random.default_rng(seed)
    if dt == "f32":
        raw = rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32)
    else:
        raw = rng.integers(0, 2**16, size=shape, dtype=np.uint64).astype(np.uint16)
    if lib == "np":
        return raw.view({"f32": np.float32, "f16": np.float16}[dt])
    t = torch.from_numpy(raw.view(np.int32) if dt == "f32" else raw.view(np.int16))
    return t.view({"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dt])


def bits(a) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a.view({4: np.uint32, 2: np.uint16}[a.itemsize])
    return a.contiguous().view({4: torch.int32, 2: torch.int16}[a.element_size()]).numpy()


def framework(kv) -> str:
    return "numpy" if isinstance(kv, np.ndarray) else "torch"


def make_seg(kv, turn=0, session="s", ns="ns", **kw):
    n = kv.shape[3]
    kw.setdefault("tokens", [(turn * 131 + i) % 50000 for i in range(n)])
    kw.setdefault("positions", list(range(1000 + turn * n, 1000 + (turn + 1) * n)))
    return Segment(
        kv,
        model=MODEL,
        ns=ns,
        session=session,
        turn=turn,
        role="user" if turn % 2 == 0 else "assistant",
        text=f"turn {turn} text",
        time_us=1_700_000_000_000_000 + turn,
        summary=bytes([turn % 256]) * 3,
        **kw,
    )


def assert_same(a: Segment, b: Segment, kv_ref):
    assert a.key == b.key and a.model == b.model and a.parent == b.parent
    assert a.layout == b.layout and a.pre_rope == b.pre_rope and a.summary == b.summary
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.positions, b.positions)
    ma, mb = a.meta, b.meta
    assert (ma.ns, ma.agent, ma.session, ma.turn, ma.chunk, ma.role, ma.text, ma.time_us) == (
        mb.ns,
        mb.agent,
        mb.session,
        mb.turn,
        mb.chunk,
        mb.role,
        mb.text,
        mb.time_us,
    )
    np.testing.assert_array_equal(bits(b.kv(framework(kv_ref))), bits(kv_ref))


def snapshot(store):
    st = store.stats()
    tiers = {t: None if st[t] is None else (st[t]["segments"], st[t]["bytes"]) for t in ("host", "disk")}
    return tiers, sorted((i.key.hex(), i.payload_bytes) for i in store.list())


@pytest.mark.parametrize("kind", DTYPES)
def test_host_tier_roundtrip_bit_exact_and_shared(kind):
    with Store.open(None, host_capacity_bytes=64 << 20) as store:
        kv = random_kv(kind, (3, 2, 2, 7, 5), seed=1)
        seg = make_seg(kv, turn=1)
        store.put(seg)
        got = store.get(seg.key, MODEL)
        assert_same(seg, got, kv)
        # Put copies the payload once into the tier; gets hand out that copy itself (no copy).
        again = store.get(seg.key, MODEL)
        if framework(kv) == "numpy":
            assert got.kv().ctypes.data == again.kv().ctypes.data != seg.kv().ctypes.data
        else:
            assert got.kv("torch").data_ptr() == again.kv("torch").data_ptr() != seg.kv("torch").data_ptr()
        st = store.stats()
        assert st["has_disk"] is False and st["disk"] is None
        assert st["host"]["segments"] == 1 and st["host"]["bytes"] >= seg.nbytes  # plus metadata


@pytest.mark.parametrize("write_behind", [True, False])
def test_disk_roundtrip_after_reopen_bit_exact(tmp_path, write_behind):
    refs = {}
    with Store.open(str(tmp_path), write_behind=write_behind, sync=False) as store:
        for turn, kind in enumerate(DTYPES):
            kv = random_kv(kind, (2, 2, 3, 4 + turn, 8), seed=turn)
            seg = make_seg(kv, turn=turn, parent=ka.Hash128.of_str(f"p{turn}"), pre_rope=turn % 2 == 0)
            store.put(seg)
            refs[seg.key.hex()] = (seg, kv)
        store.flush()
        assert store.stats()["disk"]["segments"] == len(DTYPES)
    with Store.open(str(tmp_path)) as store:  # a new store: host tier empty, reads come from disk
        assert store.stats()["host"]["segments"] == 0
        assert sorted(i.key.hex() for i in store.list()) == sorted(refs)
        for seg, kv in refs.values():
            assert seg.key in store
            assert_same(seg, store.get(seg.key, MODEL), kv)
        st = store.stats()
        assert st["disk"]["hits"] >= len(DTYPES)


def int8_bound(x: np.ndarray, dtype: str) -> np.ndarray:
    """Per-element bound: scale/2 (scale = max|x|/127 per layer, k|v, head, channel over tokens)
    plus rounding of the decoded value to the payload dtype, plus float32 slack."""
    x64 = x.astype(np.float64)
    scale = np.abs(x64).max(axis=3, keepdims=True) / 127.0
    top = np.abs(x64) + scale
    if dtype == "bf16":  # 8 significant bits
        rounding = np.exp2(np.floor(np.log2(np.maximum(top, 1e-38))) - 7) / 2
    else:
        rounding = np.spacing(top.astype(dtype)).astype(np.float64) / 2
    return scale / 2 * (1 + 1e-6) + rounding + np.abs(x64) * 1e-7


@pytest.mark.parametrize("dtype", ["float32", "float16", "bf16"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 9, 5), (1, 2, 33, 16)])
def test_int8_codec_error_bound(tmp_path, dtype, shape):
    L, H, T, D = shape
    rng = np.random.default_rng(T * D)
    x = rng.standard_normal((L, 2, H, T, D)) * rng.uniform(0.01, 10, size=(L, 2, H, 1, D))
    x[..., 0, 0] = 0  # a zero and (below) an all-zero channel
    if T > 1:
        x[0, 0, 0, :, -1] = 0
    if dtype == "bf16":
        kv = torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
        ref = kv.float().numpy()  # the exact values stored
    else:
        kv = x.astype(dtype)
        ref = kv
    seg = make_seg(kv)
    with Store.open(str(tmp_path), codec="int8", write_behind=False) as store:
        store.put(seg)
    with Store.open(str(tmp_path)) as store:
        got_seg = store.get(seg.key, MODEL)
        info = store.info(seg.key)
    got = got_seg.kv("torch").float().numpy() if dtype == "bf16" else got_seg.kv()
    assert dtype == "bf16" or got.dtype == dtype
    err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    bound = int8_bound(ref, dtype)
    assert (err <= bound).all(), f"max excess {(err - bound).max()}"
    assert err.max() > 0 or T == 1  # really quantised, not stored raw
    if T > 1:
        assert (got[0, 0, 0, :, -1] == 0).all()
    assert info.payload_bytes == seg.nbytes


def test_bad_input_leaves_store_unchanged(tmp_path):
    with Store.open(str(tmp_path), write_behind=False) as store:
        kv = random_kv("np-f32", (2, 2, 2, 3, 4), seed=3)
        good = make_seg(kv, turn=1)
        store.put(good)
        before = snapshot(store)
        bad_inputs = [
            lambda: store.put(make_seg(np.zeros(kv.shape, np.int32))),
            lambda: store.put(make_seg(kv.astype(np.float64))),
            lambda: store.put(make_seg(kv[0])),
            lambda: store.put(make_seg(kv, tokens=[1, 2])),
            lambda: store.put(make_seg(kv, positions=[1])),
            lambda: store.put(Segment(k=kv[:, 0], v=kv[:, 1, :1], tokens=[1, 2, 3], model=MODEL)),
        ]
        for bad in bad_inputs:
            with pytest.raises(ka.InvalidArgumentError):
                bad()
        with pytest.raises(TypeError):
            store.put(kv)
        with pytest.raises(ka.FailedPreconditionError, match="model"):
            store.get(good.key, OTHER_MODEL)
        with pytest.raises(ka.NotFoundError):
            store.get(ka.memory_key("ns", "s", 99), MODEL)
        with pytest.raises(ka.NotFoundError):
            store.delete(ka.memory_key("ns", "s", 99))
        with pytest.raises(ka.InvalidArgumentError):
            store.get("not-hex", MODEL)
        assert snapshot(store) == before
        assert_same(good, store.get(good.key, MODEL), kv)
    with Store.open(str(tmp_path)) as store:  # and nothing bad reached the disk
        assert snapshot(store)[1] == before[1]
        with pytest.raises(ka.FailedPreconditionError):
            store.get(good.key, OTHER_MODEL)  # disk path checks the fingerprint too
        assert_same(good, store.get(good.key.hex(), MODEL), kv)


def test_info_list_filters_delete_and_stats(tmp_path):
    with open_store(str(tmp_path), write_behind=True, sync=False) as store:
        kv = random_kv("np-f16", (1, 2, 1, 4, 8), seed=5)
        segs = [make_seg(kv, turn=t, session="a" if t < 3 else "b") for t in range(5)]
        other = Segment(kv, model=OTHER_MODEL, ns="other", session="a", turn=0, tokens=[1, 2, 3, 4])
        for s in [*segs, other]:
            store.put(s)
        store.flush()
        info = store.info(segs[2].key)
        assert info.key == segs[2].key and info["meta"]["turn"] == 2 and info.meta.role == "user"
        assert info.payload_bytes == kv.nbytes and info.layout == segs[2].layout
        assert {"key", "model", "layout", "meta", "payload_bytes", "stored_bytes"} <= set(info.keys())
        keys = lambda infos: sorted(i.key.hex() for i in infos)  # noqa: E731
        assert keys(store.list()) == keys([*segs, other])
        assert keys(store.list(session="a", ns="ns")) == keys(segs[:3])
        assert keys(store.list(model=OTHER_MODEL)) == [other.key.hex()]
        assert keys(store.list(min_time_us=segs[1].meta.time_us, max_time_us=segs[3].meta.time_us)) == keys(
            segs[1:4]
        )
        store.delete(segs[0].key)
        assert not store.contains(segs[0].key) and segs[0].key not in store
        with pytest.raises(ka.NotFoundError):
            store.get(segs[0].key, MODEL)
        store.flush()  # the delete is written behind too
        st = store.stats()
        assert set(st) >= {"host", "disk", "promotions", "write_queue_depth", "write_errors", "has_disk"}
        assert st["has_disk"] and st["write_errors"] == 0 and st["write_queue_depth"] == 0
        assert st["disk"]["segments"] == 5 and st["disk"]["file_bytes"] >= st["disk"]["bytes"] > 0
        report = store.verify()
        assert report["corrupt"] == 0 and report["records"] >= 5 and report["problems"] == []
        seen = []
        rep = store.compact(lambda done, total: seen.append((done, total)))
        assert rep["bytes_after"] <= rep["bytes_before"]
        assert all(0 <= d <= t for d, t in seen)
        assert keys(store.list()) == keys([*segs[1:], other])


def test_progress_callback_errors_propagate(tmp_path):
    with Store.open(str(tmp_path), write_behind=False, sync=False) as store:
        kv = random_kv("np-f32", (1, 2, 1, 64, 64), seed=6)
        for t in range(4):
            store.put(make_seg(kv, turn=t))
        calls = []
        report = store.verify(lambda d, t: calls.append((d, t)))
        assert calls and calls[-1][0] == calls[-1][1] and report["ok"] == 4
        assert [c[0] for c in calls] == sorted(c[0] for c in calls)

        def boom(done, total):
            raise RuntimeError("stop here")

        with pytest.raises(RuntimeError, match="stop here"):
            store.verify(boom)
        assert store.verify()["ok"] == 4  # still usable


def test_threads_share_a_store(tmp_path):
    """Several Python threads put/get/list/delete concurrently (the GIL is released in every call)."""
    errors = []
    with Store.open(str(tmp_path), host_capacity_bytes=256 << 10, write_behind=True, sync=False) as store:

        def worker(w):
            try:
                for t in range(40):
                    kv = np.full((1, 2, 2, 8, 16), w * 1000 + t, dtype=np.float32)
                    seg = make_seg(kv, turn=t, session=f"w{w}")
                    store.put(seg)
                    got = store.get(seg.key, MODEL)
                    assert (got.kv() == w * 1000 + t).all()
                    if t % 5 == 0:
                        store.delete(seg.key)
                    store.list(session=f"w{w}")
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert errors == []
        store.flush()
        for w in range(4):
            turns = sorted(i.meta.turn for i in store.list(session=f"w{w}"))
            assert turns == [t for t in range(40) if t % 5 != 0]
    with Store.open(str(tmp_path)) as store:
        assert len(store.list()) == 4 * 32
        np.testing.assert_array_equal(store.get(ka.memory_key("ns", "w3", 39), MODEL).kv(), 3039)


def test_open_rejects_bad_options(tmp_path):
    with pytest.raises(ka.InvalidArgumentError):
        Store.open(str(tmp_path), codec="zstd")


def test_closed_store_raises(tmp_path):
    store = Store.open(str(tmp_path))
    store.close()
    assert store.closed
    with pytest.raises(ka.FailedPreconditionError, match="closed"):
        store.stats()
    store.close()  # idempotent
    with Store.open(str(tmp_path)) as again:  # the directory lock was released
        assert again.list() == []
    with pytest.raises(ka.FailedPreconditionError):
        again.list()


WRITER = textwrap.dedent(
    """
    import sys, numpy as np, kv_agent as ka
    from kv_agent.store import Segment, Store
    path, n = sys.argv[1], int(sys.argv[2])
    model = ka.Hash128.of_str("store-test-model")
    store = Store.open(path)  # closed by the atexit hook: write-behind data must reach the disk
    for t in range(n):
        kv = np.full((2, 2, 1, 3, 4), t, dtype=np.float16)
        kv[0, 1] = -t
        store.put(Segment(kv, tokens=[t, t + 1, t + 2], model=model, ns="proc", session="w", turn=t,
                          text=f"written by {sys.argv[0]!r} turn {t}"))
    print("wrote", n)
    """
)


def test_persistence_across_processes(tmp_path):
    env = dict(os.environ, PYTHONPATH=PYTHONPATH)
    r = subprocess.run(
        [sys.executable, "-c", WRITER, str(tmp_path), "6"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    with Store.open(str(tmp_path)) as store:
        infos = store.list(ns="proc")
        assert sorted(i.meta.turn for i in infos) == list(range(6))
        for t in range(6):
            seg = store.get(ka.memory_key("proc", "w", t), MODEL)
            expect = np.full((2, 2, 1, 3, 4), t, dtype=np.float16)
            expect[0, 1] = -t
            np.testing.assert_array_equal(seg.kv(), expect)
            np.testing.assert_array_equal(seg.tokens, [t, t + 1, t + 2])
    # While this process holds the store, another one cannot open it.
    with Store.open(str(tmp_path)):
        r = subprocess.run(
            [sys.executable, "-c", WRITER, str(tmp_path), "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode != 0 and "FailedPreconditionError" in r.stderr


def test_wrapped_arrays_are_not_retained_by_the_store(tmp_path):
    """Segments wrapping Python arrays (copy=False) are copied by put: the store (host tier,
    write-behind queue, disk) never keeps a Python object alive, and mutating the array after
    put does not change what was stored."""
    arrays = []
    with Store.open(str(tmp_path), host_capacity_bytes=1 << 20, write_behind=True, sync=False) as store:
        for t in range(8):
            kv = np.full((1, 2, 2, 64, 64), t, dtype=np.float32)
            arrays.append(weakref.ref(kv))
            seg = make_seg(kv, turn=t, copy=False)
            store.put(seg)
            kv[:] = -1
            del kv, seg
            gc.collect()
            assert arrays[-1]() is None
        store.flush()
        for t in range(8):
            np.testing.assert_array_equal(store.get(ka.memory_key("ns", "s", t), MODEL).kv(), t)


def ticks_inside(call):
    """Runs call() while a second Python thread records timestamps (it can only do so while it
    holds the GIL). Returns (duration, ticks in the middle half of the call, longest stretch of the
    call without a tick). A call that holds the GIL lets the counter run at most one switch
    interval (1 ms here) while it starts, so it gets no ticks while its C++ part runs."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.001)
    ticks, stop = [], threading.Event()

    def spin():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            sum(range(50))

    th = threading.Thread(target=spin)
    th.start()
    try:
        while not ticks:
            time.sleep(0.001)
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
    finally:
        stop.set()
        th.join()
        sys.setswitchinterval(old)
    q = (t1 - t0) / 4
    during = [t0] + [t for t in ticks if t0 < t < t1] + [t1]
    gap = max(b - a for a, b in zip(during, during[1:], strict=False))
    return t1 - t0, sum(t0 + q <= t <= t1 - q for t in ticks), gap


def long_enough(make_call, min_s=0.06, max_rounds=5):
    """Scales the work (1, 2, 4, ...) until one call takes at least min_s; returns its result."""
    for r in range(max_rounds):
        dur, inside, gap = ticks_inside(make_call(2**r))
        if dur >= min_s:
            return dur, inside, gap
    pytest.fail(f"could not make the call last {min_s} s (last {dur:.3f} s)")


def assert_gil_released(make_call, what, min_s=0.06, attempts=3):
    """The counter thread ticks during the middle half of the call. On a loaded machine the OS
    may starve the counter for a while, so a miss is retried; a call that holds the GIL misses
    every time."""
    for _ in range(attempts):
        dur, inside, _ = long_enough(make_call, min_s)
        if inside > 0:
            return
    pytest.fail(f"no Python progress during a {dur:.3f} s {what} ({attempts} attempts)")


def test_gil_detector_catches_a_gil_holder():
    # Negative control: sre's backtracking holds the GIL (~0.1 s at 20 characters, x4 per 2 more).
    # The counter may still tick before the C call starts (e.g. if the OS preempts a thread on a
    # busy machine), but not during it: most of the call passes without a tick.
    dur, inside, gap = long_enough(lambda r: lambda: re.match(r"(a+)+b", "a" * (18 + r)), min_s=0.1)
    assert gap >= dur / 2, (dur, inside, gap)


def test_gil_released_during_put_and_flush(tmp_path):
    kv = np.ones((4, 2, 8, 256, 128), dtype=np.float32)  # 8 MiB, shared by every segment (copy=False)
    with Store.open(str(tmp_path / "through"), write_behind=False, sync=True) as store:

        def put_call(r):
            seg = Segment(np.tile(kv, (r, 1, 1, 1, 1)), tokens=list(range(256)), model=MODEL, ns="g", turn=r)
            return lambda: store.put(seg)

        assert_gil_released(put_call, "put")

    with Store.open(str(tmp_path / "behind"), write_behind=True, write_queue_limit=256, sync=True) as store:

        def flush_call(r):
            for t in range(16 * r):
                store.put(
                    Segment(kv, tokens=list(range(256)), model=MODEL, ns="f", turn=1000 * r + t, copy=False)
                )
            return store.flush

        assert_gil_released(flush_call, "flush")


def test_gil_released_during_segment_copy():
    def copy_call(r):
        big = np.ones((8 * r, 2, 8, 512, 64), dtype=np.float16)[
            ..., ::-1
        ]  # negative stride: element-wise copy
        return lambda: Segment(big, tokens=list(range(512)), model=MODEL)

    assert_gil_released(copy_call, "copy", min_s=0.03)
