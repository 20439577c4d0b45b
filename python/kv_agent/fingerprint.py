"""Model fingerprints and ModelSpecs for loaded transformers models.

KV is only valid for the exact weights that produced it, so every segment carries the
fingerprint of its model and every read checks it. The fingerprint hashes the model's config
and the bytes of every parameter and buffer (names, shapes, dtypes and values) with BLAKE2b; for
models over ``full_hash_limit`` bytes, each tensor contributes its shape, dtype and a strided
sample of about 64k values, which still separates any two checkpoints that differ in more
than a handful of weights (fine-tunes, merges, other quantisations) at a fraction of the cost.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from kv_agent import _core

FULL_HASH_LIMIT = 4 << 30
SAMPLE_VALUES = 1 << 16


def _tensor_bytes(t, sample: bool) -> memoryview:
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.reshape(-1)
    if sample and flat.numel() > SAMPLE_VALUES:
        step = flat.numel() // SAMPLE_VALUES
        flat = flat[::step].contiguous()
    if flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    return memoryview(np.ascontiguousarray(flat.numpy()).view(np.uint8))


def fingerprint_model(model) -> _core.Hash128:
    import torch

    h = hashlib.blake2b(digest_size=16)
    cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else {}
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation",
                     "_attn_implementation_internal", "use_cache"):
        cfg.pop(volatile, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    tensors = list(model.state_dict().items())
    total = sum(t.numel() * t.element_size() for _, t in tensors if isinstance(t, torch.Tensor))
    sample = total > FULL_HASH_LIMIT
    h.update(b"sampled" if sample else b"full")
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(_tensor_bytes(t, sample))
    d = h.digest()
    fp = _core.Hash128()
    fp.lo = int.from_bytes(d[:8], "little")
    fp.hi = int.from_bytes(d[8:], "little")
    return fp


def torch_dtype_to_kv(dtype) -> _core.DType:
    import torch

    return {torch.float32: _core.DType.f32, torch.float16: _core.DType.f16,
            torch.bfloat16: _core.DType.bf16}[dtype]


def model_spec_for_engine(engine, fingerprint: _core.Hash128 | None = None, name: str = "") -> _core.ModelSpec:
    """The ModelSpec of an HFEngine's model: geometry, per-layer RoPE and sliding windows."""
    spec = _core.ModelSpec()
    spec.name = name or str(getattr(engine.config, "_name_or_path", "") or engine.model_type)
    spec.num_layers = engine.num_layers
    spec.num_q_heads = engine.num_q_heads
    spec.num_kv_heads = engine.num_kv_heads
    spec.head_dim = engine.head_dim
    spec.kv_dtype = torch_dtype_to_kv(engine.dtype)
    spec.attn_scale = float(engine.attn_scale)
    layers = []
    for i in range(engine.num_layers):
        ls = _core.LayerSpec()
        ls.sliding_window = int(engine.windows[i])
        ls.rope = engine.rope_specs[i]
        layers.append(ls)
    spec.layers = layers
    spec.fingerprint = fingerprint if fingerprint is not None else fingerprint_model(engine.model)
    spec.validate()
    return spec
