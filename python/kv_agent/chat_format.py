"""Chat formats, split into the pieces kv-agent stores separately.

A conversation is laid out as

    [prefix: BOS + system text]  [turn: user + assistant] ...  [query: user + assistant cue]

Each piece is tokenized on its own (so its KV can be stored and reused on its own) and the
concatenation equals the model's usual chat layout. Formats: Gemma (`<start_of_turn>`),
ChatML (Qwen2/Qwen3: `<|im_start|>`) and Llama 3 (`<|start_header_id|>`); a plain format for
base models.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatFormat:
    name: str
    system: str  # "{system}" placeholder
    user: str  # "{text}"
    assistant: str  # "{text}"
    assistant_cue: str
    stop_strings: tuple[str, ...] = ()
    query_template: str | None = None  # "{text}"; None = user turn + assistant cue
    stop_at_newline: bool = False  # one-line answers (base models keep writing turns otherwise)

    def prefix(self, system_prompt: str) -> str:
        return self.system.format(system=system_prompt) if system_prompt else ""

    def turn(self, user: str | None, assistant: str | None) -> str:
        out = ""
        if user is not None:
            out += self.user.format(text=user)
        if assistant is not None:
            out += self.assistant.format(text=assistant)
        return out

    def query(self, user: str) -> str:
        if self.query_template is not None:
            return self.query_template.format(text=user)
        return self.user.format(text=user) + self.assistant_cue


GEMMA = ChatFormat(
    name="gemma",
    # Gemma has no system role; the system text is its own user turn acknowledged by the model.
    system="<start_of_turn>user\n{system}<end_of_turn>\n<start_of_turn>model\nUnderstood.<end_of_turn>\n",
    user="<start_of_turn>user\n{text}<end_of_turn>\n",
    assistant="<start_of_turn>model\n{text}<end_of_turn>\n",
    assistant_cue="<start_of_turn>model\n",
    stop_strings=("<end_of_turn>",),
)
CHATML = ChatFormat(
    name="chatml",
    system="<|im_start|>system\n{system}<|im_end|>\n",
    user="<|im_start|>user\n{text}<|im_end|>\n",
    assistant="<|im_start|>assistant\n{text}<|im_end|>\n",
    assistant_cue="<|im_start|>assistant\n",
    stop_strings=("<|im_end|>",),
)
LLAMA3 = ChatFormat(
    name="llama3",
    system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>",
    assistant="<|start_header_id|>assistant<|end_header_id|>\n\n{text}<|eot_id|>",
    assistant_cue="<|start_header_id|>assistant<|end_header_id|>\n\n",
    stop_strings=("<|eot_id|>",),
)
# Base (pretrained) models have no chat turns: remembered exchanges are plain "User:/Assistant:"
# lines and a query is a "Question: ... Answer:" completion, answered on one line. The embedded
# default model (Gemma 3 270M from PyPI) is such a base model.
PLAIN = ChatFormat(
    name="plain",
    system="{system}\n\n",
    user="User: {text}\n",
    assistant="Assistant: {text}\n",
    assistant_cue="Assistant:",
    stop_strings=("\nUser:",),
    query_template="Question: {text}\nAnswer:",
    stop_at_newline=True,
)


def _has_token(tokenizer, token: str) -> bool:
    if tokenizer is None:
        return False
    tid = tokenizer.convert_tokens_to_ids(token)
    return isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None)


def format_for(model_type: str, tokenizer=None) -> ChatFormat:
    """The chat format of a model: PLAIN for base models (a tokenizer without a chat template),
    else the turn markers its tokenizer knows."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return PLAIN
    if model_type.startswith("gemma") or _has_token(tokenizer, "<start_of_turn>"):
        return GEMMA
    if _has_token(tokenizer, "<|im_start|>"):
        return CHATML
    if _has_token(tokenizer, "<|start_header_id|>"):
        return LLAMA3
    return PLAIN
