"""The README's Python quick start with engine="llama.cpp": the planted fact comes back from
memory and is answered with only the question prefilled."""

from __future__ import annotations

import pytest

from kv_agent import _core

pytestmark = [
    pytest.mark.engine,
    pytest.mark.model,
    pytest.mark.skipif(not hasattr(_core, "LlamaEngine"), reason="kv_agent built without llama.cpp (make llama-cpp)"),
]


def test_readme_quick_start_on_llama_cpp(tmp_path):
    from kv_agent import AgentMemory, CacheManager

    memory = AgentMemory(tmp_path / "memory", backend="cpu")
    try:
        cache_manager = CacheManager(engine="llama.cpp", memory=memory)
        cache_manager.store_kv("My sister Olivia moved to Reykjavik.", "Got it.")
        hits = memory.retrieve("Where does Olivia live?", top_k=5)
        assert any("Reykjavik" in h.text for h in hits)
        answer = cache_manager.generate("Where does Olivia live?")
        assert "reykjavik" in answer.text.lower()
        assert answer.reused_tokens > answer.prefill_tokens > 0
    finally:
        memory.close()
