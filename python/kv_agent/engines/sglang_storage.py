"""SGLang HiCache storage backend (L3) on the kv-agent store.

SGLang's hierarchical cache keeps KV pages on the GPU, in a host pool, and in a third-party
"storage" tier reached through :class:`sglang.srt.mem_cache.hicache_storage.HiCacheStorage`.
This module is such a tier: every page SGLang backs up becomes one kv-agent :class:`Segment`
in the store (host tier, written behind to the disk tier when the store has a path), so pages
survive an SGLang restart and are readable by kv-agent and by other engines on the same weights.

Launch (see ``docs/engine-sglang.md``)::

    python -m sglang.launch_server --model-path MODEL --page-size 64 --enable-hierarchical-cache \\
        --hicache-storage-backend dynamic --hicache-storage-backend-extra-config \\
        '{"backend_name": "kv_agent", "module_path": "kv_agent.engines.sglang_storage",
          "class_name": "KvAgentHiCacheStorage", "path": "/var/lib/kv-agent/sglang",
          "model_fingerprint": "<hex from: python -m kv_agent.engines.sglang_storage fingerprint MODEL>",
          "namespace": "prod", "interface_v1": 1}'

Extra config (SGLang passes it as ``storage_config.extra_config``):
  ``model_fingerprint`` (required): 32 hex digits, the weights fingerprint kv-agent uses for
  this model; part of every key and checked on every read.
  ``path``: store directory (pages persist there); absent or null: host tier only.
  ``namespace`` (default ``"sglang"``): part of every key; tenants with different namespaces
  never see each other's pages.
  ``host_capacity_bytes`` (default 1 GiB), ``disk_capacity_bytes`` (0 = unbounded), ``sync``
  (default true: fdatasync each record), ``write_behind`` (default true): store options.
  ``plan_spool``: a directory where :mod:`kv_agent.engines.sglang` drops planned pages (raw
  canonical bytes named by store key); a page missing from the store is taken from there (moved
  into the store) before it counts as a miss.
  ``interface_v1`` (read by SGLang): 1 makes SGLang call :meth:`batch_get_v1` /
  :meth:`batch_set_v1`, which copy between the store and SGLang's host pool in place.

Keys. SGLang names a page by a SHA-256 hex chain over its token ids (``get_hash_str``). The
store key is ``xxh3-128("sglang-page", fingerprint, namespace, tp shard, page hash)``.

Page records. Canonical kv-agent layout ``[layers, 2, kv_heads, page_size, head_dim]`` in the
host pool's dtype; keys are SGLang's (post-RoPE, ``pre_rope=False``). SGLang does not hand
token ids to storage backends, so record tokens are -1. When SGLang passes the preceding page
hashes (``HiCacheStorageExtraInfo.prefix_keys``, extra config
``"hicache_storage_pass_prefix_keys": true``) a record also carries its absolute positions and
its parent page's key; otherwise positions are page-relative and ``meta.turn`` is -1.

Supported host pools: ``MHATokenToKVPoolHost`` with layouts ``layer_first``, ``page_first`` and
``page_first_direct``, dtypes float32/float16/bfloat16, equal K and V head dims. Anything else
(MLA, ``page_head``, ``page_unified``, fp8 KV, the ``*_v2`` multi-pool transfers) is refused with
an ``InvalidArgumentError`` naming what is unsupported, when SGLang registers its host pool.

Thread-safety: SGLang calls the backend from its prefetch and backup threads at once; the
store is thread-safe and each call touches only the pages it is given.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from kv_agent import _core
from kv_agent.errors import InvalidArgumentError, KvAgentError, NotFoundError
from kv_agent.store import Segment, Store

log = logging.getLogger(__name__)

SUPPORTED_LAYOUTS = ("layer_first", "page_first", "page_first_direct")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROLE = "sglang-page"


def page_store_key(fingerprint: _core.Hash128, namespace: str, shard: str, page_hash: str) -> _core.Hash128:
    """Store key of SGLang page ``page_hash`` for these weights, namespace and TP shard."""
    return _core.Hash128.of_str("\0".join(("sglang-page", fingerprint.hex(), namespace, shard, page_hash)))


def spool_path(spool_dir: str, fingerprint: _core.Hash128, namespace: str, shard: str, page_hash: str) -> str:
    """File of a planned page in the plan spool: raw ``[L, 2, H, P, D]`` bytes in the pool dtype."""
    return os.path.join(spool_dir, page_store_key(fingerprint, namespace, shard, page_hash).hex() + ".kv")


def _option(extra: dict, name: str, default, kind):
    value = extra.get(name, default)
    if value is None:
        return default
    try:
        return kind(value)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(
            f"kv_agent HiCache storage: bad {name!r} in extra config: {value!r}"
        ) from e


class KvAgentHiCacheStorage(HiCacheStorage):
    """HiCache L3 backend: SGLang pages as kv-agent segments (see the module docstring)."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict | None = None):
        extra = dict(storage_config.extra_config or {})
        if storage_config.is_mla_model:
            raise InvalidArgumentError(
                "kv_agent HiCache storage: MLA models are not supported (MHA/GQA KV only)"
            )
        fp = extra.get("model_fingerprint")
        if not fp:
            raise InvalidArgumentError(
                "kv_agent HiCache storage: extra config needs 'model_fingerprint' (32 hex digits; "
                "print it with: python -m kv_agent.engines.sglang_storage fingerprint MODEL_DIR)"
            )
        try:
            self.fingerprint = _core.Hash128.from_hex(str(fp))
        except KvAgentError as e:
            raise InvalidArgumentError(f"kv_agent HiCache storage: bad model_fingerprint {fp!r}: {e}") from e
        self.namespace = str(extra.get("namespace") or "sglang")
        self.model_name = storage_config.model_name or ""
        tp_rank, tp_size = int(storage_config.tp_rank), int(storage_config.tp_size)
        pp_rank, pp_size = int(storage_config.pp_rank), int(storage_config.pp_size)
        # Each TP rank holds a slice of the KV heads (and each PP rank a slice of the layers): a
        # shard's pages are keyed apart, and each rank process opens its own store directory.
        self.shard = f"tp{tp_rank}of{tp_size}.pp{pp_rank}of{pp_size}"
        path = extra.get("path")
        if path and (tp_size > 1 or pp_size > 1):
            path = f"{path}/{self.shard}"
        self.path = str(path) if path else None
        self.spool = str(extra["plan_spool"]) if extra.get("plan_spool") else None
        self.store = Store.open(
            self.path,
            host_capacity_bytes=_option(extra, "host_capacity_bytes", 1 << 30, int),
            disk_capacity_bytes=_option(extra, "disk_capacity_bytes", 0, int),
            write_behind=_option(extra, "write_behind", True, bool),
            sync=_option(extra, "sync", True, bool),
        )
        self.mem_pool_host = None
        self._geometry = None  # (layers, heads, page_size, head_dim, dtype, layout) once registered

    # ------------------------------------------------------------------ host pool
    def register_mem_pool_host(self, mem_pool_host) -> None:
        """Validates SGLang's host pool; InvalidArgumentError (nothing registered) if unsupported."""
        name = type(mem_pool_host).__name__
        layout = getattr(mem_pool_host, "layout", None)
        if not hasattr(mem_pool_host, "kv_buffer") or not hasattr(mem_pool_host, "head_num"):
            raise InvalidArgumentError(
                f"kv_agent HiCache storage: host pool {name} is not an MHA K/V pool (MLA and hybrid "
                "pools are not supported)"
            )
        if layout not in SUPPORTED_LAYOUTS:
            raise InvalidArgumentError(
                f"kv_agent HiCache storage: host layout {layout!r} is not supported; use "
                f"--hicache-mem-layout one of {', '.join(SUPPORTED_LAYOUTS)}"
            )
        if mem_pool_host.dtype not in _DTYPES:
            raise InvalidArgumentError(
                f"kv_agent HiCache storage: KV dtype {mem_pool_host.dtype} is not supported "
                "(float32, float16, bfloat16)"
            )
        v_dim = getattr(mem_pool_host, "v_head_dim", mem_pool_host.head_dim)
        if v_dim != mem_pool_host.head_dim:
            raise InvalidArgumentError(
                f"kv_agent HiCache storage: K head dim {mem_pool_host.head_dim} != V head dim {v_dim}"
            )
        if mem_pool_host.kv_buffer.device.type != "cpu":
            raise InvalidArgumentError("kv_agent HiCache storage: the host pool must live in CPU memory")
        self.mem_pool_host = mem_pool_host
        self._geometry = (
            int(mem_pool_host.layer_num),
            int(mem_pool_host.head_num),
            int(mem_pool_host.page_size),
            int(mem_pool_host.head_dim),
            mem_pool_host.dtype,
            layout,
        )

    def _require_pool(self):
        if self._geometry is None:
            raise InvalidArgumentError("kv_agent HiCache storage: no host pool registered")
        return self._geometry

    def page_view(self, host_index: int) -> torch.Tensor:
        """The page starting at host slot ``host_index`` as a view ``[L, 2, H, P, D]`` of the pool."""
        L, H, P, D, _, layout = self._require_pool()
        if host_index % P:
            raise InvalidArgumentError(f"host index {host_index} is not page aligned (page size {P})")
        buf = self.mem_pool_host.kv_buffer
        if layout == "layer_first":  # [2, L, size, H, D]
            return buf[:, :, host_index : host_index + P].permute(1, 0, 3, 2, 4)
        if layout == "page_first":  # [2, size, L, H, D]
            return buf[:, host_index : host_index + P].permute(2, 0, 3, 1, 4)
        return buf[:, host_index // P].permute(1, 0, 3, 2, 4)  # page_first_direct: [2, pages, L, P, H, D]

    def flat_view(self, flat: torch.Tensor) -> torch.Tensor:
        """SGLang's flat page (``get_data_page(flat=True)``, ``get_dummy_flat_data_page``) as ``[L, 2, H, P, D]``."""
        L, H, P, D, dtype, layout = self._require_pool()
        if flat.numel() != 2 * L * P * H * D or flat.dtype != dtype:
            raise InvalidArgumentError(
                f"flat page has {flat.numel()} {flat.dtype} elements, expected {2 * L * P * H * D} {dtype}"
            )
        if layout == "page_first":
            return flat.view(2, P, L, H, D).permute(2, 0, 3, 1, 4)
        return flat.view(2, L, P, H, D).permute(1, 0, 3, 2, 4)

    # ------------------------------------------------------------------ keys
    def store_key(self, page_hash: str) -> _core.Hash128:
        return page_store_key(self.fingerprint, self.namespace, self.shard, page_hash)

    def _placement(self, keys: Sequence[str], extra_info) -> list[tuple[int, _core.Hash128]]:
        """(page index in its chain or -1, parent store key) for each key."""
        prefix = getattr(extra_info, "prefix_keys", None) if extra_info is not None else None
        if prefix is None:
            return [(-1, _core.Hash128())] * len(keys)
        out, parent = [], self.store_key(prefix[-1]) if prefix else _core.Hash128()
        for i, k in enumerate(keys):
            out.append((len(prefix) + i, parent))
            parent = self.store_key(k)
        return out

    # ------------------------------------------------------------------ one page
    def _write(self, page_hash: str, src: torch.Tensor, page_index: int, parent: _core.Hash128) -> bool:
        """Stores ``src`` ([L, 2, H, P, D], any strides) as the page ``page_hash``."""
        key = self.store_key(page_hash)
        if self.store.contains(key):
            return True  # pages are content-addressed by their prefix chain
        L, H, P, D, dtype, _ = self._require_pool()
        kv = torch.empty((L, 2, H, P, D), dtype=dtype)
        kv.copy_(src)
        first = page_index * P if page_index >= 0 else 0
        seg = Segment(
            kv,
            tokens=[-1] * P,
            positions=list(range(first, first + P)),
            model=self.fingerprint,
            key=key,
            parent=parent,
            ns=self.namespace,
            agent="sglang",
            session=self.model_name,
            turn=page_index,
            role=ROLE,
            pre_rope=False,
            copy=False,
        )
        try:
            self.store.put(seg)
        except KvAgentError as e:
            log.warning("kv_agent HiCache storage: put of page %s failed: %s", page_hash, e)
            return False
        return True

    def _spooled(self, page_hash: str) -> str | None:
        if self.spool is None:
            return None
        path = spool_path(self.spool, self.fingerprint, self.namespace, self.shard, page_hash)
        return path if os.path.exists(path) else None

    def _import_spooled(self, page_hash: str) -> bool:
        """Moves a planned page from the spool into the store; False if absent or malformed."""
        path = self._spooled(page_hash)
        if path is None:
            return False
        L, H, P, D, dtype, _ = self._require_pool()
        raw = torch.from_file(path, shared=False, size=os.path.getsize(path), dtype=torch.uint8)
        if raw.numel() != L * 2 * H * P * D * dtype.itemsize:
            log.warning(
                "kv_agent HiCache storage: spooled page %s has %d bytes, expected %d",
                path,
                raw.numel(),
                L * 2 * H * P * D * dtype.itemsize,
            )
            return False
        ok = self._write(page_hash, raw.view(dtype).view(L, 2, H, P, D), -1, _core.Hash128())
        if ok:
            os.unlink(path)
        return ok

    def _read(self, page_hash: str, dst: torch.Tensor) -> bool:
        """Copies the page ``page_hash`` into ``dst`` ([L, 2, H, P, D] view); False if absent."""
        try:
            seg = self.store.get(self.store_key(page_hash), self.fingerprint)
        except NotFoundError:
            if not self._import_spooled(page_hash):
                return False
            return self._read(page_hash, dst)
        except KvAgentError as e:  # corrupt record, fingerprint mismatch: a miss for SGLang, logged
            log.warning("kv_agent HiCache storage: page %s unreadable: %s", page_hash, e)
            return False
        src = seg.kv("torch")
        if tuple(src.shape) != tuple(dst.shape) or src.dtype != dst.dtype:
            log.warning(
                "kv_agent HiCache storage: page %s has shape %s %s, pool expects %s %s",
                page_hash,
                tuple(src.shape),
                src.dtype,
                tuple(dst.shape),
                dst.dtype,
            )
            return False
        dst.copy_(src)
        return True

    # ------------------------------------------------------------------ HiCacheStorage
    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        if target_location is None:
            L, H, P, D, dtype, _ = self._require_pool()
            target_location = self.mem_pool_host.get_dummy_flat_data_page()
        return target_location if self._read(key, self.flat_view(target_location)) else None

    def batch_get(self, keys: list[str], target_locations: Any = None, target_sizes: Any = None):
        targets = target_locations if target_locations is not None else [None] * len(keys)
        return [self.get(k, t) for k, t in zip(keys, targets, strict=True)]

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        if value is None:
            raise InvalidArgumentError("kv_agent HiCache storage: set() needs the page value")
        return self._write(key, self.flat_view(value), -1, _core.Hash128())

    def batch_set(
        self, keys: list[str], values: Any = None, target_locations: Any = None, target_sizes: Any = None
    ) -> bool:
        if values is None or len(values) != len(keys):
            raise InvalidArgumentError("kv_agent HiCache storage: batch_set() needs one value per key")
        return all(
            self._write(k, self.flat_view(v), -1, _core.Hash128()) for k, v in zip(keys, values, strict=True)
        )

    def exists(self, key: str) -> bool:
        return self.store.contains(self.store_key(key)) or self._spooled(key) is not None

    def batch_exists(self, keys: list[str], extra_info=None) -> int:
        for i, k in enumerate(keys):
            if not self.exists(k):
                return i
        return len(keys)

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info=None) -> list[bool]:
        """Reads each page straight into SGLang's host pool slots (``interface_v1``)."""
        P = self._require_pool()[2]
        self._check_indices(keys, host_indices, P)
        idx = host_indices[::P].tolist()
        out = []
        for k, i in zip(keys, idx, strict=True):
            ok = self._read(k, self.page_view(int(i)))
            out.append(ok)
            if not ok:  # SGLang uses the leading run of hits only
                out.extend([False] * (len(keys) - len(out)))
                break
        return out

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info=None) -> list[bool]:
        """Writes each page straight from SGLang's host pool slots (``interface_v1``)."""
        P = self._require_pool()[2]
        self._check_indices(keys, host_indices, P)
        idx = host_indices[::P].tolist()
        return [
            self._write(k, self.page_view(int(i)), pi, parent)
            for k, i, (pi, parent) in zip(keys, idx, self._placement(keys, extra_info), strict=True)
        ]

    @staticmethod
    def _check_indices(keys, host_indices, page_size):
        if host_indices.numel() != len(keys) * page_size:
            raise InvalidArgumentError(
                f"kv_agent HiCache storage: {host_indices.numel()} host indices for {len(keys)} pages of "
                f"{page_size}"
            )

    def clear(self) -> bool:
        """Deletes every page of this fingerprint and namespace (all shards)."""
        for info in self.store.list(model=self.fingerprint, ns=self.namespace, agent="sglang"):
            if info.meta.role == ROLE:
                with contextlib.suppress(NotFoundError):
                    self.store.delete(info.key)
        return True

    def get_stats(self):
        return self.store.stats()

    def close(self) -> None:
        """Flushes pending writes and closes the store. Idempotent."""
        if not self.store.closed:
            self.store.close()


def _main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m kv_agent.engines.sglang_storage")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fingerprint", help="print the weights fingerprint of a Hugging Face model directory")
    f.add_argument("model", help="model directory (config.json + safetensors), as given to --model-path")
    args = p.parse_args(argv)
    if args.cmd == "fingerprint":
        from kv_agent.engines.hf import HFEngine
        from kv_agent.models.loader import load_model

        model, tok = load_model(args.model)
        print(HFEngine(model, tok).weights_fingerprint().hex())
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
