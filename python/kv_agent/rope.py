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

import math
from typing import Any

import numpy as np

from kv_agent import _core
from kv_agent._core import RopeScaling, RopeSpec, RopeStyle
from kv_agent.errors import InvalidArgumentError, UnimplementedError

__all__ = [
    "SUPPORTED_ROPE_TYPES",
    "apply",
    "attention_factor",
    "inv_freq",
    "layer_rope_specs",
    "reposition",
    "rope_spec_from_hf",
]

#: HF ``rope_type`` values this module implements.
SUPPORTED_ROPE_TYPES: tuple[str, ...] = tuple(_core.rope_supported_types())

_SCALING = {
    "default": RopeScaling.none,
    "linear": RopeScaling.linear,
    "llama3": RopeScaling.llama3,
    "yarn": RopeScaling.yarn,
    "dynamic": RopeScaling.dynamic,
}

# Models whose rotary embedding rotates adjacent pairs (GPT-J style, `rotate_every_two`).
_INTERLEAVED_MODEL_TYPES = frozenset({"gptj", "codegen"})


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


def _head_dim(config: Any) -> int:
    hd = getattr(config, "head_dim", None)
    if hd:
        return int(hd)
    return int(config.hidden_size // config.num_attention_heads)


def _rope_params(config: Any, layer_type: str | None) -> dict:
    params = getattr(config, "rope_parameters", None)
    if params is None:
        # Legacy configs: rope_theta + rope_scaling (transformers < 5).
        params = dict(getattr(config, "rope_scaling", None) or {})
        theta = getattr(config, "rope_theta", None)
        if theta is not None:
            params.setdefault("rope_theta", theta)
    else:
        params = dict(params)
    per_layer = bool(params) and all(isinstance(v, dict) for v in params.values())
    if per_layer:
        if layer_type is None:
            raise InvalidArgumentError(
                f"rope: config has per-layer-type RoPE parameters {sorted(params)}; pass layer_type"
            )
        if layer_type not in params:
            raise InvalidArgumentError(f"rope: layer_type {layer_type!r} not in {sorted(params)}")
        params = dict(params[layer_type])
    elif layer_type is not None and params.get(layer_type) is not None:
        params = dict(params[layer_type])
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    if "rope_theta" not in params:
        theta = getattr(config, "rope_theta", None)
        params["rope_theta"] = theta if theta is not None else getattr(config, "default_theta", 10000.0)
    return params


def rope_spec_from_hf(
    config: Any, layer_type: str | None = None, *, dynamic_max_position: int | None = None
) -> RopeSpec:
    """The RopeSpec of a transformers ``PretrainedConfig`` (one layer type).

    Reads ``rope_parameters`` (transformers 5.x; per layer type such as Gemma 3's
    ``{"full_attention": ..., "sliding_attention": ...}`` when ``layer_type`` is given) or the
    legacy ``rope_theta``/``rope_scaling``, plus ``partial_rotary_factor`` / ``rotary_pct`` /
    ``rotary_dim`` and ``head_dim``. GPT-J-style models (model_type gptj, codegen) rotate
    interleaved pairs; all others half-split.

    ``dynamic`` NTK is defined here at a fixed sequence length: ``dynamic_max_position``
    (default ``config.max_position_embeddings``, where HF's dynamic base equals the plain one).

    Raises UnimplementedError for a rope_type outside :data:`SUPPORTED_ROPE_TYPES`.
    """
    params = _rope_params(config, layer_type)
    rope_type = params.get("rope_type", "default") or "default"
    if rope_type not in _SCALING:
        raise UnimplementedError(
            f"rope: rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    head_dim = _head_dim(config)
    spec = RopeSpec()
    spec.theta = float(params["rope_theta"])
    spec.scaling = _SCALING[rope_type]
    model_type = getattr(config, "model_type", "")
    spec.style = RopeStyle.interleaved if model_type in _INTERLEAVED_MODEL_TYPES else RopeStyle.half_split

    prf = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if prf is None:
        prf = getattr(config, "rotary_pct", None)
    rotary_dim = getattr(config, "rotary_dim", None) if model_type in _INTERLEAVED_MODEL_TYPES else None
    if rotary_dim:
        spec.rotary_dim = int(rotary_dim)
    elif prf is not None and float(prf) != 1.0:
        spec.rotary_dim = int(head_dim * float(prf))
    else:
        spec.rotary_dim = 0

    max_pos = getattr(config, "max_position_embeddings", None)
    orig = params.get("original_max_position_embeddings")
    factor = params.get("factor")
    if rope_type in ("linear", "llama3", "dynamic"):
        spec.factor = float(factor)
    if rope_type == "llama3":
        spec.low_freq_factor = float(params["low_freq_factor"])
        spec.high_freq_factor = float(params["high_freq_factor"])
        spec.original_max_position = int(orig)
    elif rope_type == "yarn":
        orig = int(orig if orig is not None else max_pos)
        if factor is None:
            factor = max_pos / orig
        spec.factor = float(factor)
        spec.original_max_position = orig
        spec.beta_fast = float(params.get("beta_fast") or 32.0)
        spec.beta_slow = float(params.get("beta_slow") or 1.0)
        if params.get("truncate", True) is False:
            raise UnimplementedError("rope: yarn with truncate=False is not supported")
        af = params.get("attention_factor")
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if af is None and mscale and mscale_all_dim:

            def get_mscale(scale: float, m: float = 1.0) -> float:
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

            af = get_mscale(spec.factor, mscale) / get_mscale(spec.factor, mscale_all_dim)
        spec.attention_factor = float(af) if af is not None else 0.0
    elif rope_type == "dynamic":
        # HF's dynamic NTK rescales relative to max_position_embeddings.
        spec.original_max_position = int(max_pos)
        spec.dynamic_max_position = int(dynamic_max_position if dynamic_max_position is not None else max_pos)
    _core.rope_validate(spec, head_dim)
    return spec


def layer_rope_specs(config: Any, *, dynamic_max_position: int | None = None) -> list[RopeSpec]:
    """One RopeSpec per decoder layer (``config.layer_types`` picks per-layer-type parameters)."""
    layer_types = getattr(config, "layer_types", None)
    params = getattr(config, "rope_parameters", None) or {}
    per_type = bool(params) and all(isinstance(v, dict) for v in params.values())
    n = int(config.num_hidden_layers)
    if per_type and layer_types:
        return [
            rope_spec_from_hf(config, lt, dynamic_max_position=dynamic_max_position) for lt in layer_types
        ]
    spec = rope_spec_from_hf(config, dynamic_max_position=dynamic_max_position)
    return [spec for _ in range(n)]
