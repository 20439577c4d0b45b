"""End to end on the real default model (Gemma 3 270M from PyPI): planted facts among distractor
sessions are retrieved from KV memory and answered, while the same question without memory is
not; only the question's tokens are prefilled."""

from __future__ import annotations

import random

import pytest

pytestmark = pytest.mark.model

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from kv_agent.api import AgentMemory, CacheManager  # noqa: E402

FACTS = [
    ("My sister Olivia moved to Reykjavik last spring.", "Where does my sister Olivia live?", "reykjavik"),
    ("The wifi password at our cabin is bluefalcon42.", "What is the wifi password at our cabin?", "bluefalcon"),
    ("I adopted a parrot and named him Captain Mango.", "What is the name of my parrot?", "mango"),
]

_TOPICS = ["the weather", "a new recipe", "weekend plans", "a football match", "the traffic", "a podcast",
           "gardening", "a board game", "the news", "running shoes", "a museum visit", "coffee", "a bike ride",
           "a birthday party", "the office", "a movie", "laundry", "a concert", "grocery prices", "a train delay"]


def distractor_sessions(n: int, seed: int = 7):
    rng = random.Random(seed)
    for i in range(n):
        topic = _TOPICS[i % len(_TOPICS)]
        yield f"d{i}", [
            (f"Let's talk about {topic} today.", f"Sure, what about {topic}?"),
            (f"I think {topic} was {rng.choice(['fine', 'boring', 'great', 'odd'])} this week.", "I see, thanks."),
        ]


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    from kv_agent.models import load_default_model

    torch.set_grad_enabled(False)
    model, tok = load_default_model()
    mem = AgentMemory(tmp_path_factory.mktemp("mem"), backend="cpu", namespace="e2e")
    cm = CacheManager(model=(model, tok), memory=mem, session="s0",
                      system_prompt="Notes from earlier conversations with the user.")
    sessions = list(distractor_sessions(20))
    for i, (fact, _, _) in enumerate(FACTS):  # facts early, in between distractors
        sessions.insert(2 * i, (f"fact{i}", [(fact, "Got it, I will remember that.")]))
    for name, turns in sessions:
        for user, assistant in turns:
            cm.store_kv(user, assistant, session=name)
    yield cm
    mem.close()


@pytest.mark.parametrize("fact_index", range(len(FACTS)))
def test_planted_fact_is_retrieved_and_answered(manager, fact_index):
    cm = manager
    fact, question, keyword = FACTS[fact_index]
    hits = cm.memory.retrieve(question, top_k=5)
    assert any(keyword in h.text.lower() for h in hits), [h.text for h in hits]
    ans = cm.generate(question, top_k=3, max_new_tokens=16)
    assert keyword in ans.text.lower(), ans.text
    # Prefill accounting: only the question is prefilled; the rest is reused KV.
    q_ids = cm._ids(cm.format.query(question))
    assert ans.prefill_tokens == len(q_ids)
    assert ans.reused_tokens == len(cm.prefix_ids) + sum(h.num_tokens for h in ans.hits)
    # Without memory the model cannot know the fact.
    bare = cm.engine.generate_on_cache(cm.prefix_ids + q_ids, max_new_tokens=16, eos_ids=cm._stop_ids)
    bare_text = cm.tokenizer.decode(bare.token_ids, skip_special_tokens=True).lower()
    assert keyword not in bare_text, bare_text
