"""The engine interface: what ``CacheManager`` needs from an inference engine, and nothing more.

Every engine (transformers, vLLM, SGLang, llama.cpp) implements :class:`Engine`. The manager
holds product logic only (what to store, what to retrieve, how to lay out a context); it never
touches engine tensors or engine KV pools. An adapter owns placement: given a
:class:`PlannedContext` (store keys + planned positions) it loads the segments from the store
itself, re-positions keys (RoPE) and fills its own cache layout (a HF ``DynamicCache``, vLLM's
or SGLang's paged blocks, llama.cpp's KV cells).

Contract shared by all engines
------------------------------
* **Identity.** ``spec`` is the model's :class:`kv_agent.ModelSpec`; ``spec.fingerprint`` is
  derived from the weights and the attention-relevant configuration only (never from library
  versions), so memory written by one engine is readable by another engine running the same
  weights. ``tokenizer`` tokenizes with ``encode(text)`` / ``decode(ids)``; ``chat_format`` says
  how prefix, turns and queries are laid out (derived from the model's own chat template).
* **Canonical KV.** ``[layers, 2, kv_heads, tokens, head_dim]``, index 0 = K **pre-RoPE** (after
  any per-head q/k norm, before rotation), 1 = V, in the model's KV dtype on the CPU (or on the
  device the adapter captured on). Positions are int64.
* **Capture.** ``capture(token_ids, context)`` encodes ``token_ids`` after ``context`` (usually
  the shared system prefix) and returns their KV in canonical layout, positions starting at
  ``context.total_positions``. An engine whose cache holds post-RoPE keys un-rotates them with
  :mod:`kv_agent.rope` before returning.
* **Query vectors.** ``query_vectors(token_ids, context, layers)`` returns the pre-RoPE Q of
  ``token_ids`` (encoded after ``context``) at ``layers``, stacked **in the order given**:
  ``[len(layers), q_heads, tokens, head_dim]`` float32. Retrieval depends on this order.
* **Generate from a plan.** ``generate(token_ids, context, ...)`` places the planned segments at
  their planned positions (keys rotated from pre-RoPE to the planned position, once), prefills
  only ``token_ids`` and decodes greedily. It reports what the engine itself measured
  (prefilled vs reused tokens, time to first token).

Adapters register themselves by name (:func:`register`); ``CacheManager(engine=NAME)`` looks the
name up with :func:`create`. An adapter whose engine is not installed raises
``FailedPreconditionError`` from ``create`` with the install command, never at import time of
``kv_agent``.

Thread-safety: an engine instance is used by one thread at a time (the manager serialises).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kv_agent import _core
from kv_agent.errors import FailedPreconditionError, InvalidArgumentError


@dataclass(frozen=True)
class PlannedSegment:
    """One stored segment placed in a context: its store key, token count and first position."""

    key: _core.Hash128
    num_tokens: int
    position: int  # planned position of the segment's first token
    token_ids: tuple[int, ...] = ()  # optional (engines that recompute or verify tokens need them)
    recompute_tokens: int = 0  # leading tokens the engine recomputes instead of reusing (sink repair)


@dataclass(frozen=True)
class PlannedContext:
    """Segments to place before new tokens, in order, with their planned positions.

    ``store`` is the kv-agent Store the segments are read from (``store.get(key, fingerprint)``;
    ``store.get_device`` on GPU builds). Positions are contiguous: segment i starts where
    segment i-1 ends, and new tokens start at ``total_positions``.
    """

    segments: tuple[PlannedSegment, ...]
    store: Any
    fingerprint: _core.Hash128

    @property
    def total_positions(self) -> int:
        if not self.segments:
            return 0
        last = self.segments[-1]
        return last.position + last.num_tokens

    @property
    def keys(self) -> list[_core.Hash128]:
        return [s.key for s in self.segments]

    @staticmethod
    def from_plan(plan, store, fingerprint, token_ids: dict | None = None) -> PlannedContext:
        """From a ``_core.make_plan`` result (its ``segments`` carry key, num_tokens, position)."""
        segs = tuple(
            PlannedSegment(s.key, int(s.num_tokens), int(s.position),
                           tuple(token_ids.get(s.key, ())) if token_ids else (), int(s.recompute_tokens))
            for s in plan.segments)
        return PlannedContext(segs, store, fingerprint)

    @staticmethod
    def contiguous(items: Sequence[tuple[_core.Hash128, int]], store, fingerprint) -> PlannedContext:
        """Segments ``(key, num_tokens)`` laid out from position 0 in the order given."""
        segs, pos = [], 0
        for key, n in items:
            segs.append(PlannedSegment(key, int(n), pos))
            pos += int(n)
        return PlannedContext(tuple(segs), store, fingerprint)


@dataclass
class Capture:
    """KV of a token span as the engine produced it (canonical layout, keys pre-RoPE)."""

    kv: Any  # torch.Tensor or numpy array [layers, 2, kv_heads, tokens, head_dim]
    positions: Any  # int64 [tokens]
    token_ids: list[int]

    def __len__(self) -> int:
        return len(self.token_ids)

    def slice(self, start: int, stop: int) -> Capture:
        """Tokens [start, stop) (chunks of a turn); torch or numpy as captured."""
        if not 0 <= start < stop <= len(self):
            raise InvalidArgumentError(f"slice [{start}, {stop}) outside a capture of {len(self)} tokens")
        return Capture(self.kv[:, :, :, start:stop], self.positions[start:stop], list(self.token_ids[start:stop]))


@dataclass
class Generation:
    """A greedy continuation and what the engine measured while producing it."""

    token_ids: list[int]
    prefill_tokens: int  # tokens the engine computed for the prompt (engine-reported where possible)
    reused_tokens: int  # context tokens whose KV came from memory, not recomputed
    ttft_s: float  # placement of the context + prefill + first token
    total_s: float
    load_s: float = 0.0  # part of ttft_s spent loading and re-positioning memory
    extra: dict = field(default_factory=dict)  # engine-specific counters


class Engine(abc.ABC):
    """One inference engine behind kv-agent. See the module docstring for the contract."""

    name: str = ""  # registry name: "hf", "vllm", "sglang", "llama.cpp"
    # Name of a known model (kv_agent.models.NAMED_MODELS) when the engine loaded one by name; it
    # selects the model's retrieval profile (kv_agent.retrieval_profile). None otherwise.
    model_name: str | None = None

    # ------------------------------------------------------------------ identity
    @property
    @abc.abstractmethod
    def spec(self) -> _core.ModelSpec:
        """Layers, heads, head_dim, per-layer RoPE and window, KV dtype and the weights fingerprint."""

    @property
    @abc.abstractmethod
    def tokenizer(self):
        """A Hugging Face-compatible tokenizer (``encode``/``decode``/``apply_chat_template``)."""

    @property
    @abc.abstractmethod
    def chat_format(self):
        """The :class:`kv_agent.chat_format.ChatFormat` matching the model's own chat template."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens added."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def bos_ids(self) -> list[int]:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return [bos] if bos is not None else []

    def stop_token_ids(self) -> list[int]:
        """Token ids that end an answer (EOS and the chat format's end-of-turn)."""
        return []

    @property
    def max_context_tokens(self) -> int:
        """Positions the model handles (0 = unknown); the manager plans within it."""
        return 0

    @property
    def fingerprint_aliases(self) -> tuple[_core.Hash128, ...]:
        """Fingerprints earlier versions of this adapter gave the same weights. A memory holding
        segments stamped with one of them re-stamps them with ``spec.fingerprint`` when a manager
        for this engine attaches (``AgentMemory.attach``), so stores keep working across upgrades."""
        return ()

    # ------------------------------------------------------------------ capture / query
    @abc.abstractmethod
    def capture(self, token_ids: Sequence[int], context: PlannedContext | None = None) -> Capture:
        """KV of ``token_ids`` encoded after ``context`` (canonical layout, keys pre-RoPE)."""

    @abc.abstractmethod
    def query_vectors(self, token_ids: Sequence[int], context: PlannedContext | None,
                      layers: Sequence[int]):
        """Pre-RoPE Q of ``token_ids`` after ``context``: ``[len(layers), q_heads, tokens, head_dim]``
        float32, layers in the order given."""

    # ------------------------------------------------------------------ generate
    @abc.abstractmethod
    def generate(self, token_ids: Sequence[int], context: PlannedContext, *, max_new_tokens: int = 128,
                 stop_ids: Sequence[int] | None = None) -> Generation:
        """Places ``context`` (re-positioned), prefills only ``token_ids``, decodes greedily."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases engine resources (processes, pools). Idempotent."""


