"""Latent-space retrieval over compressed keys (the C++ LatentIndex).

A segment's pre-RoPE keys ``[L, H_kv, T, D]`` are summarised (per layer and KV head: the
per-dimension min/max bounding box and the mean key) into bytes with :func:`summarize`; the
bytes are what ``Segment.summary`` stores. :class:`LatentIndex` keeps many summaries in RAM and
scores a new query's pre-RoPE Q vectors ``[L_sel, H_q, T_q, D]`` (for the index's layers, in
``index.layers`` order) against them. See docs/retrieval.md for the math and the defaults.

Arrays may be numpy arrays or CPU torch tensors of float32, float16 or bfloat16 (torch); they are
made C-contiguous here and cross to C++ without a further copy. Search releases the GIL.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kv_agent import _core
from kv_agent._core import Hash128, IndexHit, ModelSpec
from kv_agent.errors import InvalidArgumentError

__all__ = ["Hit", "IndexOptions", "LatentIndex", "default_layers", "summarize", "summary_info"]

Hit = IndexHit
"""One retrieved segment: ``key, score, rank, pinned, ns, agent, session, turn, chunk, time_us,
num_tokens`` and ``breakdown`` (dict: ``layers, per_layer, per_kv_head, per_chunk, chunk_tokens,
top_votes``)."""


def _as_array(x: Any, what: str) -> Any:
    """A C-contiguous CPU array (numpy or torch) that nanobind can take without copying."""
    mod = type(x).__module__
    if mod.startswith("torch"):
        if x.device.type != "cpu":
            raise InvalidArgumentError(f"{what}: torch tensor must be on the CPU (got {x.device})")
        return x.detach().contiguous()
    import numpy as np

    if not isinstance(x, np.ndarray):
        raise InvalidArgumentError(f"{what}: expected a numpy array or torch tensor, got {type(x).__name__}")
    return np.ascontiguousarray(x)


def summarize(keys: Any, layers: Sequence[int] | None = None, *, dtype: str = "f16",
              token_layers: Sequence[int] | None = None, token_mask: Sequence[bool] | None = None) -> bytes:
    """Compressed keys of one segment.

    keys: ``[L, H_kv, T, D]`` pre-RoPE keys of every model layer (f32/f16/bf16).
    layers: model layer indices to keep (``None`` = all ``L``); the index's layers must be among them.
    dtype: ``"f16"`` (default: half the bytes; min rounded down and max up so the box still
    bounds every key) or ``"f32"``.
    token_layers: layers whose per-token keys are kept too (needed by ``score="tokens"`` indexes);
    token_mask: which tokens' keys to keep (``T`` booleans; ``None`` = all), e.g. to leave out
    chat-template tokens. The box and the mean always cover every token.
    Raises InvalidArgumentError on a wrong rank, dtype, layer list, mask or non-finite keys.
    """
    arr = _as_array(keys, "keys")
    return _core.index_summarize(arr, None if layers is None else [int(i) for i in layers], dtype,
                                 None if token_layers is None else [int(i) for i in token_layers],
                                 None if token_mask is None else [1 if b else 0 for b in token_mask])


def summary_info(summary: bytes) -> dict:
    """Decodes summary bytes (DataLossError if corrupt): layers, geometry, flat min/max/mean lists."""
    return _core.index_summary_info(summary)


def default_layers(num_layers: int, count: int = 8) -> list[int]:
    """The layers an index scores by default: up to ``count`` evenly spaced layers."""
    return _core.index_default_layers(num_layers, count)


@dataclass
class IndexOptions:
    """Scoring options (fixed when the index is made).

    score: ``"bbox"`` (bounding-box upper bound), ``"mean"`` (mean-key dot product) or ``"tokens"``
        (token-level attention of retrieval heads over every stored token of the candidates; needs
        summaries made with ``token_layers`` covering the index layers; see docs/retrieval.md).
    heads: ``score="tokens"``: ``(layer, q_head, weight)`` of the heads that vote (``None`` = every
        query head of the index layers, weight 1).
    rope_marginal: ``score="tokens"``: ``(min, max)`` distance range over which each RoPE frequency
        pair of the query is weighted by its mean ``cos(omega * delta)`` (``None`` = plain pre-RoPE).
    norm: per-(layer, head, query chunk) normalisation across segments: ``"softmax"``, ``"zscore"``, ``"none"``.
    agg: aggregation of a segment's votes: ``"mean"``, ``"max"``, ``"top_p"`` (mean of the top
        ``top_p`` fraction).
    head_reduce: GQA: ``"mean_query"`` (average the group's queries first), ``"mean_score"``, ``"max_score"``.
    layers: model layers scored (``None`` = :func:`default_layers`).
    token_chunks: query tokens averaged into this many chunks (0 = every token votes).
    storage: in-memory matrix dtype ``"f16"`` or ``"f32"``.
    num_threads: scoring threads (0 = all cores).

    Two-stage search (approximate, for large indexes; docs/retrieval.md "Two-stage search"): when a
    search has more than ``prefilter_min_segments`` candidates (and ``top_k > 0``), a cheap proxy
    (the query pooled to one vector per layer and KV head, dotted with the mean keys of
    ``prefilter_layers`` of the index's layers, z-scored and summed) keeps the best
    ``max(prefilter_keep, 32 * top_k)`` candidates plus the pinned ones; those, and
    ``prefilter_sample`` others that estimate the normalisation over all candidates, are scored
    exactly. Any of the first three set to 0 disables it (exact brute force always);
    ``search(exact=True)`` bypasses it for one search.

    device: where searches run (docs/retrieval.md "Device search"). ``-1`` (default): the CPU.
        ``N >= 0``: CUDA device ``N`` keeps a mirror of the scoring matrix (updated as segments are
        added and removed) and searches run there as the exact brute force (the prefilter options
        apply to CPU searches only); results match the CPU brute force within float rounding.
        Needs a CUDA build of kv_agent and a usable device: otherwise ``LatentIndex(...)`` raises
        UnavailableError (there is no silent CPU fallback); ``agg="top_p"`` raises
        UnimplementedError. ``"auto"`` (or -2): device 0 when usable (and ``agg`` is not ``"top_p"``), else
        the CPU; ``LatentIndex.device`` tells which.
    """

    score: str = "mean"
    norm: str = "softmax"
    agg: str = "max"
    head_reduce: str = "mean_query"
    layers: Sequence[int] | None = None
    token_chunks: int = 0
    top_p: float = 0.25
    storage: str = "f16"
    num_threads: int = 0
    prefilter_min_segments: int = 20000
    prefilter_keep: int = 2048
    prefilter_layers: int = 2
    prefilter_sample: int = 1024
    device: int | str = -1
    heads: Sequence[tuple[int, int, float]] | None = None
    rope_marginal: tuple[int, int] | None = None


_AUTO_DEVICE = -2  # kvagent::kAutoDevice


def _device_ordinal(device: int | str) -> int:
    if device == "auto":
        return _AUTO_DEVICE
    if isinstance(device, str) and device.startswith("cuda"):
        # "cuda" / "cuda:N", as torch spells devices
        return int(device.partition(":")[2] or 0)
    if device == "cpu":
        return -1
    if isinstance(device, bool) or not isinstance(device, int) or device < _AUTO_DEVICE:
        raise InvalidArgumentError(
            f"device must be -1 (CPU), -2 (auto), a CUDA ordinal >= 0, 'cpu', 'cuda[:N]' or 'auto' (got {device!r})"
        )
    return device


class LatentIndex:
    """In-memory index of segment summaries; thread-safe (searches run concurrently)."""

    def __init__(self, spec: ModelSpec, options: IndexOptions | None = None):
        self.options = options if options is not None else IndexOptions()
        o = self.options
        self.spec = spec
        self._idx = _core._LatentIndex.create(
            spec,
            o.score,
            o.norm,
            o.agg,
            o.head_reduce,
            None if o.layers is None else [int(i) for i in o.layers],
            int(o.token_chunks),
            float(o.top_p),
            o.storage,
            int(o.num_threads),
            int(o.prefilter_min_segments),
            int(o.prefilter_keep),
            int(o.prefilter_layers),
            int(o.prefilter_sample),
            _device_ordinal(o.device),
            [(int(layer), int(h), float(w)) for layer, h, w in (o.heads or [])],
            int(o.rope_marginal[0]) if o.rope_marginal else 0,
            int(o.rope_marginal[1]) if o.rope_marginal else 0,
        )

    @property
    def device(self) -> int:
        """CUDA device searches run on, or -1 for the CPU (``device="auto"`` resolved)."""
        return self._idx.device

    def device_memory_bytes(self) -> int:
        """Device bytes this index holds (row mirror and search workspace; 0 on the CPU)."""
        return self._idx.device_memory_bytes()

    @property
    def layers(self) -> list[int]:
        """Model layers scored, in the order of the query's first axis."""
        return self._idx.layers

    def add(
        self,
        key: Hash128,
        summary: bytes,
        *,
        ns: str = "",
        agent: str = "",
        session: str = "",
        turn: int = 0,
        chunk: int = 0,
        time_us: int = 0,
        num_tokens: int,
        pinned: bool = False,
    ) -> None:
        """Indexes a segment. AlreadyExistsError if ``key`` is present; InvalidArgumentError if the
        summary does not fit the model or lacks an indexed layer; DataLossError on corrupt bytes."""
        self._idx.add(key, bytes(summary), ns, agent, session, turn, chunk, time_us, num_tokens, pinned)

    def remove(self, key: Hash128) -> None:
        """NotFoundError if absent."""
        self._idx.remove(key)

    def set_pinned(self, key: Hash128, pinned: bool = True) -> None:
        self._idx.set_pinned(key, pinned)

    def __contains__(self, key: Hash128) -> bool:
        return self._idx.contains(key)

    def __len__(self) -> int:
        return self._idx.size()

    def memory_bytes(self) -> int:
        return self._idx.memory_bytes()

    def row_bytes(self) -> int:
        """Bytes of the scoring matrix per segment."""
        return self._idx.row_bytes()

    def token_key_bytes(self) -> int:
        """Bytes of per-token keys held for ``score="tokens"`` (0 for other kinds)."""
        return self._idx.token_key_bytes()

    def set_null_query(self, q: Any | None) -> None:
        """``score="tokens"``: the content-free query ``[len(self.layers), H_q, T, D]`` whose score
        is subtracted from every candidate's (``None`` clears it)."""
        self._idx.set_null_query(None if q is None else _as_array(q, "q"))

    @property
    def has_null_query(self) -> bool:
        return self._idx.has_null_query

    def prefilter_row_bytes(self) -> int:
        """Bytes of the two-stage search's proxy rows per segment (0 when it is disabled)."""
        return self._idx.prefilter_row_bytes()

    def search(
        self,
        q: Any,
        *,
        top_k: int = 5,
        token_budget: int | None = None,
        pinned: Iterable[Hash128] = (),
        ns: str | None = None,
        agent: str | None = None,
        session: str | None = None,
        min_time_us: int | None = None,
        max_time_us: int | None = None,
        explain: bool = True,
        exact: bool = False,
        backend: str = "index",
    ) -> list[Hit]:
        """Top segments for pre-RoPE queries ``q`` ``[len(self.layers), H_q, T_q, D]``.

        Pinned segments (flag at add, or listed here) are always returned when they are in
        namespace ``ns``; their tokens count against ``token_budget``. ``top_k`` bounds the other
        hits (0 = no bound). Hits come in original order (time, session, turn, chunk); ``rank``
        orders them by score. ``exact=True`` scores every candidate (brute force) even where the
        options enable the two-stage search. ``backend``: ``"index"`` (where the index's ``device``
        says), ``"cpu"`` (force the CPU path) or ``"device"`` (UnavailableError when the index has
        no device). Raises InvalidArgumentError on a wrong shape or dtype.
        """
        arr = _as_array(q, "q")
        return self._idx.search(
            arr,
            top_k,
            token_budget,
            list(pinned),
            ns,
            agent,
            session,
            min_time_us,
            max_time_us,
            explain,
            exact,
            backend,
        )
