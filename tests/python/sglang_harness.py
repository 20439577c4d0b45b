"""SGLang's own HiCache objects on the CPU, for the storage-backend tests (needs .venv-sglang).

Builds SGLang 0.5.23's real device KV pool, paged allocator, host pool and ``HiCacheController``
(with its prefetch/backup threads) around a kv-agent backend loaded the way the server loads it
(``--hicache-storage-backend dynamic`` + extra config). The only part played here is the
scheduler's: allocating host slots for a prefetch hit and handing the operation back to the
controller, as ``UnifiedRadixCache`` does. Also runnable as a script for the restart test:
``python sglang_harness.py write|read CONFIG_JSON``.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import torch
from sglang.srt.managers.cache_controller import HiCacheController
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
from sglang.srt.mem_cache.utils import get_storage_hash_str
from sglang.srt.runtime_context import get_parallel

# What SGLang's launcher publishes for a one-process, one-GPU server (tp = pp = 1, no DCP): the
# controller reads these widths and ranks when it attaches a storage backend.
get_parallel().override_permanently(
    attn_dcp_size=1, attn_dcp_rank=0, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1
)

BACKEND = {
    "backend_name": "kv_agent",
    "module_path": "kv_agent.engines.sglang_storage",
    "class_name": "KvAgentHiCacheStorage",
}
FINGERPRINT = "0123456789abcdef0123456789abcdef"


class Harness:
    """One SGLang HiCache stack: device pool -> host pool -> controller -> kv-agent backend."""

    def __init__(
        self,
        *,
        layers=2,
        heads=2,
        head_dim=8,
        page_size=4,
        tokens=256,
        dtype=torch.bfloat16,
        layout="layer_first",
        extra: dict | None = None,
        model_name="kv-agent-test",
    ):
        self.page_size = page_size
        self.device_pool = MHATokenToKVPool(
            tokens, page_size, dtype, heads, head_dim, layers, "cpu", False, start_layer=0, end_layer=layers
        )
        self.allocator = PagedTokenToKVPoolAllocator(tokens, page_size, dtype, "cpu", self.device_pool, False)
        self.host_pool = MHATokenToKVPoolHost(
            self.device_pool._mha_buffer_info(),
            2.0,
            0,
            page_size,
            layout,
            pin_memory=False,
            device="cpu",
            device_capacity_tokens=tokens,
            start_layer=0,
            end_layer=layers,
        )
        config = {**BACKEND, "model_fingerprint": FINGERPRINT, **(extra or {})}
        self.controller = HiCacheController(
            self.allocator,
            self.host_pool,
            page_size,
            None,
            threading.Event(),
            write_policy="write_through",
            io_backend="direct",
            storage_backend="dynamic",
            model_name=model_name,
            storage_backend_extra_config=config,
        )
        self.backend = self.controller.storage_backend

    def close(self):
        self.controller.detach_storage_backend()

    def page_hashes(self, token_ids):
        return get_storage_hash_str(token_ids, None, page_size=self.page_size)

    def fill(self, token_ids, seed: int):
        """Host slots holding seeded random KV for ``token_ids`` (as a device->host backup would)."""
        idx = self.host_pool.alloc(len(token_ids))
        g = torch.Generator().manual_seed(seed)
        buf = self.host_pool.kv_buffer
        for p in range(0, len(token_ids), self.page_size):
            view = self.backend.page_view(int(idx[p]))
            view.copy_(torch.randn(view.shape, generator=g).to(buf.dtype))
        return idx

    def pages(self, idx):
        return [self.backend.page_view(int(idx[p])).clone() for p in range(0, len(idx), self.page_size)]

    def backup(self, idx, token_ids, timeout=60.0) -> int:
        """SGLang's write_storage -> backup thread -> backend; returns the tokens written."""
        self.controller.write_storage(idx, token_ids, hash_value=self.page_hashes(token_ids))
        op = self.controller.ack_backup_queue.get(timeout=timeout)
        return op.completed_tokens

    def prefetch(self, token_ids, rid="r", timeout=60.0):
        """SGLang's prefetch: hit query (batch_exists) then page transfer into fresh host slots.
        Returns (hit tokens, loaded tokens, host indices)."""
        cc = self.controller
        op = cc.prefetch(rid, list(token_ids))
        op = cc.prefetch_hit_queue.get(timeout=timeout)
        hit = op.storage_hit_count
        if hit == 0:
            return 0, 0, None
        op.host_indices = self.host_pool.alloc(hit)
        cc.prefetch_buffer.put(op)
        deadline, done = time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            ack = cc.ack_prefetch_queue.get(timeout=timeout)
            if ack.completed_tokens is not None:
                done = ack.completed_tokens
            if ack.completed_req:
                return hit, done, op.host_indices
        raise TimeoutError("prefetch did not complete")


def _script(argv):
    mode, cfg = argv[0], json.loads(argv[1])
    h = Harness(layout=cfg["layout"], extra=cfg["extra"])
    ids = cfg["tokens"]
    try:
        if mode == "write":
            idx = h.fill(ids, seed=cfg["seed"])
            written = h.backup(idx, ids)
            torch.save(h.pages(idx), cfg["expect"])
            print(json.dumps({"written": written}))
        else:
            hit, loaded, idx = h.prefetch(ids)
            same = idx is not None and all(
                torch.equal(a, b) for a, b in zip(h.pages(idx), torch.load(cfg["expect"]), strict=False)
            )
            print(json.dumps({"hit": hit, "loaded": loaded, "same": same}))
    finally:
        h.close()


if __name__ == "__main__":
    _script(sys.argv[1:])
