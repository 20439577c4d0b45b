"""GPU KV path: device-resident segments and fused canonical <-> engine cache moves.

A :class:`~kv_agent.store.Store` opened with ``device_capacity_bytes > 0`` keeps a device tier;
``store.get_device(key, model)`` returns a :class:`DeviceSegment` whose ``kv()`` / ``k()`` /
``v()`` are CUDA torch tensors over the resident payload (DLPack, ``kDLCUDA``, no copy; they
keep the bytes alive). ``torch.from_dlpack(device_segment)`` works too.

:func:`load` moves a canonical segment (``[layers, 2, kv_heads, tokens, head_dim]``: a
DeviceSegment or a CUDA tensor) into an engine's per-layer caches with RoPE re-positioning
fused into the copy; :func:`save` does the reverse (capture). Layouts, per layer:

- ``"token_major"`` ``[tokens, kv_heads, head_dim]``
- ``"head_major"`` ``[kv_heads, tokens, head_dim]`` (transformers' cache at one batch entry)
- ``"paged"`` ``[num_blocks, block_size, kv_heads, head_dim]`` (vLLM; K and V separate)
- ``"paged_fused"`` ``[2, num_blocks, block_size, kv_heads, head_dim]`` (``v_cache=None``)

Moved row ``r`` is segment token ``token_begin + r``; it goes to engine slot ``slots[r]``
(or ``slots + r`` for an int, default 0; slots outside the cache are skipped) and its key is
rotated to ``new_positions[r]`` (or ``new_positions + r``). Rotations: ``"none"`` (bit-exact
copy), ``"apply"`` (pre-RoPE -> rotated), ``"inverse"``, ``"shift"`` (rotated at
``old_positions`` -> rotated at ``new_positions``, one rotation by the exact difference). V and
non-rotary dims are always copied bit-exactly.

Streams: work is enqueued on ``stream`` (a ``cudaStream_t`` as int; default: torch's current
stream) and the call returns without waiting; the GIL is released while launching. A
DeviceSegment source records the use on that stream, so dropping it right after is safe.

Errors: :class:`~kv_agent.errors.UnavailableError` without CUDA in the build or without a
device (every function checks first); :class:`~kv_agent.errors.InvalidArgumentError` for a
wrong dtype, shape, device, layout or position range.
"""

from __future__ import annotations

from typing import Any

from kv_agent import _core
from kv_agent._core import CudaRopeTable, DeviceSegment

__all__ = [
    "CudaRopeTable",
    "DeviceSegment",
    "check",
    "current_stream",
    "install_pinned_host_allocator",
    "is_available",
    "load",
    "rope_table",
    "save",
]

_ROPE_TABLES: dict[str, CudaRopeTable] = {}


def is_available() -> bool:
    """True when the extension was built with CUDA and a device is usable."""
    return bool(_core.cuda_available())


def check() -> None:
    """Raises :class:`UnavailableError` naming why the GPU path cannot run here."""
    _core.cuda_check()


def install_pinned_host_allocator() -> None:
    """Makes host payload buffers pinned (full-speed host->device loads). Call once, early."""
    _core.cuda_install_pinned_host_allocator()


def rope_table(spec: Any) -> CudaRopeTable:
    """The device RoPE table of a :class:`ModelSpec`, built once per model fingerprint."""
    check()
    key = spec.fingerprint.hex() + ":" + spec.serialize().hex()
    table = _ROPE_TABLES.get(key)
    if table is None:
        table = _ROPE_TABLES[key] = CudaRopeTable(spec)
    return table


def current_stream(device: int | None = None) -> int:
    """torch's current CUDA stream as an int (0, the legacy default stream, without torch)."""
    try:
        import torch
    except ImportError:
        return 0
    if not torch.cuda.is_available():
        return 0
    return int(torch.cuda.current_stream(device).cuda_stream)


def _row(value: Any) -> tuple[Any, int]:
    if value is None:
        return None, 0
    if isinstance(value, int):
        return None, value
    return value, 0


def _move(
    save_dir: bool,
    canonical: Any,
    k_cache: Any,
    v_cache: Any = None,
    *,
    layout: str = "token_major",
    spec: Any = None,
    rope: CudaRopeTable | None = None,
    rotation: str = "none",
    slots: Any = None,
    new_positions: Any = None,
    old_positions: Any = None,
    token_begin: int = 0,
    num_tokens: int | None = None,
    layer_begin: int = 0,
    span_layer_begin: int = -1,
    stream: int | None = None,
) -> None:
    check()
    if rope is None and spec is not None and rotation != "none":
        rope = rope_table(spec)
    slot_arr, slot_base = _row(slots)
    new_arr, new_base = _row(new_positions)
    old_arr, old_base = _row(old_positions)
    if stream is None:
        device = getattr(canonical, "device", None)
        index = device if isinstance(device, int) else getattr(device, "index", None)
        stream = current_stream(index)
    _core._cuda_move(
        save_dir,
        canonical,
        list(k_cache),
        None if v_cache is None else list(v_cache),
        layout,
        rope=rope,
        rotation=rotation,
        slots=slot_arr,
        slot_base=slot_base,
        new_positions=new_arr,
        new_position_base=new_base,
        old_positions=old_arr,
        old_position_base=old_base,
        token_begin=token_begin,
        num_tokens=num_tokens,
        layer_begin=layer_begin,
        span_layer_begin=span_layer_begin,
        stream=stream,
    )


def load(src: Any, k_cache: Any, v_cache: Any = None, **options: Any) -> None:
    """Canonical segment ``src`` -> engine caches ``k_cache`` / ``v_cache`` (lists of per-layer
    CUDA tensors, one dtype, the segment's dtype).

    Options (keyword only): ``layout`` ("token_major"), ``spec`` (a ModelSpec) or ``rope`` (a
    CudaRopeTable), needed for a ``rotation`` other than "none"; ``slots``, ``new_positions``,
    ``old_positions`` (int base or CUDA int64 tensor); ``token_begin`` (0) and ``num_tokens``
    (the rest) of ``src``; ``layer_begin`` (model layer of ``k_cache[0]``, 0);
    ``span_layer_begin`` (layer of ``src`` paired with it; -1: ``src`` holds every layer);
    ``stream`` (default: torch's current stream). See the module docs.
    """
    _move(False, src, k_cache, v_cache, **options)


def save(dst: Any, k_cache: Any, v_cache: Any = None, **options: Any) -> None:
    """Engine caches -> canonical CUDA tensor ``dst`` ``[layers, 2, kv_heads, tokens, head_dim]``
    (e.g. capture a turn: ``rotation="inverse"`` with ``old_positions`` stores pre-RoPE keys).
    Row ``r`` reads engine slot ``slots[r]`` and writes token ``token_begin + r`` of ``dst``.
    Options as :func:`load`."""
    _move(True, dst, k_cache, v_cache, **options)
