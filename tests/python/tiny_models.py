"""Tiny random-weight models and a byte-level tokenizer for tests (no downloads)."""

from __future__ import annotations

import torch


class ByteTokenizer:
    """Byte-level tokenizer with the small part of the transformers tokenizer API kv-agent uses."""

    bos_token_id = 1
    eos_token_id = 2
    unk_token_id = 0
    offset = 3
    vocab_size = 256 + 3

    def __call__(self, text, add_special_tokens: bool = True):
        ids = [b + self.offset for b in text.encode("utf-8")]
        if add_special_tokens:
            ids = [self.bos_token_id] + ids
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens: bool = False):
        ids = [int(i) for i in ids]
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")

    def convert_tokens_to_ids(self, token):
        return self.unk_token_id


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()
