"""SGLang behind kv-agent: planned memory handed to SGLang as HiCache storage pages.

SGLang only reuses exact prefixes: a request's KV pages are looked up by a hash chain over its
token ids (``get_hash_str``), first in the GPU radix tree, then in the host pool, then in the
HiCache storage tier. kv-agent's memory is not a prefix: retrieved turns are placed at new
positions in a new order. This adapter turns a :class:`PlannedContext` into exactly the pages
SGLang will ask its storage tier for, so SGLang reuses them without knowing they were planned:

1. the planned segments are read from the kv-agent store, keys rotated from pre-RoPE to their
   planned positions (once, fp32 angles), concatenated and cut into SGLang pages;
2. each full page is named by SGLang's own page hash of the planned token ids and handed to the
   HiCache backend (:mod:`kv_agent.engines.sglang_storage`) through its plan spool;
3. SGLang's offline ``Engine`` prefills ``planned tokens + new tokens``: its prefetch finds the
   planned pages in storage, loads them host -> GPU and prefills only the tail (the new tokens
   and the last partial page).

See ``docs/engine-sglang.md`` for why this entry point (and not a custom radix cache), the
launch command, and what runs where. SGLang's server needs its CUDA kernels (``sgl_kernel``):
on a machine without them :func:`create` raises ``FailedPreconditionError`` with the import
error; page planning (:func:`plan_pages`) and the spool need only SGLang's Python package.

Thread-safety: one thread at a time per engine (the manager serialises).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kv_agent import _core, rope
from kv_agent.engines import base
from kv_agent.engines.base import Capture, Engine, Generation, PlannedContext
from kv_agent.errors import FailedPreconditionError, InvalidArgumentError


def page_hashes(token_ids: Sequence[int], page_size: int) -> list[str]:
    """SGLang's storage page hashes of ``token_ids`` (full pages only), by SGLang's own function."""
    from sglang.srt.mem_cache.utils import get_storage_hash_str

    n = len(token_ids) // page_size * page_size
    return list(get_storage_hash_str(list(token_ids[:n]), None, page_size=page_size)) if n else []


@dataclass
class PlannedPages:
    """A planned context as SGLang pages: token ids, page hashes and post-RoPE KV per full page."""

    token_ids: list[int]
    hashes: list[str]
    kv: torch.Tensor  # [layers, 2, kv_heads, pages * page_size, head_dim], keys post-RoPE
    page_size: int

    def page(self, i: int) -> torch.Tensor:
        return self.kv[:, :, :, i * self.page_size : (i + 1) * self.page_size]


def plan_pages(context: PlannedContext, spec: _core.ModelSpec, page_size: int) -> PlannedPages:
    """Reads the planned segments, rotates their keys to the planned positions and cuts full pages.

    Segments must carry token ids (records written by kv-agent do). InvalidArgumentError if a
    segment's layout does not match ``spec`` or its tokens are unknown; the store's errors
    (NotFoundError, FailedPreconditionError on a fingerprint mismatch) propagate."""
    if page_size <= 0:
        raise InvalidArgumentError(f"page_size must be positive, got {page_size}")
    ids, parts = [], []
    for ps in context.segments:
        seg = context.store.get(ps.key, context.fingerprint)
        toks = [int(t) for t in seg.tokens]
        if len(toks) != ps.num_tokens or any(t < 0 for t in toks):
            raise InvalidArgumentError(f"segment {ps.key} has no token ids for {ps.num_tokens} tokens")
        kv = seg.kv("torch")
        L, _, H, T, D = kv.shape
        if (spec.num_layers, spec.num_kv_heads, spec.head_dim) != (L, H, D):
            raise InvalidArgumentError(f"segment {ps.key} layout {tuple(kv.shape)} does not match the model")
        out = kv.clone()
        to_pos = np.arange(ps.position, ps.position + T, dtype=np.int64)
        for layer in range(L):
            r = spec.layers[layer].rope
            if seg.pre_rope:
                out[layer, 0] = rope.apply(kv[layer, 0], to_pos, r, D)
            else:
                from_pos = np.asarray(seg.positions, dtype=np.int64)
                out[layer, 0] = rope.reposition(kv[layer, 0], from_pos, to_pos, r, D)
        ids.extend(toks)
        parts.append(out)
    if not parts:
        return PlannedPages([], [], torch.empty(0), page_size)
    kv = torch.cat(parts, dim=3)
    n = len(ids) // page_size * page_size
    return PlannedPages(ids, page_hashes(ids, page_size), kv[:, :, :, :n].contiguous(), page_size)


def spool_pages(
    pages: PlannedPages,
    spool_dir: str,
    fingerprint: _core.Hash128,
    namespace: str,
    shard: str = "tp0of1.pp0of1",
) -> int:
    """Writes each planned page into the backend's plan spool (atomically); returns pages written."""
    from kv_agent.engines.sglang_storage import spool_path

    os.makedirs(spool_dir, exist_ok=True)
    for i, h in enumerate(pages.hashes):
        path = spool_path(spool_dir, fingerprint, namespace, shard, h)
        fd, tmp = tempfile.mkstemp(dir=spool_dir, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(pages.page(i).contiguous().view(torch.uint8).numpy().tobytes())
        os.replace(tmp, path)
    return len(pages.hashes)


class SGLangEngine(Engine):
    """kv-agent's engine contract on SGLang's offline ``Engine`` (see the module docstring).

    ``hf`` is an engine of the same weights that provides identity, capture and query vectors
    (SGLang exposes no hook for pre-RoPE K or Q); SGLang does the generation, reusing the planned
    pages through the HiCache backend."""

    name = "sglang"

    def __init__(
        self,
        model_path: str,
        hf: Engine,
        *,
        spool_dir: str,
        namespace: str = "kv-agent-plan",
        page_size: int = 64,
        **sglang_args,
    ):
        import sglang

        self._hf = hf
        self.page_size = int(page_size)
        self.namespace = namespace
        self.spool_dir = spool_dir
        extra = {
            "backend_name": "kv_agent",
            "module_path": "kv_agent.engines.sglang_storage",
            "class_name": "KvAgentHiCacheStorage",
            "model_fingerprint": hf.spec.fingerprint.hex(),
            "namespace": namespace,
            "plan_spool": spool_dir,
            "interface_v1": 1,
        }
        self._llm = sglang.Engine(
            model_path=model_path,
            page_size=self.page_size,
            enable_hierarchical_cache=True,
            hicache_storage_backend="dynamic",
            hicache_storage_backend_extra_config=json.dumps(extra),
            hicache_storage_prefetch_policy="wait_complete",
            **sglang_args,
        )

    @property
    def spec(self):
        return self._hf.spec

    @property
    def tokenizer(self):
        return self._hf.tokenizer

    @property
    def chat_format(self):
        return self._hf.chat_format

    def stop_token_ids(self) -> list[int]:
        return self._hf.stop_token_ids()

    def capture(self, token_ids, context=None) -> Capture:
        return self._hf.capture(token_ids, context)

    def query_vectors(self, token_ids, context, layers):
        return self._hf.query_vectors(token_ids, context, layers)

    def generate(
        self, token_ids, context: PlannedContext, *, max_new_tokens: int = 128, stop_ids=None
    ) -> Generation:
        t0 = time.perf_counter()
        pages = plan_pages(context, self.spec, self.page_size)
        spool_pages(pages, self.spool_dir, self.spec.fingerprint, self.namespace)
        load_s = time.perf_counter() - t0
        prompt = pages.token_ids + list(token_ids)
        params = {"max_new_tokens": int(max_new_tokens), "temperature": 0.0}
        stops = list(stop_ids) if stop_ids is not None else self.stop_token_ids()
        if stops:
            params["stop_token_ids"] = stops
        out = self._llm.generate(input_ids=prompt, sampling_params=params)
        total = time.perf_counter() - t0
        meta = out.get("meta_info", {})
        cached = int(meta.get("cached_tokens", 0))
        return Generation(
            list(out.get("output_ids", [])),
            prefill_tokens=len(prompt) - cached,
            reused_tokens=cached,
            ttft_s=total,  # SGLang's offline generate() reports no first-token time: the whole call
            total_s=total,
            load_s=load_s,
            extra={"planned_pages": len(pages.hashes), "meta_info": meta},
        )

    def close(self) -> None:
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None:
            llm.shutdown()


def _create(
    model=None,
    *,
    model_path: str | None = None,
    hf: Engine | None = None,
    spool_dir: str | None = None,
    **options,
) -> SGLangEngine:
    """``create("sglang", model_path=DIR, hf=<engine of the same weights>, spool_dir=...)``.

    FailedPreconditionError when SGLang or its CUDA kernels cannot be loaded here."""
    try:
        import sglang  # noqa: F401
    except ImportError as e:
        raise FailedPreconditionError(
            f"engine 'sglang' needs SGLang (make sglang-venv; pip install sglang): {e}"
        ) from e
    try:
        import sgl_kernel  # noqa: F401
    except Exception as e:  # ImportError, or OSError from libcuda.so.1 on machines without a GPU driver
        raise FailedPreconditionError(
            f"engine 'sglang' cannot run here: SGLang's kernels do not load: {e}"
        ) from e
    path = model_path or model
    if not path or hf is None or not spool_dir:
        raise InvalidArgumentError(
            "engine 'sglang' needs model_path, hf (an engine of the same weights) and spool_dir"
        )
    return SGLangEngine(str(path), hf, spool_dir=spool_dir, **options)


base.register("sglang", _create)
