"""kv-agent as a vLLM v1 KV connector (out of tree: ``kv_connector_module_path``, no vLLM patch).

Loaded by vLLM from ``kv_transfer_config``::

    {"kv_connector": "KvAgentConnector", "kv_role": "kv_both",
     "kv_connector_module_path": "kv_agent.engines.vllm_connector",
     "kv_connector_extra_config": {"store_path": "/path/to/store"}}

Two kinds of requests:

* **Planned** (the :mod:`kv_agent.engines.vllm` adapter): the request carries
  ``kv_transfer_params = {"kv_agent": {"store": ID, "load": [[key_hex, tokens], ...],
  "capture": ID|None}}``. The first ``sum(tokens)`` prompt tokens are the planned segments, in
  order, at positions 0.. (contiguous). The scheduler side reports them as external tokens; the
  worker side reads them from the store, rotates the pre-RoPE keys to their planned positions
  with :mod:`kv_agent.rope` and writes them into vLLM's paged blocks before the forward. With
  ``capture``, the KV of the remaining prompt tokens is taken from the blocks after the forward,
  keys un-rotated, and handed to the adapter in this process (:func:`take_capture`).
* **Plain** (any other request, e.g. through vLLM's OpenAI server): the prompt is cut into
  chunks of ``chunk_tokens`` (default: vLLM's block size); chunk i is a segment keyed by
  ``prefix_key(fingerprint, key of chunk i-1, chunk tokens)``. Chunks already in the store are
  loaded (the scheduler reports how many leading prompt tokens it supplies), the other full
  chunks of the prompt are saved, layer by layer, once the prompt has been computed.

CPU KV layout (vLLM CPU attention, ``register_kv_caches``): per layer
``[num_blocks, kv_heads, block_size, 2 * head_size]`` where, per block and head, the first
``block_size * head_size`` values are K transposed (``[head_size, block_size]``) and the rest V
(``[block_size, head_size]``); K is post-RoPE. :func:`kv_views` is the one place that knows it;
``tests/python/test_engine_vllm.py`` checks it against the transformers adapter.

Process model: vLLM runs the scheduler and the (single CPU) worker in one engine-core process.
The store is opened once per process (a kv-agent store directory is locked by one process); the
adapter runs the engine core in its own process and shares its open Store through
:func:`register_store`. Tensor parallelism and pipeline parallelism are not supported.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
)
from vllm.logger import init_logger

from kv_agent import _core
from kv_agent import rope as _rope
from kv_agent.errors import FailedPreconditionError, InvalidArgumentError

logger = init_logger(__name__)

PARAMS_KEY = "kv_agent"
_KNOWN_ISAS = ("vec",)

# ------------------------------------------------------------------ process-wide shared state
_lock = threading.Lock()
_stores: dict[str, Any] = {}  # id -> open kv_agent Store (the adapter's, or one opened by path)
_captures: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # capture id -> (kv, positions)


def register_store(store, store_id: str | None = None) -> str:
    """Makes an open Store reachable by planned requests of this process; returns its id."""
    sid = store_id or uuid.uuid4().hex
    with _lock:
        _stores[sid] = store
    return sid


def unregister_store(store_id: str) -> None:
    with _lock:
        _stores.pop(store_id, None)


def _store(store_id: str):
    with _lock:
        s = _stores.get(store_id)
    if s is None:
        raise FailedPreconditionError(f"kv-agent store {store_id!r} is not registered in this process")
    return s


def _open_path_store(path: str):
    """The Store at ``path``, opened once per process (a store directory admits one process)."""
    key = "path:" + path
    with _lock:
        if key not in _stores:
            from kv_agent.store import Store

            _stores[key] = Store.open(path, write_behind=False)  # durable: servers get killed
        return _stores[key]


def take_capture(capture_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical KV [L, 2, Hkv, T, D] (K pre-RoPE) and positions [T] of a finished capture."""
    with _lock:
        out = _captures.pop(capture_id, None)
    if out is None:
        raise FailedPreconditionError(f"capture {capture_id!r} produced no KV")
    return out


