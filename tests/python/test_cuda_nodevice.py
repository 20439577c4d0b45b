"""The GPU API where no GPU is usable (CI): clear UnavailableErrors, nothing else changes."""

import numpy as np
import pytest

import kv_agent as ka
from kv_agent import cuda
from kv_agent.store import Segment, Store

MODEL = ka.Hash128.of_str("cuda-nodevice")

pytestmark = pytest.mark.skipif(cuda.is_available(), reason="a CUDA device is present (gpu tests cover it)")


def _segment():
    kv = np.arange(2 * 2 * 2 * 3 * 4, dtype=np.float32).reshape(2, 2, 2, 3, 4)
    return Segment(kv, tokens=[1, 2, 3], model=MODEL, ns="n", session="s", turn=1)


def test_store_with_device_tier_is_unavailable(tmp_path):
    with pytest.raises(ka.UnavailableError, match="device tier unavailable"):
        Store.open(device_capacity_bytes=1 << 20)
    with pytest.raises(ka.UnavailableError):
        Store.open(str(tmp_path), device_capacity_bytes=1 << 20)
    # The failed open left the directory usable.
    with Store.open(str(tmp_path)) as store:
        assert store.stats()["has_device"] is False


def test_get_device_without_device_tier_is_unavailable():
    with Store.open() as store:
        seg = _segment()
        store.put(seg)
        with pytest.raises(ka.UnavailableError, match="no device tier"):
            store.get_device(seg.key, MODEL)
        stats = store.stats()
        assert stats["device"] is None and stats["has_device"] is False
        assert np.array_equal(store.get(seg.key, MODEL).kv(), seg.kv())


def test_cuda_module_raises_unavailable():
    assert cuda.is_available() is False
    with pytest.raises(ka.UnavailableError):
        cuda.check()
    spec = ka.uniform_model_spec("t", 2, 4, 2, 4, ka.DType.f32, ka.RopeSpec(), MODEL)
    with pytest.raises(ka.UnavailableError):
        cuda.rope_table(spec)
    with pytest.raises(ka.UnavailableError):
        cuda.CudaRopeTable(spec)
    kv = np.zeros((2, 2, 2, 3, 4), np.float32)
    cache = [np.zeros((8, 2, 4), np.float32) for _ in range(2)]
    with pytest.raises(ka.UnavailableError):
        cuda.load(kv, cache, cache)
    with pytest.raises(ka.UnavailableError):
        cuda.save(kv, cache, cache)
