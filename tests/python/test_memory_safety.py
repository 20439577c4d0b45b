"""Memory that cannot be silently lost: a version-stable model fingerprint (and stores written under
the old one keep working), turn numbers allocated by the memory, all-or-nothing writes, the
explicit manager <-> memory wiring, and bad input through the Python API (a KvAgentError, the
store unchanged). Tiny random-weight models, fp32, CPU."""

from __future__ import annotations

import gc
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import kv_agent as ka  # noqa: E402
from kv_agent.api import AgentMemory, CacheManager  # noqa: E402
from kv_agent.engines.hf import HFEngine, UnsupportedModelError  # noqa: E402
from kv_agent.index import summarize  # noqa: E402
from kv_agent.store import Segment  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import ByteTokenizer, tiny_llama  # noqa: E402

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def model():
    torch.set_grad_enabled(False)
    return tiny_llama(seed=21)


@pytest.fixture()
def cm(model):
    mem = AgentMemory(":memory:", backend="cpu", namespace="t")
    manager = CacheManager(model=(model, ByteTokenizer()), memory=mem, session="a", max_segment_tokens=32)
    yield manager
    mem.close()


def _snapshot(mem):
    """Everything a write could change: keys, their turn/text/bytes, the index size."""
    rows = sorted((i.key.hex(), i.meta.session, i.meta.turn, i.meta.chunk, i.meta.text, i.payload_bytes)
                  for i in mem.store.list())
    return rows, len(mem.index)


# ---------------------------------------------------------------- fingerprint
def test_fingerprint_ignores_library_versions_but_not_attention_config(model):
    fp = HFEngine(model).weights_fingerprint()
    saved = model.config.transformers_version
    try:
        model.config.transformers_version = "9.99.0"  # what an upgrade of transformers changes
        assert HFEngine(model).weights_fingerprint() == fp
    finally:
        model.config.transformers_version = saved
    other = tiny_llama(seed=21)
    other.config.rms_norm_eps = 1e-3  # same weights, other numerics: other KV
    assert HFEngine(other).weights_fingerprint() != fp


def test_store_written_under_the_old_fingerprint_keeps_working(tmp_path):
    """A store written by kv-agent before the fingerprint became version-stable (checked in, see
    data/legacy_fingerprint_store/written_by.json) is migrated when a manager attaches."""
    import transformers

    info = json.loads((DATA / "legacy_fingerprint_store" / "written_by.json").read_text())
    path = tmp_path / "store"
    shutil.copytree(DATA / "legacy_fingerprint_store" / "store", path)
    eng = HFEngine(tiny_llama(seed=5), ByteTokenizer())
    if eng.legacy_fingerprint().hex() != info["fingerprint"]:
        # The old fingerprint hashed the installed transformers version's config JSON: it can only
        # be recognised under the version that wrote it (docs/engine-hf.md, "Fingerprint").
        assert transformers.__version__ != info["transformers_version"]
        pytest.skip(f"store written under transformers {info['transformers_version']}, "
                    f"{transformers.__version__} installed")
    assert eng.weights_fingerprint().hex() != info["fingerprint"]
    mem = AgentMemory(path, backend="cpu", namespace=info["namespace"])
    old_keys = {ka.Hash128.from_hex(k) for k in info["keys"]}
    cm = CacheManager(eng, memory=mem, session=info["session"], system_prompt=info["system_prompt"])
    infos = {i.key: i for i in mem.store.list()}
    assert old_keys <= set(infos)
    assert all(i.model == eng.weights_fingerprint() for i in infos.values())
    assert ka.Hash128.from_hex(info["prefix_key"]) not in infos  # re-keyed with the new fingerprint
    assert cm.prefix_key in infos and len(mem.index) == len(old_keys)
    hits = mem.retrieve("Where do I live?", top_k=2)
    assert {h.key for h in hits} == old_keys and any("Lisbon" in h.text for h in hits)
    ans = cm.generate("Where do I live?", top_k=2, max_new_tokens=2)
    assert ans.reused_tokens == len(cm.prefix_ids) + sum(h.num_tokens for h in hits)
    assert cm.store_kv("New fact.", "ok")[0] not in old_keys  # turn 3, not an overwrite
    assert max(i.meta.turn for i in mem.store.list(session=info["session"])) == 3
    mem.close()


