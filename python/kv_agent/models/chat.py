"""Gemma 3 turn format (the GGUF tokenizer carries no chat template, so we apply it ourselves)."""

from __future__ import annotations

from collections.abc import Sequence

from kv_agent.errors import InvalidArgumentError

START = "<start_of_turn>"
END = "<end_of_turn>"


def gemma_turn(role: str, text: str) -> str:
    """One turn: ``<start_of_turn>{role}\\n{text}<end_of_turn>\\n``; role is "user" or "model"."""
    if role not in ("user", "model"):
        raise InvalidArgumentError(f"Gemma turn role must be 'user' or 'model', got {role!r}")
    return f"{START}{role}\n{text}{END}\n"


def gemma_prompt(
    messages: Sequence[tuple[str, str]] | str, add_generation_prompt: bool = True, system: str | None = None
) -> str:
    """Formats a conversation as Gemma 3 expects, without the BOS token (the tokenizer adds it).

    ``messages`` is a user string or a list of (role, text) with roles "user"/"model"
    ("assistant" is accepted as "model"). Gemma has no system role: a system text is prepended
    to the first user turn, as Gemma's own template does.
    """
    if isinstance(messages, str):
        messages = [("user", messages)]
    out = []
    for i, (role, text) in enumerate(messages):
        role = "model" if role == "assistant" else role
        if i == 0 and system:
            text = f"{system}\n\n{text}"
        out.append(gemma_turn(role, text))
    if add_generation_prompt:
        out.append(f"{START}model\n")
    return "".join(out)


def encode_gemma(
    tokenizer, messages, add_generation_prompt: bool = True, system: str | None = None, add_bos: bool = True
) -> list[int]:
    """Token ids of :func:`gemma_prompt`, with exactly one BOS at the start when ``add_bos``."""
    ids = tokenizer(gemma_prompt(messages, add_generation_prompt, system), add_special_tokens=False)[
        "input_ids"
    ]
    if add_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def qa_prompt(question: str, context: str | None = None) -> str:
    """Plain question/answer prompt for base (pretrained, not instruction-tuned) checkpoints.

    The embedded default GGUF is the *pretrained* Gemma 3 270M: it ignores the turn format
    (it echoes the question) but completes ``Question: ...\\nAnswer:`` well. ``context`` (e.g.
    remembered facts) goes before the question. Stop decoding at a newline.
    """
    head = f"{context.rstrip()}\n\n" if context else ""
    return f"{head}Question: {question.strip()}\nAnswer:"


def newline_token_ids(tokenizer) -> list[int]:
    """Ids of tokens that are only newlines (stop tokens for :func:`qa_prompt`)."""
    out = []
    for tok in ("\n", "\n\n", "\n\n\n"):
        ids = tokenizer(tok, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            out.append(ids[0])
    return out


def stop_token_ids(engine, tokenizer, at_newline: bool) -> list[int]:
    """Generation stops: the engine's end-of-sequence ids, plus newline-only tokens when answers
    are one line (completion-style prompts)."""
    ids = list(engine.default_eos_ids())
    if at_newline:
        ids += [i for i in newline_token_ids(tokenizer) if i not in ids]
    return ids