# ------------------------------------------------------------------ model description
def model_fingerprint(model_dir: str) -> _core.Hash128:
    """Weights fingerprint of a safetensors model directory: BLAKE2b-128 over every tensor's
    name, dtype, shape and bytes (in name order) and the attention-relevant config fields.
    Independent of vLLM and transformers versions (it reads the files, not a loaded model)."""
    import hashlib
    import json
    from pathlib import Path

    from safetensors import safe_open

    d = Path(model_dir)
    cfg = json.loads((d / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    keep = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "hidden_size", "rope_theta", "rope_local_base_freq", "rope_scaling", "rope_parameters",
            "sliding_window", "layer_types", "query_pre_attn_scalar", "partial_rotary_factor")
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({k: cfg.get(k) for k in keep}, sort_keys=True).encode())
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise InvalidArgumentError(f"{d} has no .safetensors files")
    tensors = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[name] = (f, name)
    for name in sorted(tensors):
        f, _ = tensors[name]
        with safe_open(str(f), framework="pt") as sf:
            t = sf.get_tensor(name)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(memoryview(t.contiguous().view(torch.uint8).numpy()))
    return _core.Hash128.from_hex(h.hexdigest())


def kv_views(layer_cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V views of one layer's CPU paged cache: K [blocks, Hkv, D, B] (post-RoPE), V
    [blocks, Hkv, B, D] (B = block size). No copy; writes go to vLLM's cache."""
    nb, hkv, bs, two_d = layer_cache.shape
    if two_d != 2 * head_dim:
        raise InvalidArgumentError(
            f"unexpected vLLM CPU KV layout {tuple(layer_cache.shape)} for head_dim {head_dim}")
    flat = layer_cache.view(nb, hkv, 2, bs * head_dim)
    return flat[:, :, 0].view(nb, hkv, head_dim, bs), flat[:, :, 1].view(nb, hkv, bs, head_dim)


def gather_tokens(layer_cache: torch.Tensor, slots: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [Hkv, T, D] of the tokens at ``slots`` (block * block_size + offset)."""
    k, v = kv_views(layer_cache, head_dim)
    bs = k.shape[3]
    blk, off = slots // bs, slots % bs
    return k[blk, :, :, off].transpose(0, 1), v[blk, :, off, :].transpose(0, 1)


def scatter_tokens(layer_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   head_dim: int) -> None:
    """Writes K, V [Hkv, T, D] (K post-RoPE) into the tokens at ``slots``."""
    kc, vc = kv_views(layer_cache, head_dim)
    bs = kc.shape[3]
    blk, off = slots // bs, slots % bs
    kc[blk, :, :, off] = k.transpose(0, 1).to(kc.dtype)
    vc[blk, :, off, :] = v.transpose(0, 1).to(vc.dtype)


def slots_for(block_ids: list[int], block_size: int, start: int, stop: int) -> torch.Tensor:
    """Slot of each token index in [start, stop) of a request with ``block_ids``."""
    idx = torch.arange(start, stop, dtype=torch.long)
    blocks = torch.as_tensor(block_ids, dtype=torch.long)
    return blocks[idx // block_size] * block_size + idx % block_size


# ------------------------------------------------------------------ metadata
@dataclass
class _LoadReq:
    req_id: str
    store_id: str
    segments: list[tuple[str, int]]  # (key hex, tokens) from token 0, contiguous
    start: int  # first token index to write (tokens before it are already in vLLM's blocks)
    stop: int  # one past the last loaded token
    slots: torch.Tensor  # slots of tokens [start, stop)


@dataclass
class _SaveReq:
    req_id: str
    store_id: str
    start: int
    stop: int
    slots: torch.Tensor
    capture_id: str | None = None  # planned request: hand the KV to the adapter
    chunks: list[tuple[str, str, list[int], int]] = field(default_factory=list)  # plain: (key, parent, tokens, start)


@dataclass
class KvAgentConnectorMetadata(KVConnectorMetadata):
    loads: list[_LoadReq] = field(default_factory=list)
    saves: list[_SaveReq] = field(default_factory=list)


@dataclass
class _ReqState:
    prompt: list[int]
    params: dict | None
    block_ids: list[int] = field(default_factory=list)
    loaded: int = 0  # prompt tokens supplied by the connector
    saved: bool = False


class KvAgentConnector(KVConnectorBase_V1):
    """See the module docstring. Scheduler role: matching, planning loads and saves. Worker role:
    moving KV between the kv-agent store and vLLM's CPU paged blocks."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        if vllm_config.parallel_config.tensor_parallel_size != 1 or \
                vllm_config.parallel_config.pipeline_parallel_size != 1:
            raise FailedPreconditionError("KvAgentConnector supports one worker (no tensor/pipeline parallelism)")
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.block_size = int(vllm_config.cache_config.block_size)
        self.chunk_tokens = int(extra.get("chunk_tokens") or self.block_size)
        self.store_path = extra.get("store_path")
        cfg = vllm_config.model_config.hf_text_config
        self.num_layers = int(cfg.num_hidden_layers)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.rope_specs = list(_rope.layer_rope_specs(cfg))[: self.num_layers]
        fp = extra.get("fingerprint")
        self.fingerprint = _core.Hash128.from_hex(fp) if fp else model_fingerprint(vllm_config.model_config.model)
        self._role = role
        # scheduler side
        self._reqs: dict[str, _ReqState] = {}
        self._pending_loads: dict[str, tuple[str, list[tuple[str, int]], int, int]] = {}
        self._req_params: dict[str, dict | None] = {}
        # worker side
        self._caches: dict[int, torch.Tensor] = {}
        self._saving: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.stats = {"loaded_tokens": 0, "saved_tokens": 0, "load_s": 0.0, "save_s": 0.0}

    # ------------------------------------------------------------ helpers
    def _plain_store_id(self) -> str | None:
        if not self.store_path:
            return None
        _open_path_store(self.store_path)
        return "path:" + self.store_path

    @staticmethod
    def _params(request) -> dict | None:
        p = getattr(request, "kv_transfer_params", None) or {}
        return p.get(PARAMS_KEY)

    def _plain_chunks(self, prompt: list[int]) -> list[tuple[str, str, list[int], int]]:
        """(key, parent, tokens, start) of the prompt's full chunks, prefix-chained."""
        out, parent = [], _core.Hash128()
        c = self.chunk_tokens
        for start in range(0, len(prompt) - c + 1, c):
            toks = prompt[start:start + c]
            key = _core.prefix_key(self.fingerprint, parent, toks)
            out.append((key.hex(), parent.hex(), toks, start))
            parent = key
        return out

    # ------------------------------------------------------------ scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        prompt = list(request.prompt_token_ids or [])
        params = self._params(request)
        self._req_params[request.request_id] = params
        if params is not None:
            segs = [(str(k), int(n)) for k, n in params.get("load", [])]
            total = sum(n for _, n in segs)
            if total >= len(prompt):
                raise InvalidArgumentError(
                    f"planned context of {total} tokens leaves no prompt token to compute ({len(prompt)})")
            store_id = params["store"]
        else:
            store_id = self._plain_store_id()
            if store_id is None:
                return 0, False
            store = _store(store_id)
            segs = []
            for key, _parent, toks, _start in self._plain_chunks(prompt[:-1]):
                if not store.contains(key):
                    break
                segs.append((key, len(toks)))
            total = sum(n for _, n in segs)
        if total <= num_computed_tokens:
            return 0, False
        self._pending_loads[request.request_id] = (store_id, segs, num_computed_tokens, total)
        return total - num_computed_tokens, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        if num_external_tokens == 0:
            self._pending_loads.pop(request.request_id, None)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        meta = KvAgentConnectorMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            st = _ReqState(list(new.prompt_token_ids or []), self._req_params.pop(new.req_id, None),
                           list(new.block_ids[0]))
            self._reqs[new.req_id] = st
            load = self._pending_loads.pop(new.req_id, None)
            if load is not None:
                store_id, segs, start, total = load
                st.loaded = total
                meta.loads.append(_LoadReq(new.req_id, store_id, segs, start, total,
                                           slots_for(st.block_ids, self.block_size, start, total)))
            self._maybe_save(meta, new.req_id, st, int(new.num_computed_tokens),
                             int(scheduler_output.num_scheduled_tokens.get(new.req_id, 0)))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            nb = cached.new_block_ids[i]
            if nb is not None:
                if req_id in getattr(cached, "resumed_req_ids", ()):
                    st.block_ids = list(nb[0])
                else:
                    st.block_ids.extend(nb[0])
            self._maybe_save(meta, req_id, st, int(cached.num_computed_tokens[i]),
                             int(scheduler_output.num_scheduled_tokens.get(req_id, 0)))
        return meta

    def _maybe_save(self, meta, req_id: str, st: _ReqState, computed: int, scheduled: int) -> None:
        """Plans the save of the request's prompt KV in the step that computes its last prompt token."""
        if st.saved or computed + scheduled < len(st.prompt):
            return
        st.saved = True
        if st.params is not None:
            cap = st.params.get("capture")
            if cap:
                start, stop = st.loaded, len(st.prompt)
                meta.saves.append(_SaveReq(req_id, st.params["store"], start, stop,
                                           slots_for(st.block_ids, self.block_size, start, stop), capture_id=cap))
            return
        store_id = self._plain_store_id()
        if store_id is None:
            return
        store = _store(store_id)
        chunks = [c for c in self._plain_chunks(st.prompt) if not store.contains(c[0])]
        if not chunks:
            return
        start, stop = chunks[0][3], chunks[-1][3] + len(chunks[-1][2])
        meta.saves.append(_SaveReq(req_id, store_id, start, stop,
                                   slots_for(st.block_ids, self.block_size, start, stop), chunks=chunks))

    def request_finished(self, request, block_ids):
        self._reqs.pop(request.request_id, None)
        self._req_params.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        return False, None

    # ------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        from vllm.model_executor.models.utils import extract_layer_index
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            raise FailedPreconditionError("KvAgentConnector moves KV on vLLM's CPU attention backend only")
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        for name, t in kv_caches.items():
            # The K/V order inside a block depends on the CPU attention kernel; "vec" is the one
            # checked against transformers (tests/python/test_engine_vllm.py).
            isa = _get_attn_isa(t.dtype, self.block_size, self.head_dim)
            if isa not in _KNOWN_ISAS:
                raise FailedPreconditionError(
                    f"vLLM CPU attention kernel {isa!r} has a KV block layout this connector does not know "
                    f"(known: {_KNOWN_ISAS})")
            self._caches[extract_layer_index(name)] = t
        if sorted(self._caches) != list(range(self.num_layers)):
            raise FailedPreconditionError(
                f"vLLM registered KV caches for layers {sorted(self._caches)}, expected {self.num_layers}")

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        import time

        meta = self._get_connector_metadata()
        if not isinstance(meta, KvAgentConnectorMetadata):
            return
        for ld in meta.loads:
            t0 = time.perf_counter()
            store = _store(ld.store_id)
            parts = [store.get(_core.Hash128.from_hex(k), self.fingerprint).kv(framework="torch") for k, _ in ld.segments]
            kv = torch.cat(parts, dim=3)[:, :, :, ld.start:ld.stop]
            pos = torch.arange(ld.start, ld.stop, dtype=torch.long)
            for layer in range(self.num_layers):
                k = _rope.apply(kv[layer, 0], pos, self.rope_specs[layer], self.head_dim)
                scatter_tokens(self._caches[layer], ld.slots, k, kv[layer, 1], self.head_dim)
            self.stats["loaded_tokens"] += ld.stop - ld.start
            self.stats["load_s"] += time.perf_counter() - t0

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvAgentConnectorMetadata) or not meta.saves:
            return
        import time

        from vllm.model_executor.models.utils import extract_layer_index

        t0 = time.perf_counter()
        layer = extract_layer_index(layer_name)
        for sv in meta.saves:
            k, v = gather_tokens(kv_layer, sv.slots, self.head_dim)
            pos = torch.arange(sv.start, sv.stop, dtype=torch.long)
            k = _rope.apply(k.contiguous(), pos, self.rope_specs[layer], self.head_dim, inverse=True)
            self._saving.setdefault(sv.req_id, {})[layer] = (k, v.contiguous())
        self.stats["save_s"] += time.perf_counter() - t0

    def wait_for_save(self):
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvAgentConnectorMetadata):
            return
        import time

        t0 = time.perf_counter()
        for sv in meta.saves:
            layers = self._saving.pop(sv.req_id, {})
            if sorted(layers) != list(range(self.num_layers)):
                logger.warning("kv-agent: request %s saved %d of %d layers; dropped", sv.req_id, len(layers),
                               self.num_layers)
                continue
            kv = torch.stack([torch.stack(layers[i]) for i in range(self.num_layers)])  # [L, 2, H, T, D]
            pos = torch.arange(sv.start, sv.stop, dtype=torch.long)
            if sv.capture_id is not None:
                with _lock:
                    _captures[sv.capture_id] = (kv, pos)
            else:
                self._put_chunks(sv, kv)
            self.stats["saved_tokens"] += sv.stop - sv.start
        self.stats["save_s"] += time.perf_counter() - t0

    def _put_chunks(self, sv: _SaveReq, kv: torch.Tensor) -> None:
        from kv_agent.store import Segment

        store = _store(sv.store_id)
        for key, parent, toks, start in sv.chunks:
            a = start - sv.start
            part = kv[:, :, :, a:a + len(toks)].contiguous()
            store.put(Segment(part, tokens=toks, model=self.fingerprint, key=_core.Hash128.from_hex(key),
                              parent=_core.Hash128.from_hex(parent),
                              positions=list(range(start, start + len(toks))), role="prefix"))
