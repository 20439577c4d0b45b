"""The engine interface as the transformers adapter implements it (tiny random models, fp32, CPU):
planned contexts loaded from the store by the adapter, the placement cache, query vectors in the
order asked for, and retrieval through AgentMemory with a reversed index layer list."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import kv_agent as ka  # noqa: E402
from kv_agent.api import AgentMemory, CacheManager  # noqa: E402
from kv_agent.engines import base as engines  # noqa: E402
from kv_agent.engines.hf import HFEngine  # noqa: E402
from kv_agent.index import IndexOptions  # noqa: E402
from kv_agent.store import Segment, Store  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import ByteTokenizer, tiny_llama  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def eng():
    torch.set_grad_enabled(False)
    return HFEngine(tiny_llama(seed=7, layers=3), ByteTokenizer())


def _put(store, eng, ids, key_text, positions):
    cap, _ = eng.capture_on_cache(ids, start=int(positions[0]))
    key = ka.Hash128.of_str(key_text)
    store.put(Segment(cap.kv, tokens=list(ids), model=eng.spec.fingerprint, key=key, positions=list(positions)))
    return key, cap


def test_registry_creates_the_hf_adapter(eng):
    assert isinstance(eng, engines.Engine) and eng.name == "hf"
    assert engines.create("hf", model=eng) is eng
    assert engines.create("transformers", model=eng) is eng
    with pytest.raises(ka.InvalidArgumentError, match="transformers causal LM"):
        engines.create("hf", model=object())


def test_capture_after_a_planned_context_equals_capture_on_the_cache(eng):
    store = Store.open(None)
    prefix = list(range(3, 12))
    pkey, pcap = _put(store, eng, prefix, "prefix", range(len(prefix)))
    ctx = engines.PlannedContext.contiguous([(pkey, len(prefix))], store, eng.spec.fingerprint)
    turn = list(range(40, 55))
    got = eng.capture(turn, ctx)
    want, _ = eng.capture_on_cache(turn, cache=eng.build_cache(pcap.kv))
    assert isinstance(got, engines.Capture) and got.token_ids == turn
    assert torch.equal(torch.as_tensor(got.positions), torch.arange(len(prefix), len(prefix) + len(turn)))
    assert (got.kv - want.kv).abs().max() <= TOL
    # The prefix's placed form is cached: a second capture neither re-reads nor re-rotates it,
    # and the cached tensors are not changed by the forwards that used them.
    assert len(eng._placed) >= 1
    again = eng.capture(turn, ctx)
    assert torch.equal(again.kv, got.kv)
    other = eng.capture(list(range(60, 70)), ctx)
    want_other, _ = eng.capture_on_cache(list(range(60, 70)), cache=eng.build_cache(pcap.kv))
    assert (other.kv - want_other.kv).abs().max() <= TOL
    store.close()


def test_placement_cache_notices_a_key_restored_with_other_content(eng):
    store = Store.open(None)
    key, _ = _put(store, eng, [5, 6, 7, 8], "ctx", range(4))
    ctx = engines.PlannedContext.contiguous([(key, 4)], store, eng.spec.fingerprint)
    first = eng.capture([30, 31], ctx).kv
    store.delete(key)
    _put(store, eng, [9, 9, 9, 9], "ctx", range(4))
    second = eng.capture([30, 31], ctx).kv
    want, _ = eng.capture_on_cache([30, 31], cache=eng.build_cache(store.get(key, eng.spec.fingerprint).kv("torch")))
    assert (second - want.kv).abs().max() <= TOL
    assert (second - first).abs().max() > 1e-3
    store.close()


def test_generate_from_a_plan_places_segments_at_their_planned_positions(eng):
    store = Store.open(None)
    prefix, seg, query = list(range(3, 10)), list(range(20, 32)), list(range(50, 54))
    pkey, pcap = _put(store, eng, prefix, "p", range(7))
    skey, scap = _put(store, eng, seg, "s", range(100, 112))  # encoded elsewhere; placed at 7..18
    ctx = engines.PlannedContext.contiguous([(pkey, 7), (skey, 12)], store, eng.spec.fingerprint)
    gen = eng.generate(query, ctx, max_new_tokens=3, stop_ids=[])
    ref = eng.generate_on_cache(query, eng.build_cache(torch.cat([pcap.kv, scap.kv], dim=3)), max_new_tokens=3,
                                eos_ids=[])
    assert gen.token_ids == ref.token_ids
    assert (gen.extra["first_logits"] - ref.first_logits).abs().max() <= TOL
    assert gen.prefill_tokens == 4 and gen.reused_tokens == 19 and 0 <= gen.load_s <= gen.ttft_s <= gen.total_s
    gap = engines.PlannedContext((engines.PlannedSegment(pkey, 7, 0), engines.PlannedSegment(skey, 12, 9)), store,
                                 eng.spec.fingerprint)
    with pytest.raises(ka.InvalidArgumentError, match="contiguous"):
        eng.generate(query, gap)
    wrong_n = engines.PlannedContext.contiguous([(pkey, 6)], store, eng.spec.fingerprint)
    with pytest.raises(ka.InvalidArgumentError, match="holds 7 tokens"):
        eng.generate(query, wrong_n)
    store.close()


def test_query_vectors_come_in_the_order_asked(eng):
    q = list(range(70, 76))
    fwd = eng.query_vectors(q, None, [0, 2])
    rev = eng.query_vectors(q, None, [2, 0])
    assert fwd.shape == (2, eng.num_q_heads, 6, eng.head_dim) and fwd.dtype == torch.float32
    assert torch.equal(rev[0], fwd[1]) and torch.equal(rev[1], fwd[0])
    with pytest.raises(ka.InvalidArgumentError):
        eng.query_vectors(q, None, [3])
    with pytest.raises(ka.InvalidArgumentError):
        eng.query_vectors(q, None, [])


def test_reversed_index_layers_retrieve_like_sorted_ones():
    """IndexOptions(layers=[2, 0]) must score exactly as [0, 2]: the manager stacks the query's
    vectors in the index's order (it used to sort them, pairing layer 2's queries with layer 0's keys)."""
    torch.set_grad_enabled(False)
    model = tiny_llama(seed=11, layers=3)
    facts = ["My dog is called Biscuit.", "I live in Lisbon.", "The meeting is on Friday.",
             "My sister plays the cello.", "Our car is a red Volvo.", "I was born in 1990."]
    results = {}
    for name, layers in (("sorted", [0, 2]), ("reversed", [2, 0])):
        mem = AgentMemory(":memory:", backend="cpu", index_options=IndexOptions(layers=layers, score="bbox"))
        cm = CacheManager(model=(model, ByteTokenizer()), memory=mem, session="s")
        for f in facts:
            cm.store_kv(f, "ok")
        assert mem.index.layers == layers
        results[name] = [[(h.turn, round(h.score, 5)) for h in mem.retrieve(q, top_k=3)]
                         for q in ("What is my dog called?", "Where do I live?", "What car do we have?")]
        mem.close()
    assert results["sorted"] == results["reversed"]
