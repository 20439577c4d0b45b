"""The one prompt template every LoCoMo system uses.

    [prefix: instructions]            <- shared, cached once (a pinned segment for kv-memory)
    [context: one line per turn]      <- nothing / all turns / retrieved turns, original order
    [suffix: question + answer cue]   <- the new tokens of each question

Each context line carries its session date, the same way for every system.
"""

from __future__ import annotations

from dataclasses import dataclass

from kv_agent.bench.locomo import Conversation, Question, Turn

INSTRUCTIONS = (
    "Below are excerpts from a long conversation between {a} and {b}, one message per line, "
    "each with the date it was sent. Use them to answer the question at the end with a short "
    "phrase. If the excerpts do not contain the answer, reply \"Not mentioned in the conversation\"."
)


def short_date(date_time: str) -> str:
    """'1:56 pm on 8 May, 2023' -> '8 May, 2023' (the time of day rarely matters and costs tokens)."""
    return date_time.split(" on ", 1)[1] if " on " in date_time else date_time


@dataclass(frozen=True)
class LocomoTemplate:
    """Completion-style by default: the default model (Gemma 3 270M from PyPI) is the pretrained
    base model, not the instruction-tuned one, so a plain "Question: ... Answer:" cue works better
    than chat turns. Instruction-tuned models can pass their turn markers here."""

    start_user: str = ""
    end_user: str = ""

    def prefix(self, conv: Conversation) -> str:
        return self.start_user + INSTRUCTIONS.format(a=conv.speaker_a, b=conv.speaker_b) + "\n\n"

    @staticmethod
    def line(turn: Turn) -> str:
        return f"[{short_date(turn.date_time)}] {turn.speaker}: {turn.text}\n"

    def suffix(self, q: Question) -> str:
        return f"\nQuestion: {q.question}\n" + self.end_user + "Short answer:"

    @staticmethod
    def clean_answer(text: str) -> str:
        text = text.strip()
        return text.splitlines()[0].strip() if text else ""
