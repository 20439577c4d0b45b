"""Positioner: rotary position embedding (RoPE) of keys, in the model's own numerics.

Converts keys between pre-RoPE and post-RoPE at integer positions, and moves post-RoPE keys to
new positions in one rotation. The C++ core (``kvagent/rope.h``) does the work with the GIL
released; arrays cross without copies.

Arrays: numpy arrays or torch CPU tensors of float32, float16 or bfloat16 (torch; numpy has no
bfloat16), shape ``[..., tokens, head_dim]``. Inputs are read in place when their last
dimension is contiguous and their leading dimensions collapse into one stride (any
contiguous array, or a heads/tokens transpose); other layouts are copied once to a contiguous
array first. Results are new contiguous arrays of the input's type and dtype.

Positions: int64 (list, numpy or torch), one per token, ``|p| < 2**31``. Float positions are
rejected (bf16 or fp16 positions are wrong above 256 / 2048).

Errors: :class:`kv_agent.InvalidArgumentError` for wrong dtype, shape or positions,
:class:`kv_agent.UnimplementedError` for RoPE types outside :data:`SUPPORTED_ROPE_TYPES`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kv_agent import _core
from kv_agent._core import RopeScaling, RopeSpec, RopeStyle  # noqa: F401 (re-exported)
from kv_agent.errors import InvalidArgumentError

__all__ = [
    "SUPPORTED_ROPE_TYPES",
    "apply",
    "attention_factor",
    "inv_freq",
    "reposition",
]

#: HF ``rope_type`` values this module implements.
SUPPORTED_ROPE_TYPES: tuple[str, ...] = tuple(_core.rope_supported_types())


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "__dlpack__")


def _collapsible(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """True when the layout is one ViewOf in bindings/rope_py.cc accepts (strides in elements)."""
    if len(shape) < 2:
        return True
    if shape[-1] > 1 and strides[-1] != 1:
        return False
    expected = None
    count = 1
    for n, s in zip(reversed(shape[:-2]), reversed(strides[:-2]), strict=True):
        if n == 1:
            continue
        if expected is None:
            expected = s
        elif s != expected * count:
            return False
        count *= n
    return True


def _prepare(x: Any, head_dim: int) -> tuple[Any, Any]:
    """Returns (input usable without copy, new output array of the same type/dtype/shape)."""
    if _is_torch(x):
        import torch

        if x.device.type != "cpu":
            raise InvalidArgumentError(f"rope: tensor must be on the CPU, got {x.device}")
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise InvalidArgumentError(f"rope: dtype must be float32, float16 or bfloat16, got {x.dtype}")
        x = x.detach()
        if x.dim() < 2 or x.shape[-1] != head_dim:
            raise InvalidArgumentError(
                f"rope: x must have shape [..., tokens, {head_dim}], got {tuple(x.shape)}"
            )
        if not _collapsible(tuple(x.shape), tuple(x.stride())):
            x = x.contiguous()
        return x, torch.empty(x.shape, dtype=x.dtype)
    if isinstance(x, np.ndarray):
        if x.dtype not in (np.float32, np.float16):
            raise InvalidArgumentError(f"rope: dtype must be float32 or float16 (numpy), got {x.dtype}")
        if x.ndim < 2 or x.shape[-1] != head_dim:
            raise InvalidArgumentError(f"rope: x must have shape [..., tokens, {head_dim}], got {x.shape}")
        strides = tuple(s // x.itemsize for s in x.strides)
        if any(s % x.itemsize for s in x.strides) or not _collapsible(x.shape, strides):
            x = np.ascontiguousarray(x)
        return x, np.empty(x.shape, dtype=x.dtype)
    raise InvalidArgumentError(f"rope: x must be a numpy array or a torch CPU tensor, got {type(x).__name__}")


def _positions(p: Any, tokens: int, what: str) -> np.ndarray:
    if _is_torch(p):
        if p.is_floating_point() or p.is_complex():
            raise InvalidArgumentError(f"rope: {what} must be integers, got {p.dtype}")
        p = p.detach().cpu().numpy()
    arr = np.asarray(p)
    if arr.dtype.kind not in "iub" and arr.size:
        raise InvalidArgumentError(f"rope: {what} must be integers, got {arr.dtype}")
    arr = np.ascontiguousarray(arr.reshape(-1) if arr.ndim != 1 else arr, dtype=np.int64)
    if arr.ndim != 1 or arr.shape[0] != tokens:
        raise InvalidArgumentError(
            f"rope: {what} must have one entry per token ({tokens}), got {arr.shape[0]}"
        )
    return arr


def apply(x: Any, positions: Any, rope: RopeSpec, head_dim: int, inverse: bool = False) -> Any:
    """Rotates ``x`` [..., T, head_dim] at ``positions`` (length T) and returns a new array.

    ``inverse=False``: pre-RoPE -> post-RoPE (YaRN attention factor applied once).
    ``inverse=True``: post-RoPE -> pre-RoPE (the factor divided out once).
    """
    x, out = _prepare(x, head_dim)
    pos = _positions(positions, x.shape[-2], "positions")
    _core.rope_apply_into(x, out, pos, rope, head_dim, inverse)
    return out


def reposition(x: Any, from_positions: Any, to_positions: Any, rope: RopeSpec, head_dim: int) -> Any:
    """Post-RoPE keys at ``from_positions`` -> post-RoPE at ``to_positions`` (one rotation by
    the integer difference; never chained). Returns a new array."""
    x, out = _prepare(x, head_dim)
    tokens = x.shape[-2]
    f = _positions(from_positions, tokens, "from_positions")
    t = _positions(to_positions, tokens, "to_positions")
    _core.rope_reposition_into(x, out, f, t, rope, head_dim)
    return out


def inv_freq(rope: RopeSpec, head_dim: int) -> np.ndarray:
    """The float32 inverse frequencies used for ``rope`` (``rotary_dim // 2`` values)."""
    return np.asarray(_core.rope_inv_freq(rope, head_dim), dtype=np.float32)


def attention_factor(rope: RopeSpec) -> float:
    """The factor multiplying cos/sin in the forward direction (YaRN mscale; 1 otherwise)."""
    return _core.rope_attention_factor(rope)


def __getattr__(name: str):
    # The transformers config readers live with the HF adapter (kv_agent.engines.hf_config);
    # the old names keep working without importing the adapter for every user of this module.
    if name in ("rope_spec_from_hf", "layer_rope_specs"):
        from kv_agent.engines import hf_config

        return getattr(hf_config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
