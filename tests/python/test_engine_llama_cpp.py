"""llama.cpp engine on the default model's GGUF: capture, placement, query vectors, generation.

Exactness is checked against llama.cpp itself: greedy tokens and logits after placing stored
memory equal a full recompute of the same tokens in llama.cpp (to f16/q8_0 cache tolerance).
"""

from __future__ import annotations

import numpy as np
import pytest

from kv_agent import _core
from kv_agent.engines import base
from kv_agent.engines.base import PlannedContext
from kv_agent.errors import FailedPreconditionError, InvalidArgumentError
from kv_agent.store import Segment, Store

pytestmark = [
    pytest.mark.engine,
    pytest.mark.model,
    pytest.mark.skipif(not hasattr(_core, "LlamaEngine"), reason="kv_agent built without llama.cpp (make llama-cpp)"),
]


@pytest.fixture(scope="module")
def eng():
    from kv_agent.engines.llama_cpp import LlamaCppEngine

    e = LlamaCppEngine(context_tokens=4096)
    yield e
    e.close()


@pytest.fixture(scope="module")
def texts():
    prefix = "The following are notes about a family and their hobbies.\n\n"
    turns = [
        "Alice lives in Lisbon and keeps three cats named Olive, Pepper and Miso. " * 3,
        "Her brother Bruno is a carpenter who builds wooden boats in his garage. " * 3,
        "Their mother Carla teaches mathematics and plays the cello on Sundays. " * 3,
    ]
    question = "Question: What does Bruno build?\nAnswer:"
    return prefix, turns, question


def _store_turns(eng, store, pieces):
    """Captures pieces one after another (each after the previous ones), stores them, and returns
    the (key, n) list in order."""
    fp = eng.spec.fingerprint
    items, ctx = [], None
    for i, ids in enumerate(pieces):
        cap = eng.capture(ids, ctx)
        assert list(cap.positions) == list(range(ctx.total_positions if ctx else 0,
                                                 (ctx.total_positions if ctx else 0) + len(ids)))
        seg = Segment(cap.kv, tokens=ids, model=fp, positions=np.asarray(cap.positions), ns="t", session="s",
                      turn=i, role="user", text="")
        store.put(seg)
        items.append((seg.key, len(ids)))
        ctx = PlannedContext.contiguous(items, store, fp)
    return items


def _pieces(eng, texts):
    prefix, turns, question = texts
    first = eng.tokenizer.bos_token_id
    pre = ([first] if first is not None else []) + eng.encode(prefix)
    return [pre] + [eng.encode(t) for t in turns], eng.encode(question)


def test_spec_matches_the_gguf(eng):
    s = eng.spec
    assert eng.architecture == "gemma3"
    assert s.num_layers == len(s.layers) and s.num_kv_heads >= 1 and s.head_dim > 0
    windows = [ls.sliding_window for ls in s.layers]
    assert 0 in windows and max(windows) > 0  # interleaved local/global layers
    assert s.fingerprint != _core.Hash128.from_hex("0" * 32)


def test_fingerprint_is_stable_across_loads(eng):
    from kv_agent.engines.llama_cpp import LlamaCppEngine

    other = LlamaCppEngine(eng.path, context_tokens=512, kv_type="q8_0")
    assert other.spec.fingerprint == eng.spec.fingerprint  # same weights, other context options


def _sequential_recompute(eng, pieces, q, max_new_tokens):
    """The reference: llama.cpp decodes the same pieces one after another in one sequence (the
    same batch boundaries as their captures; llama.cpp's kernels are not batch-invariant), then
    the question, without any placement."""
    n = eng.native
    n.reset()
    for p in pieces:
        n.capture(p)
    return n.generate(q, max_new_tokens, [])


