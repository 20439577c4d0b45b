"""Transformers config -> kv_agent RopeSpec: the HF-specific half of the positioner.

Reads a transformers ``PretrainedConfig`` (``rope_parameters`` in transformers 5.x, per layer type
for Gemma 3; the legacy ``rope_theta``/``rope_scaling``; ``partial_rotary_factor`` /
``rotary_pct`` / ``rotary_dim``; ``head_dim``) into the engine-neutral :class:`RopeSpec` the C++
positioner uses. Other engines map their own configuration to the same RopeSpec.
``kv_agent.rope.rope_spec_from_hf`` / ``layer_rope_specs`` re-export these for older imports.
"""

from __future__ import annotations

import math
from typing import Any

from kv_agent import _core
from kv_agent._core import RopeScaling, RopeSpec, RopeStyle
from kv_agent.errors import InvalidArgumentError, UnimplementedError
from kv_agent.rope import SUPPORTED_ROPE_TYPES

__all__ = ["layer_rope_specs", "rope_spec_from_hf"]

_SCALING = {
    "default": RopeScaling.none,
    "linear": RopeScaling.linear,
    "llama3": RopeScaling.llama3,
    "yarn": RopeScaling.yarn,
    "dynamic": RopeScaling.dynamic,
}

# Models whose rotary embedding rotates adjacent pairs (GPT-J style, `rotate_every_two`).
_INTERLEAVED_MODEL_TYPES = frozenset({"gptj", "codegen"})


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