# ---------------------------------------------------------------- turns and atomic writes
def test_session_switch_never_reuses_a_stored_turn(cm):
    """`kvagent chat`'s /session switch assigns cm.session; the next turn must come after the
    turns that session already has, whichever manager wrote them."""
    mem = cm.memory
    first = [cm.store_kv(f"fact {i}", "ok")[0] for i in range(3)]  # session a: turns 1..3
    other = CacheManager(model=cm.engine, memory=mem, session="b")
    other.store_kv("in b", "ok")
    other.session = "a"
    key = other.store_kv("later in a", "ok")[0]
    turns = {i.key: (i.meta.session, i.meta.turn, i.meta.text) for i in mem.store.list()}
    assert turns[key][:2] == ("a", 4)
    assert [turns[k][1] for k in first] == [1, 2, 3] and "fact 0" in turns[first[0]][2]
    # Two managers writing the same session interleave without a collision.
    k1 = cm.store_kv("x", "y")[0]
    k2 = other.store_kv("z", "w")[0]
    assert (turns := {i.key: i.meta.turn for i in mem.store.list()}) and turns[k1] == 5 and turns[k2] == 6


def test_explicit_turn_that_exists_is_refused_not_overwritten(cm):
    cm.store_kv("original", "ok", turn=7)
    before = _snapshot(cm.memory)
    with pytest.raises(ka.AlreadyExistsError):
        cm.store_kv("replacement", "ok", turn=7)
    assert _snapshot(cm.memory) == before
    seg = cm.memory.store.get(ka.memory_key("t", "a", 7, 0), cm.spec.fingerprint)
    with pytest.raises(ka.AlreadyExistsError):
        cm.memory.add_segment(seg)
    assert cm.store_kv("next", "ok")[0] == ka.memory_key("t", "a", 8, 0)


def test_failed_index_add_rolls_the_store_back(cm):
    """The index rejects a summary without its layers: nothing of the write may stay."""
    mem = cm.memory
    cm.store_kv("kept", "ok")
    before = _snapshot(mem)
    kv = cm.engine.capture(list(range(40, 50)), cm.prefix_context).kv
    good = Segment(kv, tokens=list(range(40, 50)), model=cm.spec.fingerprint, ns="t", session="a", turn=50, chunk=0,
                   summary=summarize(kv[:, 0]))
    bad = Segment(kv, tokens=list(range(40, 50)), model=cm.spec.fingerprint, ns="t", session="a", turn=50, chunk=1,
                  summary=summarize(kv[:, 0], layers=[0]))  # the index scores more layers than layer 0
    assert mem.index.layers != [0]
    with pytest.raises(ka.InvalidArgumentError):
        mem.add_segments([good, bad])
    assert _snapshot(mem) == before
    assert not mem.store.contains(good.key) and good.key not in mem.index
    with pytest.raises(ka.InvalidArgumentError):
        mem.add_segment(bad)
    assert _snapshot(mem) == before


# ---------------------------------------------------------------- wiring
def test_wiring_is_explicit_and_never_uses_a_closed_memory(tmp_path, model, monkeypatch):
    monkeypatch.setenv("KVAGENT_HOME", str(tmp_path / "home"))
    gc.collect()
    for m in AgentMemory.open_memories():  # memories other tests left for the garbage collector
        m.close()
    pair = (model, ByteTokenizer())
    closed = AgentMemory(":memory:", backend="cpu")
    closed.close()
    with pytest.raises(ka.FailedPreconditionError, match="closed"):
        CacheManager(model=pair, memory=closed)
    # No open memory: a default one (under KVAGENT_HOME), never the closed one.
    cm0 = CacheManager(model=pair)
    assert cm0.memory is not closed and cm0.memory.path == tmp_path / "home" / "memory"
    cm0.memory.close()
    only = AgentMemory(":memory:", backend="cpu")
    assert CacheManager(model=pair).memory is only  # the README quick start
    second = AgentMemory(":memory:", backend="cpu")
    with pytest.raises(ka.InvalidArgumentError, match="2 AgentMemory objects are open; pass memory="):
        CacheManager(model=pair)
    only.close()
    assert CacheManager(model=pair).memory is second
    with pytest.raises(ka.FailedPreconditionError):
        only.attach(CacheManager(model=pair, memory=second))
    second.close()


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("text, match", [
    ("", "no tokens"),
    (b"bytes", "must be a str"),
    (None, "must be a str"),
    ("lone surrogate \ud800", "not valid Unicode"),
])
def test_bad_texts_are_refused_and_change_nothing(cm, text, match):
    before = _snapshot(cm.memory)
    with pytest.raises(ka.InvalidArgumentError, match=match):
        cm.store_text(text)
    assert _snapshot(cm.memory) == before


