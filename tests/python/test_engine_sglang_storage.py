"""The kv-agent HiCache storage backend, driven by SGLang's own HiCacheController (engine marker).

Runs in .venv-sglang (``make test-engine-sglang``); elsewhere the module skips. Every page goes
through SGLang's real code: ``write_storage`` -> backup thread -> ``_page_backup`` -> our
``batch_set``/``batch_set_v1``, and ``prefetch`` -> ``_storage_hit_query`` (SGLang's page hashes,
our ``batch_exists``) -> ``_page_transfer`` -> our ``batch_get``/``batch_get_v1`` -> SGLang's host pool.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine
pytest.importorskip(
    "sglang.srt.managers.cache_controller",
    reason="SGLang is installed only in .venv-sglang (make test-engine-sglang)",
)

import torch  # noqa: E402

from kv_agent.errors import InvalidArgumentError  # noqa: E402
from kv_agent.store import Segment  # noqa: E402
from sglang_harness import BACKEND, FINGERPRINT, Harness  # noqa: E402

HERE = Path(__file__).parent
LAYOUTS = ["layer_first", "page_first", "page_first_direct"]
IFACES = {"plain": {}, "v1": {"interface_v1": 1}}


def tokens(n, start=1000):
    return list(range(start, start + n))


@pytest.mark.parametrize("iface", IFACES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pages_round_trip_through_hicache_controller(layout, iface):
    h = Harness(layout=layout, extra=dict(IFACES[iface]))
    try:
        ids = tokens(40)  # 10 pages of 4
        idx = h.fill(ids, seed=1)
        want = h.pages(idx)
        assert h.backup(idx, ids) == 40
        # a repeated prefix (longer request sharing the first 40 tokens) hits all 10 pages
        hit, loaded, got_idx = h.prefetch(ids + tokens(6, start=5))
        assert (hit, loaded) == (40, 40)
        got = h.pages(got_idx)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        assert not torch.equal(got_idx[:4], idx[:4])  # really new host slots, filled from storage
        # a different first token changes every page hash: nothing hits
        assert h.prefetch([7] + ids[1:], rid="miss")[0] == 0
    finally:
        h.close()


def test_partial_prefix_hits_only_leading_pages():
    h = Harness(layout="layer_first")
    try:
        ids = tokens(16)
        assert h.backup(h.fill(ids, seed=2), ids) == 16
        longer = ids + tokens(8, start=99)  # 2 more pages never written
        hit, loaded, _ = h.prefetch(longer)
        assert (hit, loaded) == (16, 16)
    finally:
        h.close()


def test_namespace_and_fingerprint_separate_pages(tmp_path):
    ids, path = tokens(8), str(tmp_path / "store")
    a = Harness(extra={"namespace": "a", "path": path, "sync": False})
    try:
        assert a.backup(a.fill(ids, seed=3), ids) == 8
    finally:
        a.close()
    for extra, hits in [
        ({"namespace": "b"}, 0),
        ({"model_fingerprint": "f" * 32, "namespace": "a"}, 0),
        ({"namespace": "a"}, 8),
    ]:
        h = Harness(extra=dict(extra, path=path, sync=False))
        try:
            assert h.prefetch(ids)[0] == hits, extra
        finally:
            h.close()


def test_pages_survive_restart_in_a_new_process(tmp_path):
    extra = {"path": str(tmp_path / "store"), "interface_v1": 1, "sync": False}
    cfg = {
        "layout": "page_first",
        "extra": extra,
        "tokens": tokens(24),
        "seed": 4,
        "expect": str(tmp_path / "pages.pt"),
    }
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))

    def run(mode):
        r = subprocess.run(
            [sys.executable, str(HERE / "sglang_harness.py"), mode, json.dumps(cfg)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    assert run("write") == {"written": 24}
    assert run("read") == {"hit": 24, "loaded": 24, "same": True}


def test_records_are_canonical_segments_with_positions(tmp_path):
    h = Harness(layout="layer_first", extra={"interface_v1": 1})
    try:
        ids = tokens(12)
        idx = h.fill(ids, seed=5)
        hashes = h.page_hashes(ids)
        # SGLang passes prefix keys when hicache_storage_pass_prefix_keys is on: positions follow
        from sglang.srt.mem_cache.hicache_storage import HiCacheStorageExtraInfo

        ok = h.backend.batch_set_v1(hashes[1:], idx[4:], HiCacheStorageExtraInfo(prefix_keys=hashes[:1]))
        assert ok == [True, True]
        seg = h.backend.store.get(h.backend.store_key(hashes[2]), FINGERPRINT)
        assert list(seg.positions) == [8, 9, 10, 11]
        assert seg.parent == h.backend.store_key(hashes[1])
        assert seg.pre_rope is False and seg.meta.turn == 2 and seg.meta.role == "sglang-page"
        kv = seg.kv("torch")  # [L, 2, H, P, D]
        L, H, D = 2, 2, 8
        assert tuple(kv.shape) == (L, 2, H, 4, D)
        # canonical K of layer 1, head 0, token 9 == SGLang's layer_first buffer [k, layer, slot, head]
        assert torch.equal(kv[1, 0, 0, 1], h.host_pool.kv_buffer[0, 1, int(idx[9]), 0])
        assert torch.equal(kv[0, 1, 1, 3], h.host_pool.kv_buffer[1, 0, int(idx[11]), 1])
    finally:
        h.close()


def test_clear_removes_this_namespaces_pages_only(tmp_path):
    path = str(tmp_path / "store")
    h = Harness(extra={"namespace": "a", "path": path, "sync": False})
    try:
        ids = tokens(8)
        assert h.backup(h.fill(ids, seed=6), ids) == 8
        other = Segment(
            torch.zeros(1, 2, 1, 2, 4),
            tokens=[1, 2],
            model=h.backend.fingerprint,
            ns="a",
            session="s",
            turn=0,
        )
        h.backend.store.put(other)  # a kv-agent memory record in the same store and namespace
        assert h.backend.clear() is True
        assert h.backend.batch_exists(h.page_hashes(ids)) == 0
        assert h.backend.store.contains(other.key)
    finally:
        h.close()


def test_unsupported_layout_is_refused_when_sglang_attaches():
    with pytest.raises(ValueError, match="host layout 'page_head' is not supported"):
        Harness(layout="page_head")


def test_missing_or_bad_fingerprint_is_refused():
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    from kv_agent.engines.sglang_storage import KvAgentHiCacheStorage

    def config(extra, mla=False):
        return HiCacheStorageConfig(
            tp_rank=0,
            tp_size=1,
            pp_rank=0,
            pp_size=1,
            attn_cp_rank=0,
            attn_cp_size=1,
            is_mla_model=mla,
            enable_storage_metrics=False,
            is_page_first_layout=False,
            model_name="m",
            extra_config=extra,
        )

    with pytest.raises(InvalidArgumentError, match="model_fingerprint"):
        KvAgentHiCacheStorage(config(dict(BACKEND)), {})
    with pytest.raises(InvalidArgumentError, match="bad model_fingerprint"):
        KvAgentHiCacheStorage(config(dict(BACKEND, model_fingerprint="xyz")), {})
    with pytest.raises(InvalidArgumentError, match="MLA"):
        KvAgentHiCacheStorage(config(dict(BACKEND, model_fingerprint=FINGERPRINT), mla=True), {})
    with pytest.raises(InvalidArgumentError, match="host_capacity_bytes"):
        KvAgentHiCacheStorage(
            config(dict(BACKEND, model_fingerprint=FINGERPRINT, host_capacity_bytes="x")), {}
        )


def test_wrong_page_shape_changes_nothing():
    h = Harness(layout="layer_first")
    try:
        with pytest.raises(InvalidArgumentError, match="flat page"):
            h.backend.set("k", torch.zeros(3, dtype=torch.bfloat16))
        assert not h.backend.exists("k")
        with pytest.raises(InvalidArgumentError, match="host indices"):
            h.backend.batch_set_v1(["a", "b"], torch.arange(4))
        assert h.backend.batch_exists(["a", "b"]) == 0
    finally:
        h.close()
