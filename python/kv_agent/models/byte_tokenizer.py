"""A byte-level tokenizer with the small part of the transformers tokenizer API kv-agent uses:
random-weight models (tests, the GPU timing benchmarks) need a real tokenizer and no download."""

from __future__ import annotations


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
        return bytes(i - self.offset for i in ids if self.offset <= i < self.vocab_size).decode(
            "utf-8", errors="replace")  # ids past the byte range (a larger model vocabulary) decode to nothing

    def convert_tokens_to_ids(self, token):
        return self.unk_token_id