def test_huge_text_is_refused_before_any_work(cm):
    before = _snapshot(cm.memory)
    limit = cm.engine.max_context_tokens
    with pytest.raises(ka.InvalidArgumentError, match="exceed the model's context"):
        cm.store_text("x" * limit)
    with pytest.raises(ka.InvalidArgumentError, match="exceed the model's context"):
        cm.generate("y" * limit)
    assert _snapshot(cm.memory) == before


def test_unicode_edge_cases_round_trip(cm):
    texts = ["emoji 👩‍👩‍👧 and flags 🇵🇹", "e\u0301 combining, zero\u200bwidth, RTL \u05e9\u05dc\u05d5\u05dd",
             "NUL \x00 inside", "\ufeffBOM first", "\U0010ffff last plane"]
    for t in texts:
        keys = cm.store_text(t)  # chunks of 32 byte tokens may cut a character: compare the tokens
        tokens = [int(x) for k in keys for x in cm.memory.store.get(k, cm.spec.fingerprint).tokens]
        assert cm.tokenizer.decode(tokens) == t
        if len(keys) == 1:
            assert cm.memory.store.info(keys[0]).meta.text == t


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_kv_is_refused(cm, bad):
    kv = cm.engine.capture([50, 51, 52], cm.prefix_context).kv.clone()
    kv[0, 1, 0, 1, 3] = float(bad)  # a value, so the summary (of keys) is still finite
    seg = Segment(kv, tokens=[50, 51, 52], model=cm.spec.fingerprint, ns="t", session="a", turn=99,
                  summary=summarize(kv[:, 0]))
    before = _snapshot(cm.memory)
    with pytest.raises(ka.InvalidArgumentError, match="NaN or infinite"):
        cm.memory.add_segment(seg)
    assert _snapshot(cm.memory) == before


def test_wrong_dtype_shape_device_and_model(cm, tmp_path):
    eng = cm.engine
    with pytest.raises(ka.InvalidArgumentError, match="integers"):
        eng.capture([1.5, 2.0])
    with pytest.raises(ka.InvalidArgumentError, match=r"must be in \[0, 259\)"):
        eng.generate([1000], cm.prefix_context)
    with pytest.raises(ka.InvalidArgumentError, match="dtype"):
        eng.build_cache(torch.zeros(2, 2, 2, 3, 16, dtype=torch.int32))
    with pytest.raises(ka.InvalidArgumentError, match="kv must be"):
        eng.build_cache(np.zeros((3, 2, 2, 4, 16), np.float32))
    with pytest.raises(ka.InvalidArgumentError, match="device"):
        eng.build_cache(torch.zeros(2, 2, 2, 3, 16, device="meta"))
    with pytest.raises(ka.InvalidArgumentError):
        cm.answer_ids([])
    with pytest.raises(ka.InvalidArgumentError):
        cm.generate("q", max_new_tokens=0)
    with pytest.raises(ka.InvalidArgumentError):
        cm.retrieve("q", top_k=-1)
    # A segment of another shape stored under this model's fingerprint is refused at placement.
    from kv_agent.engines.base import PlannedContext

    odd = Segment(np.zeros((1, 2, 2, 4, 16), np.float32), tokens=[1, 2, 3, 4], model=cm.spec.fingerprint,
                  key=ka.Hash128.of_str("odd"))
    cm.memory.store.put(odd)
    ctx = PlannedContext.contiguous([(odd.key, 4)], cm.memory.store, cm.spec.fingerprint)
    with pytest.raises(ka.InvalidArgumentError, match="layers=2"):
        eng.generate([5], ctx)
    # Another model's segment: the store refuses it.
    other = PlannedContext.contiguous([(cm.prefix_key, len(cm.prefix_ids))], cm.memory.store,
                                      ka.Hash128.of_str("another model"))
    with pytest.raises(ka.FailedPreconditionError):
        eng.generate([5], other)
    with pytest.raises(ka.InvalidArgumentError, match="not a local model directory"):
        CacheManager(model=str(tmp_path / "nowhere"), memory=cm.memory)
    from transformers import AutoModelForCausalLM, GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedModelError) as e:
        CacheManager(model=(gpt2, ByteTokenizer()), memory=cm.memory)
    assert isinstance(e.value, ka.KvAgentError) and isinstance(e.value, ValueError)
