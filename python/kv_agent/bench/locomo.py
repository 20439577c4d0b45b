"""LoCoMo data access: conversations, turns, questions and normalised evidence ids.

The data lives outside the repository (``../shared/data/locomo/locomo10_dev.json`` by default;
see its README for the schema and scoring rules). Nothing here copies or downloads it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from kv_agent.errors import NotFoundError

DEFAULT_LOCOMO_PATH = Path(
    os.environ.get("KVAGENT_LOCOMO")
    or Path(__file__).resolve().parents[3].parent / "shared" / "data" / "locomo" / "locomo10_dev.json"
)

CATEGORY_NAMES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}


@dataclass(frozen=True)
class Turn:
    dia_id: str  # normalised "D<session>:<turn>"
    session: int
    index: int  # turn number within the session (1-based, as in dia_id)
    speaker: str
    text: str  # the utterance, with the image caption appended when the turn shares a photo
    date_time: str  # the session's date string, e.g. "1:56 pm on 8 May, 2023"


@dataclass(frozen=True)
class Question:
    qid: str  # "<sample_id>/q<index>"
    question: str
    answer: str  # category 5 uses adversarial_answer; integers cast to str
    category: int
    evidence: tuple[str, ...]  # normalised dia_ids that exist in the conversation


@dataclass
class Conversation:
    sample_id: str
    speaker_a: str
    speaker_b: str
    sessions: dict[int, str] = field(default_factory=dict)  # session number -> date string
    turns: list[Turn] = field(default_factory=list)
    questions: list[Question] = field(default_factory=list)

    def turn_by_id(self) -> dict[str, Turn]:
        return {t.dia_id: t for t in self.turns}


_DIA_RE = re.compile(r"D\s*:?\s*(\d+)\s*:\s*(\d+)")


def normalize_evidence(raw: list | str | None) -> list[str]:
    """Normalises LoCoMo evidence labels.

    Strings may hold several ids separated by ';', ',' or spaces; ``D:11:26`` means ``D11:26``
    and ``D30:05`` means ``D30:5``. Returns ids in their first-seen order without duplicates.
    """
    if raw is None:
        return []
    items = raw if isinstance(raw, list) else [raw]
    out: list[str] = []
    for item in items:
        for m in _DIA_RE.finditer(str(item)):
            dia = f"D{int(m.group(1))}:{int(m.group(2))}"
            if dia not in out:
                out.append(dia)
    return out


def turn_text(turn: dict) -> str:
    text = str(turn.get("text", "")).strip()
    caption = turn.get("blip_caption")
    if caption:
        text = f"{text} [shares a photo: {caption}]".strip()
    return text


def load_locomo(path: str | os.PathLike | None = None) -> list[Conversation]:
    """Loads every conversation of the LoCoMo file at ``path`` (default: the shared dev split)."""
    p = Path(path) if path is not None else DEFAULT_LOCOMO_PATH
    if not p.exists():
        raise NotFoundError(
            f"LoCoMo data not found at {p}; pass --locomo PATH (the dev split lives in ../shared/data/locomo/)"
        )
    with open(p, encoding="utf-8") as f:
        raw = json.load(f)
    convs: list[Conversation] = []
    for rec in raw:
        c = rec["conversation"]
        conv = Conversation(sample_id=rec["sample_id"], speaker_a=c["speaker_a"], speaker_b=c["speaker_b"])
        session_ids = sorted(
            int(k.split("_")[1]) for k in c if re.fullmatch(r"session_\d+", k) and isinstance(c[k], list)
        )
        for s in session_ids:
            date = str(c.get(f"session_{s}_date_time", ""))
            conv.sessions[s] = date
            for i, t in enumerate(c[f"session_{s}"], start=1):
                ids = normalize_evidence(t.get("dia_id", f"D{s}:{i}"))
                dia = ids[0] if ids else f"D{s}:{i}"
                conv.turns.append(
                    Turn(dia_id=dia, session=s, index=int(dia.split(":")[1]), speaker=t["speaker"],
                         text=turn_text(t), date_time=date)
                )
        known = {t.dia_id for t in conv.turns}
        for qi, q in enumerate(rec["qa"]):
            cat = int(q["category"])
            ans = q.get("answer", q.get("adversarial_answer", ""))
            if cat == 5 and "answer" not in q:
                ans = q.get("adversarial_answer", "")
            ev = tuple(e for e in normalize_evidence(q.get("evidence")) if e in known)
            conv.questions.append(
                Question(qid=f"{conv.sample_id}/q{qi}", question=str(q["question"]), answer=str(ans),
                         category=cat, evidence=ev)
            )
        convs.append(conv)
    return convs