def test_injected_memory_generates_like_full_recompute(eng, texts):
    pieces, q = _pieces(eng, texts)
    store = Store.open(None)
    items = _store_turns(eng, store, pieces)
    ctx = PlannedContext.contiguous(items, store, eng.spec.fingerprint)
    gen = eng.generate(q, ctx, max_new_tokens=12, stop_ids=[])
    assert gen.prefill_tokens == len(q) and gen.reused_tokens == sum(len(p) for p in pieces)
    ref = _sequential_recompute(eng, pieces, q, 12)
    assert ref["prefill_tokens"] == len(q) and ref["context_tokens"] == gen.reused_tokens
    assert gen.token_ids == ref["tokens"]
    assert "boat" in eng.tokenizer.decode(gen.token_ids).lower()

    # Logits after the placed context: against the sequential recompute (f16 round trip of the
    # keys through our un-rotation/rotation only) and against one batch over all tokens.
    eng._place(ctx)
    placed = eng.native.logits(q)
    eng.native.reset()
    for p in pieces:
        eng.native.capture(p)
    sequential = eng.native.logits(q)
    eng.native.reset()
    one_batch = eng.native.logits(sum(pieces, []) + q)
    scale = np.max(np.abs(sequential))
    assert np.max(np.abs(placed - sequential)) < 0.02 * scale
    assert np.corrcoef(placed, one_batch)[0, 1] > 0.995


