"""AgentMemory / CacheManager on a tiny random-weight Llama with a byte tokenizer (fp32, CPU)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import kv_agent as ka  # noqa: E402
from kv_agent.api import AgentMemory, CacheManager  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import ByteTokenizer, tiny_llama  # noqa: E402


@pytest.fixture()
def manager(tmp_path):
    torch.set_grad_enabled(False)
    mem = AgentMemory(tmp_path / "mem", backend="cpu", namespace="test")
    cm = CacheManager(engine="hf", model=(tiny_llama(), ByteTokenizer()), memory=mem, session="s1",
                      system_prompt="You remember things.", max_segment_tokens=64)
    yield cm
    mem.close()


def test_gpu_backend_falls_back_with_warning(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.warns(RuntimeWarning, match="falling back"):
        mem = AgentMemory(tmp_path / "m", backend="gpu")
    assert mem.backend == "cpu"
    mem.close()


def test_engines_come_from_the_registry(tmp_path):
    from kv_agent.engines import base as engines

    assert "hf" in engines.names()
    with pytest.raises(ka.InvalidArgumentError, match="unknown engine 'onnx'; available: .*hf"):
        CacheManager(engine="onnx")
    with pytest.raises(ka.InvalidArgumentError, match="unknown option"):
        CacheManager(engine="hf", model=(tiny_llama(), ByteTokenizer()), memory=AgentMemory(":memory:", backend="cpu"),
                     no_such_option=1)
    with pytest.raises(ka.InvalidArgumentError, match="engine must be"):
        CacheManager(engine=42)


def test_store_retrieve_generate(manager):
    cm, mem = manager, manager.memory
    keys = cm.store_kv("My dog is called Biscuit.", "Nice name!")
    keys += cm.store_kv("I live in Lisbon.", "Lovely city.")
    long = "x" * 150  # byte tokenizer: 150+ tokens -> several chunks of 64
    keys += cm.store_kv(long, "ok")
    assert len(keys) == 1 + 1 + 3
    infos = {i.key: i for i in mem.store.list(ns="test")}
    assert all(k in infos for k in keys)
    assert infos[keys[0]].meta.session == "s1" and infos[keys[0]].meta.turn == 1
    assert infos[keys[1]].meta.turn == 2

    hits = mem.retrieve("What is my dog called?", top_k=3)
    assert 1 <= len(hits) <= 3
    for h in hits:
        assert h.text and h.num_tokens > 0 and h.session == "s1"
        kv = h.kv()
        assert kv.shape[:3] == (2, 2, 2) and kv.shape[3] == h.num_tokens
    orders = [(h.time_us, h.turn, h.chunk) for h in hits]
    assert orders == sorted(orders)  # original order

    q = "What is my dog called?"
    ans = cm.generate(q, top_k=2, max_new_tokens=5)
    q_ids = cm._ids(cm.format.query(q))
    assert ans.prefill_tokens == len(q_ids)  # only the query is prefilled
    assert ans.reused_tokens == len(cm.prefix_ids) + sum(h.num_tokens for h in ans.hits)
    assert ans.context_tokens == ans.reused_tokens + ans.prefill_tokens
    assert 0 < ans.ttft_s <= ans.total_s
    assert len(ans.token_ids) <= 5


def test_planned_context_matches_direct_cache(manager):
    """generate() must give the logits of the same KV assembled by hand in the engine."""
    cm = manager
    cm.store_kv("alpha beta gamma", "delta")
    cm.store_kv("one two three", "four")
    q_ids = cm._ids(cm.format.query("which numbers?"))
    hits = cm.retrieve("", top_k=2, query_ids=q_ids)
    ans = cm.answer_ids(q_ids, hits=hits, max_new_tokens=1)
    prefix = cm.memory.store.get(cm.prefix_key, cm.spec.fingerprint).kv("torch")
    parts = [prefix] + [h.kv("torch") for h in sorted(hits, key=lambda h: h.turn)]
    cache = cm.engine.build_cache(torch.cat(parts, dim=3))
    ref = cm.engine.generate_on_cache(q_ids, cache, max_new_tokens=1)
    assert ans.token_ids[:1] == ref.token_ids[:1]


def test_persistence_across_processes(tmp_path):
    torch.set_grad_enabled(False)
    path = tmp_path / "mem"
    mem = AgentMemory(path, backend="cpu", namespace="p")
    cm = CacheManager(model=(tiny_llama(seed=3), ByteTokenizer()), memory=mem, session="yesterday")
    cm.store_kv("The meeting is on Friday.", "Noted.")
    mem.flush()
    mem.close()
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from tiny_models import ByteTokenizer, tiny_llama
        from kv_agent.api import AgentMemory, CacheManager
        torch.set_grad_enabled(False)
        mem = AgentMemory({str(path)!r}, backend="cpu", namespace="p")
        cm = CacheManager(model=(tiny_llama(seed=3), ByteTokenizer()), memory=mem, session="today")
        hits = mem.retrieve("When is the meeting?", top_k=1)
        assert len(hits) == 1 and hits[0].session == "yesterday", hits
        assert "Friday" in hits[0].text, hits[0].text
        ans = cm.generate("When is the meeting?", top_k=1, max_new_tokens=2)
        assert ans.reused_tokens > ans.prefill_tokens
        print("OK", len(mem.index))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "OK 1" in out.stdout


def test_other_model_cannot_reuse_memory(tmp_path):
    torch.set_grad_enabled(False)
    mem = AgentMemory(tmp_path / "mem", backend="cpu")
    cm = CacheManager(model=(tiny_llama(seed=1), ByteTokenizer()), memory=mem)
    cm.store_kv("secret", "ok")
    with pytest.raises(ka.FailedPreconditionError, match="needs its own AgentMemory"):
        CacheManager(model=(tiny_llama(seed=2), ByteTokenizer()), memory=mem)
    key = next(i.key for i in mem.store.list() if i.meta.role == "exchange")
    with pytest.raises(ka.FailedPreconditionError):
        mem.store.get(key, ka.Hash128.of_str("another model"))
    mem.close()
    # A different model on the same path sees none of the first model's segments.
    mem2 = AgentMemory(tmp_path / "mem", backend="cpu")
    CacheManager(model=(tiny_llama(seed=2), ByteTokenizer()), memory=mem2)
    assert len(mem2.index) == 0
    mem2.close()
