"""Model loading and chat formatting for the transformers engine."""

from kv_agent.models.chat import encode_gemma, gemma_prompt, gemma_turn, newline_token_ids, qa_prompt
from kv_agent.models.loader import (
    DEFAULT_MODEL_NAME,
    NAMED_MODELS,
    cache_root,
    convert_gguf,
    default_gguf_path,
    load_default_model,
    load_model,
    load_named_model,
    named_gguf_path,
    offline,
)

__all__ = [
    "DEFAULT_MODEL_NAME",
    "cache_root",
    "convert_gguf",
    "default_gguf_path",
    "encode_gemma",
    "gemma_prompt",
    "gemma_turn",
    "NAMED_MODELS",
    "load_default_model",
    "load_named_model",
    "named_gguf_path",
    "load_model",
    "newline_token_ids",
    "offline",
    "qa_prompt",
]