def test_capture_longer_than_the_window_and_reposition(eng):
    """A span longer than the sliding window (captured in window-sized chunks), placed at other
    positions than it was captured at, still reproduces the recompute at those positions."""
    window = max(ls.sliding_window for ls in eng.spec.layers)
    words = " ".join(f"item{i} is {i * 7 % 13}." for i in range(window // 3 + 40))
    ids = eng.encode(words)
    assert len(ids) > window
    store = Store.open(None)
    fp = eng.spec.fingerprint
    cap = eng.capture(ids, None)
    seg = Segment(cap.kv, tokens=ids, model=fp, positions=np.asarray(cap.positions), ns="t", session="w", turn=0)
    store.put(seg)
    # Recapturing in two parts gives the same KV (chunking does not change what is cached).
    a = eng.capture(ids[:300], None)
    seg_a = Segment(a.kv, tokens=ids[:300], model=fp, ns="t", session="w", turn=1)
    store.put(seg_a)
    b = eng.capture(ids[300:], PlannedContext.contiguous([(seg_a.key, 300)], store, fp))
    joined = np.concatenate([a.kv, b.kv], axis=3).astype(np.float32)
    np.testing.assert_allclose(joined, cap.kv.astype(np.float32), atol=0.05, rtol=0.02)

    tail = eng.encode(" Which item is 5?")
    shift = 37  # place the span at positions 37.. instead of 0..
    ctx = PlannedContext((base.PlannedSegment(seg.key, len(ids), shift),), store, fp)
    eng._place(ctx)
    placed = eng.native.logits(tail)
    eng.native.reset()
    # Attention sees only relative positions: the recompute at 0.. must agree up to RoPE numerics.
    recomputed = eng.native.logits(ids + tail)
    assert np.argmax(placed) == np.argmax(recomputed)
    assert np.corrcoef(placed, recomputed)[0, 1] > 0.995


def test_q8_0_cache_capture_agrees_with_f16(eng, texts):
    from kv_agent.engines.llama_cpp import LlamaCppEngine

    pieces, q = _pieces(eng, texts)
    q8 = LlamaCppEngine(eng.path, context_tokens=1024, kv_type="q8_0")
    ids = sum(pieces, [])
    a = eng.capture(ids).kv.astype(np.float32)
    b = q8.capture(ids).kv.astype(np.float32)
    # q8_0 rounds each cached row (after llama.cpp's Hadamard rotation) and later layers see the
    # rounded context: close, not equal.
    for layer in range(a.shape[0]):
        for kv in (0, 1):
            x, y = a[layer, kv].ravel(), b[layer, kv].ravel()
            assert x @ y / (np.linalg.norm(x) * np.linalg.norm(y)) > 0.99, (layer, kv)
    scale = np.abs(a).max(axis=-1, keepdims=True) + 1e-6
    assert np.max(np.abs(a - b) / scale) < 0.25
    store = Store.open(None)
    items = _store_turns(q8, store, pieces)
    gen = q8.generate(q, PlannedContext.contiguous(items, store, q8.spec.fingerprint), max_new_tokens=8,
                      stop_ids=[])
    assert gen.token_ids == _sequential_recompute(q8, pieces, q, 8)["tokens"]
    assert q8.generate(q, None, max_new_tokens=2).extra["kv_type"] == "q8_0"


def test_query_vectors_in_the_order_asked(eng, texts):
    pieces, q = _pieces(eng, texts)
    store = Store.open(None)
    items = _store_turns(eng, store, pieces[:1])
    ctx = PlannedContext.contiguous(items, store, eng.spec.fingerprint)
    L = eng.spec.num_layers
    a = eng.query_vectors(q, ctx, [L - 1, 0, 3])
    assert a.shape == (3, eng.spec.num_q_heads, len(q), eng.spec.head_dim) and a.dtype == np.float32
    b = eng.query_vectors(q, ctx, [0, 3, L - 1])
    np.testing.assert_array_equal(a[0], b[2])
    np.testing.assert_array_equal(a[1], b[0])
    # Pre-RoPE: the same tokens after a longer context give (nearly) the same first-layer Q.
    c = eng.query_vectors(q, None, [0])
    assert eng.native.next_position == 0  # query tokens leave the context unchanged
    np.testing.assert_allclose(c[0, :, 0], b[0, :, 0], atol=1e-3 * np.abs(c).max())


def test_registry_creates_the_engine(eng):
    assert "llama.cpp" in base.names()
    e = base.create("llamacpp", model=eng.path, context_tokens=256)
    assert e.spec.fingerprint == eng.spec.fingerprint
    assert e.name == "llama.cpp"


def test_bad_inputs_are_rejected_and_change_nothing(eng, texts, tmp_path):
    from kv_agent.engines.llama_cpp import LlamaCppEngine
    from kv_agent.errors import DataLossError, NotFoundError, UnimplementedError

    pieces, q = _pieces(eng, texts)
    fp = eng.spec.fingerprint
    store = Store.open(None)
    items = _store_turns(eng, store, pieces[:2])
    ctx = PlannedContext.contiguous(items, store, fp)
    good = eng.generate(q, ctx, max_new_tokens=4, stop_ids=[]).token_ids

    # A segment from another model: the plan's fingerprint, or the stored segment's.
    other = _core.Hash128.from_hex("0123456789abcdef0123456789abcdef")
    with pytest.raises(FailedPreconditionError):
        eng.generate(q, PlannedContext.contiguous(items, store, other), max_new_tokens=2)
    foreign = Segment(np.zeros_like(eng.capture(pieces[0]).kv), tokens=pieces[0], model=other, ns="t",
                      session="x", turn=0)
    store.put(foreign)
    with pytest.raises(FailedPreconditionError):
        eng.generate(q, PlannedContext.contiguous([(foreign.key, len(pieces[0]))], store, fp), max_new_tokens=2)

    with pytest.raises(InvalidArgumentError):
        eng.generate([eng.spec.num_layers, -5], ctx, max_new_tokens=2)  # token id outside the vocabulary
    with pytest.raises(InvalidArgumentError):
        eng.generate(q, ctx, max_new_tokens=0)
    with pytest.raises(InvalidArgumentError):
        eng.query_vectors(q, ctx, [eng.spec.num_layers])
    with pytest.raises(InvalidArgumentError):
        eng.capture([], ctx)
    with pytest.raises(InvalidArgumentError):
        eng.native.place_context(np.zeros((1, 2, 1, 3, 4), np.float32), np.arange(3, dtype=np.int64))
    kv = eng.capture(pieces[0]).kv.astype(np.float32)
    with pytest.raises(InvalidArgumentError):
        eng.native.place_context(kv, np.zeros(len(pieces[0]), dtype=np.int64))  # not increasing
    with pytest.raises(InvalidArgumentError):
        eng.capture(list(range(10)) * 500, ctx)  # beyond the context capacity
    assert eng.generate(q, ctx, max_new_tokens=4, stop_ids=[]).token_ids == good

    # Files that are not a supported model.
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    w.add_block_count(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnimplementedError, match="'mamba' is not supported"):
        LlamaCppEngine(tmp_path / "mamba.gguf")
    with pytest.raises(NotFoundError):
        LlamaCppEngine(tmp_path / "absent.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(DataLossError):
        LlamaCppEngine(tmp_path / "junk.gguf")
    with pytest.raises(InvalidArgumentError):
        LlamaCppEngine(tmp_path)
    with pytest.raises(InvalidArgumentError):
        LlamaCppEngine(eng.path, kv_type="q4_0")
