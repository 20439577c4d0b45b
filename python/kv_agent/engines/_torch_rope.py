"""Private stand-in for ``kv_agent.rope`` (the C++ positioner) until it is available.

Same contract subset: ``apply(x, positions, rope, head_dim, inverse=False)`` for half-split RoPE
without scaling or with linear scaling, angles computed in float64 from integer positions, and
``rope_spec_from_hf(config, layer_type)``. hf.py only uses it when ``kv_agent.rope`` is missing.
"""

from __future__ import annotations

import numpy as np
import torch

import kv_agent


def _params(config, layer_type):
    rp = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(rp.get(layer_type), dict):
        rp = rp[layer_type]
    return rp


def rope_spec_from_hf(config, layer_type=None):
    rp = _params(config, layer_type)
    spec = kv_agent.RopeSpec()
    spec.theta = float(rp.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    spec.rotary_dim = int(head_dim * float(rp.get("partial_rotary_factor", 1.0)))
    kind = rp.get("rope_type", "default")
    if kind == "linear":
        spec.scaling = kv_agent.RopeScaling.linear
        spec.factor = float(rp["factor"])
    elif kind != "default":
        raise NotImplementedError(f"torch stand-in positioner: rope_type {kind!r}")
    return spec


def apply(x, positions, rope, head_dim, inverse=False):
    was_np = isinstance(x, np.ndarray)
    t = torch.as_tensor(x)
    if not rope.enabled:
        return t.clone() if not was_np else np.array(x)
    rd = rope.rotary_dim or head_dim
    pos = torch.as_tensor(np.asarray(positions), dtype=torch.float64)
    if rope.scaling == kv_agent.RopeScaling.linear:
        pos = pos / rope.factor
    inv = 1.0 / (rope.theta ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd))
    ang = pos[:, None] * inv[None, :]
    cos, sin = torch.cos(ang), torch.sin(ang)
    if inverse:
        sin = -sin
    xf = t.to(torch.float64)
    a, b, rest = xf[..., : rd // 2], xf[..., rd // 2: rd], xf[..., rd:]
    out = torch.cat([a * cos - b * sin, b * cos + a * sin, rest], dim=-1).to(t.dtype)
    return out.numpy() if was_np else out
