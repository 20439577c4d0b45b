"""llama.cpp adapter: a GGUF model served by llama.cpp on the CPU, behind :class:`Engine`.

The engine work is C++ (``src/engines/llama_cpp``, ``kv_agent._core.LlamaEngine``; contract in
``include/kvagent/llama_engine.h``): capture reads the turn's KV back from llama.cpp's cache with
the per-sequence state API and un-rotates the keys with the kv-agent positioner; placement
rotates stored pre-RoPE keys to their planned positions once and writes them into llama.cpp's
cells; query vectors come from the graph evaluation callback (``Qcur-<layer>``). This module
loads segments from the store, converts dtypes and keeps the interface of ``engines/base.py``.
docs/engine-llama-cpp.md has the design and the measured costs.

The default model is the embedded GGUF (``kv_agent.models.default_gguf_path``), run straight from
its file (memory-mapped; no dequantised copy).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np

from kv_agent import _core
from kv_agent.chat_format import format_for
from kv_agent.engines.base import Capture, Engine, Generation, PlannedContext, register
from kv_agent.errors import FailedPreconditionError, InvalidArgumentError, UnimplementedError


class LlamaTokenizer:
    """llama.cpp's tokenizer (from the GGUF) with the Hugging Face calls kv-agent uses."""

    unk_token_id = None

    def __init__(self, engine):
        self._e = engine
        self.bos_token_id = engine.bos_token if engine.bos_token >= 0 else None
        eog = engine.end_of_generation_tokens()
        self.eos_token_id = eog[0] if eog else None
        self.chat_template = engine.chat_template() or None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; special-token text such as ``<start_of_turn>`` maps to its token."""
        return list(self._e.tokenize(text, add_special=add_special_tokens, parse_special=True))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            specials = set(self._e.end_of_generation_tokens())
            if self.bos_token_id is not None:
                specials.add(self.bos_token_id)
            ids = [i for i in ids if i not in specials]
        return self._e.detokenize(ids)

    def convert_tokens_to_ids(self, token: str):
        """The id of a single-token string, else None."""
        ids = self._e.tokenize(token, add_special=False, parse_special=True)
        return ids[0] if len(ids) == 1 else None


class LlamaCppEngine(Engine):
    """A GGUF model run by llama.cpp (see the module docstring)."""

    name = "llama.cpp"

    def __init__(self, model: str | os.PathLike | None = None, *, context_tokens: int = 8192,
                 batch_tokens: int = 512, threads: int = 0, kv_type: str = "f16"):
        """``model``: a GGUF file (default: the embedded default model). ``kv_type``: llama.cpp's
        cache type, "f16", "f32" or "q8_0" (memory is stored in float32 in every case)."""
        if not hasattr(_core, "LlamaEngine"):
            raise FailedPreconditionError(
                "kv_agent was built without the llama.cpp engine: run `make llama-cpp` and rebuild "
                "(`make build-py`), or build with -DKVAGENT_LLAMA_CPP=ON")
        if model is None:
            from kv_agent.models import default_gguf_path

            model = default_gguf_path()
        path = os.fspath(model)
        if os.path.isdir(path):
            raise InvalidArgumentError(f"llama.cpp engine needs a GGUF file, got the directory {path!r}")
        self._e = _core.LlamaEngine(path, context_tokens=int(context_tokens), batch_tokens=int(batch_tokens),
                                    threads=int(threads), kv_type=kv_type)
        self.path = path
        self._spec = self._e.spec
        self._tok = LlamaTokenizer(self._e)
        self._format = format_for(self._e.architecture, self._tok)

    # ------------------------------------------------------------------ identity
    @property
    def spec(self):
        return self._spec

    @property
    def tokenizer(self):
        return self._tok

    @property
    def chat_format(self):
        return self._format

    @property
    def architecture(self) -> str:
        return self._e.architecture

    @property
    def native(self):
        """The C++ ``_core.LlamaEngine`` (tests and benchmarks)."""
        return self._e

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def stop_token_ids(self) -> list[int]:
        ids = set(self._e.end_of_generation_tokens())
        for s in self._format.stop_strings:
            tid = self._tok.convert_tokens_to_ids(s)
            if tid is not None:
                ids.add(tid)
        return sorted(ids)

    # ------------------------------------------------------------------ placement
    def _check_context(self, context: PlannedContext | None) -> None:
        if context is None:
            return
        fp = self._spec.fingerprint
        if context.fingerprint != fp:
            raise FailedPreconditionError(
                f"planned context belongs to model {context.fingerprint}, this llama.cpp engine runs {fp}")
        for s in context.segments:
            if s.recompute_tokens:
                raise UnimplementedError("llama.cpp engine: recompute_tokens (sink repair) is not supported yet")

    def _place(self, context: PlannedContext | None) -> int:
        """Loads and places ``context``; returns the number of context tokens."""
        self._check_context(context)
        if context is None or not context.segments:
            self._e.reset()
            return 0
        kvs, pos = [], []
        for s in context.segments:
            seg = context.store.get(s.key, context.fingerprint)  # FailedPrecondition on another model
            if not seg.pre_rope:
                raise InvalidArgumentError(f"segment {s.key} holds post-RoPE keys; the engine needs pre-RoPE")
            if seg.num_tokens != s.num_tokens:
                raise InvalidArgumentError(
                    f"segment {s.key} has {seg.num_tokens} tokens, the plan says {s.num_tokens}")
            kvs.append(seg.kv("numpy"))
            pos.append(np.arange(s.position, s.position + s.num_tokens, dtype=np.int64))
        kv = np.ascontiguousarray(np.concatenate(kvs, axis=3), dtype=np.float32)
        self._e.place_context(kv, np.concatenate(pos))
        return int(kv.shape[3])

    def _ids(self, token_ids: Sequence[int]) -> list[int]:
        """Checked token ids (before anything is placed)."""
        ids = [int(t) for t in token_ids]
        if not ids:
            raise InvalidArgumentError("llama.cpp engine: no tokens given")
        n = self._e.vocab_size
        bad = [t for t in ids if not 0 <= t < n]
        if bad:
            raise InvalidArgumentError(f"llama.cpp engine: token ids {bad[:5]} outside the vocabulary [0, {n})")
        return ids

    # ------------------------------------------------------------------ capture / query
    def capture(self, token_ids: Sequence[int], context: PlannedContext | None = None) -> Capture:
        ids = self._ids(token_ids)
        self._place(context)
        kv, positions = self._e.capture(ids)
        return Capture(kv, positions, ids)  # float32, the spec's kv_dtype

    def query_vectors(self, token_ids: Sequence[int], context: PlannedContext | None, layers: Sequence[int]):
        ids = self._ids(token_ids)
        layers = [int(x) for x in layers]
        if not layers or any(not 0 <= x < self._spec.num_layers for x in layers):
            raise InvalidArgumentError(f"layers must be within [0, {self._spec.num_layers}), got {layers}")
        self._place(context)
        return self._e.query_vectors(ids, layers)

    # ------------------------------------------------------------------ generate
    def generate(self, token_ids: Sequence[int], context: PlannedContext, *, max_new_tokens: int = 128,
                 stop_ids: Sequence[int] | None = None) -> Generation:
        ids = self._ids(token_ids)
        if max_new_tokens < 1:
            raise InvalidArgumentError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stop = self.stop_token_ids() if stop_ids is None else [int(t) for t in stop_ids]
        t0 = time.perf_counter()
        reused = self._place(context)
        load_s = time.perf_counter() - t0
        g = self._e.generate(ids, int(max_new_tokens), stop)
        total = time.perf_counter() - t0
        return Generation(
            token_ids=list(g["tokens"]), prefill_tokens=int(g["prefill_tokens"]), reused_tokens=reused,
            ttft_s=load_s + g["first_token_s"], total_s=total, load_s=load_s,
            extra={"prefill_s": g["prefill_s"], "decode_s": g["decode_s"], "kv_type": self._e.kv_type})

    def close(self) -> None:
        self._e.reset()


register("llama.cpp", LlamaCppEngine)
