"""LoCoMo's official answer scoring (token F1 with Porter stemming; see the data README).

- normalise: lowercase, strip punctuation, drop articles (a, an, the) and "and", stem tokens;
- category 1 (multi-hop): split prediction and gold on ","; mean over gold parts of the best
  F1 against any predicted part;
- category 3: gold answer cut at the first ";";
- category 5 (adversarial): 1 if the prediction says the information is not available
  ("not mentioned" / "no information available"), else 0;
- categories 2 and 4: plain token F1.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache

from nltk.stem import PorterStemmer

_STEMMER = PorterStemmer()
_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the|and)\b")


@lru_cache(maxsize=65536)
def _stem(token: str) -> str:
    return _STEMMER.stem(token)


def normalize_answer(s: str) -> str:
    s = str(s).replace(",", "")
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _tokens(s: str) -> list[str]:
    return [_stem(w) for w in normalize_answer(s).split()]


def f1_score(prediction: str, ground_truth: str) -> float:
    pred = _tokens(prediction)
    gold = _tokens(ground_truth)
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred)
    recall = same / len(gold)
    return 2 * precision * recall / (precision + recall)


def multi_hop_f1(prediction: str, ground_truth: str) -> float:
    preds = [p.strip() for p in str(prediction).split(",")]
    golds = [g.strip() for g in str(ground_truth).split(",")]
    if not golds:
        return 0.0
    return sum(max(f1_score(p, g) for p in preds) for g in golds) / len(golds)


def says_unanswerable(prediction: str) -> bool:
    p = str(prediction).lower()
    return "no information available" in p or "not mentioned" in p


def score_answer(prediction: str, answer: str, category: int) -> float:
    """The official LoCoMo score of one prediction (0..1)."""
    if category == 5:
        return 1.0 if says_unanswerable(prediction) else 0.0
    if category == 1:
        return multi_hop_f1(prediction, answer)
    if category == 3:
        answer = str(answer).split(";")[0].strip()
    return f1_score(prediction, answer)


def recall_at(retrieved: list[str], evidence: list[str] | tuple[str, ...]) -> dict[str, float] | None:
    """Fractional, any and all recall of evidence dia_ids among retrieved ids (None if no evidence)."""
    ev = list(dict.fromkeys(evidence))
    if not ev:
        return None
    got = set(retrieved)
    hits = sum(1 for e in ev if e in got)
    return {"recall": hits / len(ev), "recall_any": float(hits > 0), "recall_all": float(hits == len(ev))}
