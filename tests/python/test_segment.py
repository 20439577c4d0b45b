"""Segment bindings: DLPack import/export, zero-copy, layouts, bad input."""

from __future__ import annotations

import gc
import itertools
import weakref

import numpy as np
import pytest

import kv_agent as ka
from kv_agent import _core
from kv_agent.store import Segment

torch = pytest.importorskip("torch")

MODEL = ka.Hash128.of_str("test-model-weights")
# Awkward sizes: 1s, odd numbers, a head_dim that is not a power of two.
SHAPES = [(1, 1, 1, 1), (3, 2, 7, 5), (2, 3, 1, 16), (1, 4, 9, 3)]


def random_bits(rng, shape, dtype):
    """Arbitrary bit patterns (NaN payloads, -0, Inf, subnormals included)."""
    if dtype == np.float32:
        return rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return rng.integers(0, 2**16, size=shape, dtype=np.uint64).astype(np.uint16).view(np.float16)


def bits(a):
    if isinstance(a, np.ndarray):
        return a.view({4: np.uint32, 2: np.uint16}[a.itemsize])
    return a.contiguous().view({4: torch.int32, 2: torch.int16}[a.element_size()]).numpy()


def make(kv=None, tokens=None, **kw):
    n = kv.shape[3] if kv is not None else kw["k"].shape[2]
    return Segment(kv, tokens=list(range(100, 100 + n)) if tokens is None else tokens, model=MODEL, **kw)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_numpy_kv_roundtrip_bit_exact(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    L, H, T, D = shape
    kv = random_bits(rng, (L, 2, H, T, D), dtype)
    for copy in (None, True, False):
        seg = make(kv, copy=copy)
        assert seg.layout.shape == (L, 2, H, T, D)
        assert seg.dtype == {np.float32: ka.DType.f32, np.float16: ka.DType.f16}[dtype]
        assert seg.nbytes == kv.nbytes
        out = seg.kv()
        assert out.dtype == dtype and out.shape == kv.shape
        np.testing.assert_array_equal(bits(out), bits(kv))
        for layer in range(L):
            np.testing.assert_array_equal(bits(seg.k(layer)), bits(kv[layer, 0]))
            np.testing.assert_array_equal(bits(seg.v(layer)), bits(kv[layer, 1]))
        np.testing.assert_array_equal(bits(seg.k()), bits(kv[:, 0]))
        np.testing.assert_array_equal(bits(seg.v(-1)), bits(kv[-1, 1]))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_kv_and_k_v_roundtrip_bit_exact(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    L, H, T, D = shape
    int_t = torch.int32 if dtype == torch.float32 else torch.int16
    info = torch.iinfo(int_t)
    raw = torch.randint(info.min, info.max, (L, 2, H, T, D), generator=g, dtype=torch.int64).to(int_t)
    kv = raw.view(dtype)
    ref = bits(kv)
    seg = make(kv)
    assert seg.dtype.name == {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
    np.testing.assert_array_equal(bits(seg.kv("torch")), ref)
    seg2 = make(k=kv[:, 0], v=kv[:, 1])  # halves of one block: no copy needed, still correct
    np.testing.assert_array_equal(bits(seg2.kv("torch")), ref)
    # Separate, non-contiguous k and v (transposed storage) are copied into canonical order.
    k = kv[:, 0].transpose(1, 2).contiguous().transpose(1, 2)
    v = kv[:, 1].clone()
    assert not k.is_contiguous() or T == 1 or D == 1
    seg3 = make(k=k, v=v)
    np.testing.assert_array_equal(bits(seg3.kv("torch")), ref)
    np.testing.assert_array_equal(bits(seg3.k(framework="torch")), bits(kv[:, 0]))
    np.testing.assert_array_equal(bits(seg3.v(L - 1, framework="torch")), bits(kv[L - 1, 1]))


@pytest.mark.parametrize("L,H,T,D", SHAPES)
def test_strided_numpy_inputs_are_copied_in_canonical_order(L, H, T, D):
    rng = np.random.default_rng(7)
    big = rng.standard_normal((L, 2, H, T + 2, 2 * D)).astype(np.float32)
    kv = big[:, :, :, 1 : T + 1, ::2]  # non-contiguous tokens and dims
    seg = make(kv)
    np.testing.assert_array_equal(seg.kv(), kv)
    rev = np.ascontiguousarray(kv[:, :, :, ::-1])[:, :, :, ::-1]  # negative strides
    np.testing.assert_array_equal(make(rev).kv(), kv)
    k = np.asfortranarray(kv[:, 0])
    v = np.broadcast_to(kv[:1, 1], kv[:, 1].shape)  # zero stride over layers
    seg = make(k=k, v=v)
    np.testing.assert_array_equal(seg.kv(), np.stack([k, v], axis=1))
    with pytest.raises(ka.InvalidArgumentError, match="copy=False needs"):
        make(kv, copy=False)
    with pytest.raises(ka.InvalidArgumentError, match="copy=False needs"):
        make(k=k, v=v, copy=False)


def test_zero_copy_import_and_export_views():
    kv = np.random.default_rng(1).standard_normal((2, 2, 3, 5, 4)).astype(np.float16)
    seg = make(kv, copy=False)
    out = seg.kv()
    assert np.shares_memory(out, kv)
    assert out.ctypes.data == kv.ctypes.data
    assert not out.flags.writeable
    with pytest.raises(ValueError):
        out[0, 0, 0, 0, 0] = 1
    assert np.shares_memory(seg.k(1), kv[1, 0]) and seg.k(1).ctypes.data == kv[1, 0].ctypes.data
    assert seg.v(0).ctypes.data == kv[0, 1].ctypes.data
    t = seg.kv("torch")
    assert t.data_ptr() == kv.ctypes.data
    assert seg.k(1, framework="torch").data_ptr() == kv[1, 0].ctypes.data
    # k, v given as halves of one contiguous block are wrapped, not copied.
    seg_kv = make(k=kv[:, 0], v=kv[:, 1], copy=False)
    assert seg_kv.kv().ctypes.data == kv.ctypes.data
    # copy=None (default) wraps a canonical block; copy=True owns its memory: later writes to the
    # source do not reach it.
    assert make(kv).kv().ctypes.data == kv.ctypes.data
    assert not np.shares_memory(make(kv[:, :, :, ::-1]).kv(), kv)
    owned = make(kv, copy=True)
    assert not np.shares_memory(owned.kv(), kv)
    before = owned.kv().copy()
    kv[:] = 0
    np.testing.assert_array_equal(owned.kv(), before)
    # The views of an owned segment all point into the same payload (no per-call copy).
    assert owned.kv().ctypes.data == owned.kv().ctypes.data == owned.kv("torch").data_ptr()
    assert np.shares_memory(owned.tokens, owned.tokens)
    assert not owned.tokens.flags.writeable and owned.tokens.dtype == np.int32


def test_torch_zero_copy_bf16():
    kv = torch.randn(2, 2, 2, 3, 8).to(torch.bfloat16)
    seg = make(kv, copy=False)
    assert seg.kv("torch").data_ptr() == kv.data_ptr()
    assert torch.equal(seg.kv("torch"), kv)
    with pytest.raises(ka.InvalidArgumentError, match="numpy has no bfloat16"):
        seg.kv("numpy")
    with pytest.raises(ka.InvalidArgumentError, match="framework must be"):
        seg.kv("jax")


def test_views_keep_segment_alive_and_release_source():
    kv = np.arange(2 * 2 * 1 * 3 * 4, dtype=np.float32).reshape(2, 2, 1, 3, 4)
    expect = kv.copy()
    src = weakref.ref(kv)
    seg = make(kv, copy=False)
    del kv
    view = seg.kv()
    del seg
    gc.collect()
    assert src() is not None  # the view holds the segment, which holds the source array
    np.testing.assert_array_equal(view, expect)
    del view
    gc.collect()
    assert src() is None  # and everything is released once the last view is gone


def test_metadata_key_positions_and_summary():
    kv = np.zeros((1, 2, 1, 3, 2), np.float32)
    seg = make(
        kv,
        tokens=[5, 6, 7],
        ns="app",
        agent="bot",
        session="s1",
        turn=4,
        chunk=1,
        role="user",
        text="hello",
        time_us=123,
        summary=b"\x00\x01",
        pre_rope=False,
    )
    assert seg.key == ka.memory_key("app", "s1", 4, 1)
    np.testing.assert_array_equal(seg.tokens, [5, 6, 7])
    np.testing.assert_array_equal(seg.positions, [0, 1, 2])
    m = seg.meta
    assert (m.ns, m.agent, m.session, m.turn, m.chunk, m.role, m.text, m.time_us) == (
        "app",
        "bot",
        "s1",
        4,
        1,
        "user",
        "hello",
        123,
    )
    assert seg.summary == b"\x00\x01" and seg.pre_rope is False and len(seg) == 3
    assert seg.model == MODEL and seg.parent.is_zero()
    key = ka.Hash128.of_str("explicit")
    meta = ka.SegmentMeta()
    meta.ns = "x"
    seg = make(kv, positions=[10, 11, 20], key=key, meta=meta, parent=key)
    assert seg.key == key and seg.parent == key and seg.meta.ns == "x"
    np.testing.assert_array_equal(seg.positions, [10, 11, 20])
    info = seg.info()
    assert info["meta"]["ns"] == "x" and info.payload_bytes == kv.nbytes and info["layout"]["dtype"] == "f32"
    assert seg.content_hash() == ka.content_hash(MODEL, [100, 101, 102])


def test_tokens_and_positions_from_arrays():
    kv = np.zeros((1, 2, 1, 4, 2), np.float32)
    seg = make(kv, tokens=torch.tensor([7, 8, 9, 2**31 - 1]), positions=np.arange(10, 18, 2, dtype=np.uint16))
    np.testing.assert_array_equal(seg.tokens, [7, 8, 9, 2**31 - 1])
    np.testing.assert_array_equal(seg.positions, [10, 12, 14, 16])
    seg = make(
        kv, tokens=np.arange(8, dtype=np.int64)[::2], positions=torch.arange(4, dtype=torch.int64) + 2**40
    )
    np.testing.assert_array_equal(seg.tokens, [0, 2, 4, 6])
    np.testing.assert_array_equal(seg.positions, np.arange(4) + 2**40)
    for bad, msg in [
        (np.zeros((1, 4), np.int32), "1-D integer"),
        (np.zeros(4, np.float32), "1-D integer"),
        (np.array([0, 1, 2, 2**31]), "out of range"),
        ([0, 1, 2, 2**31], "sequence of ints"),
        ("abcd", "sequence of ints"),
    ]:
        with pytest.raises(ka.InvalidArgumentError, match=msg):
            make(kv, tokens=bad)


def spec(kv_dtype=ka.DType.f32):
    return ka.uniform_model_spec("t", 2, 4, 2, 4, kv_dtype, ka.RopeSpec(), MODEL)


def test_model_spec_checks_layout():
    kv = np.zeros((2, 2, 2, 3, 4), np.float32)
    seg = Segment(kv, tokens=[1, 2, 3], model=spec())
    assert seg.model == MODEL
    with pytest.raises(ka.InvalidArgumentError, match="does not match model"):
        Segment(np.zeros((2, 2, 1, 3, 4), np.float32), tokens=[1, 2, 3], model=spec())
    with pytest.raises(ka.InvalidArgumentError):
        Segment(kv, tokens=[1, 2, 3], model=spec(ka.DType.f16))


BAD = {
    "int32": (dict(kv=np.zeros((1, 2, 1, 2, 2), np.int32)), "dtype int32"),
    "float64": (dict(kv=np.zeros((1, 2, 1, 2, 2), np.float64)), "dtype float64"),
    "rank4": (dict(kv=np.zeros((2, 1, 2, 2), np.float32)), r"shape \[layers, 2"),
    "not2": (dict(kv=np.zeros((1, 3, 1, 2, 2), np.float32)), r"got \(1, 3, 1, 2, 2\)"),
    "empty": (dict(kv=np.zeros((1, 2, 0, 2, 2), np.float32)), "empty dimension"),
    "kv_mismatch": (
        dict(k=np.zeros((1, 1, 2, 2), np.float32), v=np.zeros((1, 1, 2, 3), np.float32)),
        "same shape",
    ),
    "kv_dtypes": (
        dict(k=np.zeros((1, 1, 2, 2), np.float32), v=np.zeros((1, 1, 2, 2), np.float16)),
        "same dtype",
    ),
    "k_only": (dict(k=np.zeros((1, 1, 2, 2), np.float32)), "both k= and v="),
    "both": (
        dict(
            kv=np.zeros((1, 2, 1, 2, 2), np.float32),
            k=np.zeros((1, 1, 2, 2), np.float32),
            v=np.zeros((1, 1, 2, 2), np.float32),
        ),
        "either kv=",
    ),
    "list": (dict(kv=[[1.0]]), "numpy array or a torch tensor"),
    "tokens": (dict(kv=np.zeros((1, 2, 1, 2, 2), np.float32), tokens=[1, 2, 3]), "3 token ids for 2 tokens"),
    "positions": (dict(kv=np.zeros((1, 2, 1, 2, 2), np.float32), positions=[0]), "1 positions for 2 tokens"),
    "meta_twice": (dict(kv=np.zeros((1, 2, 1, 2, 2), np.float32), meta=ka.SegmentMeta(), turn=3), "not both"),
    "model": (dict(kv=np.zeros((1, 2, 1, 2, 2), np.float32), model="abc"), "model must be"),
    "zero_model": (dict(kv=np.zeros((1, 2, 1, 2, 2), np.float32), model=ka.Hash128()), "fingerprint is zero"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_invalid_argument(case):
    kw, msg = BAD[case]
    kw = dict(kw)
    kw.setdefault("tokens", [1, 2])
    kw.setdefault("model", MODEL)
    with pytest.raises(ka.InvalidArgumentError, match=msg):
        Segment(kw.pop("kv", None), **kw)


def test_torch_requires_grad_and_layer_range():
    t = torch.full((1, 2, 1, 2, 2), 3.0, requires_grad=True)
    seg = Segment(t, tokens=[1, 2], model=MODEL)  # read-only import needs no detach()
    assert torch.equal(seg.kv("torch"), t.detach())
    with pytest.raises(ka.OutOfRangeError):
        seg.k(1)
    with pytest.raises(ka.OutOfRangeError):
        seg.v(-2)


def test_layout_and_dtype_grid_sizes_match_reference():
    # nbytes and shapes over a grid, against the plain formula.
    for L, H, T, D in itertools.product((1, 2), (1, 3), (1, 5), (2, 7)):
        for dt, size in ((np.float32, 4), (np.float16, 2)):
            seg = make(np.ones((L, 2, H, T, D), dt))
            assert seg.nbytes == L * 2 * H * T * D * size
            assert seg.k(0).shape == (H, T, D)
            assert seg.layout.nbytes == seg.nbytes
            assert _core.SegmentLayout() == _core.SegmentLayout()