# ---------------------------------------------------------------------- registry
_REGISTRY: dict[str, Callable[..., Engine]] = {}


def register(name: str, factory: Callable[..., Engine]) -> None:
    """Registers ``factory(model=..., **options) -> Engine`` under ``name`` (replaces an older one)."""
    if not name:
        raise InvalidArgumentError("engine name must be non-empty")
    _REGISTRY[name] = factory


def names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def create(name: str, **options) -> Engine:
    """The engine registered as ``name``; FailedPreconditionError if its runtime is not installed."""
    _load_builtin()
    aliases = {"transformers": "hf", "llamacpp": "llama.cpp", "llama_cpp": "llama.cpp"}
    name = aliases.get(name, name)
    if name not in _REGISTRY:
        raise InvalidArgumentError(f"unknown engine {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**options)


_BUILTIN = {  # name -> module that calls register() when imported (imports are lazy)
    "hf": "kv_agent.engines.hf",
    "vllm": "kv_agent.engines.vllm",
    "sglang": "kv_agent.engines.sglang",
    "llama.cpp": "kv_agent.engines.llama_cpp",
}


def _load_builtin() -> None:
    import importlib
    import importlib.util

    for name, module in _BUILTIN.items():
        if name in _REGISTRY:
            continue
        if importlib.util.find_spec(module) is None:
            continue
        try:
            importlib.import_module(module)
        except ImportError as e:  # the adapter's module exists but its engine is not installed
            def missing(_e=e, _n=name, **_):
                raise FailedPreconditionError(f"engine {_n!r} is not available here: {_e}")

            _REGISTRY.setdefault(name, missing)
