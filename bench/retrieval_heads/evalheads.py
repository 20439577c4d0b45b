# ruff: noqa: E402, E741, SIM115 (research scripts: path set-up before imports, short math names)
"""Recall@k from per-(layer, head) turn masses; head selection with leave-one-conversation-out."""

import numpy as np

KS = (5, 10, 25)


def recall_at(scores, dia, evidence, k):
    top = np.argsort(-scores, kind="stable")[:k]
    got = set(dia[top])
    ev = [e for e in evidence if e in set(dia)]
    if not ev:
        return None
    return np.mean([e in got for e in ev])


class Conv:
    def __init__(self, cap, ana, variant):
        import pickle

        z = pickle.load(open(cap, "rb"))
        y = np.load(ana, allow_pickle=True)
        self.dia = z["dia"]
        self.ev = list(z["evidence"])
        self.cats = z["cats"]
        self.lines = list(z["lines"])
        self.questions = list(z["questions"])
        M = y[variant].astype(np.float32)
        self.M = M[:-1]
        self.null = M[-1]
        self.lens = y["lens"]
        self.valid = [i for i, e in enumerate(self.ev[: len(self.M)]) if any(x in set(self.dia) for x in e)]


def per_head_recall(c, k=10, calib=False):
    Q, L, H, T = c.M.shape
    M = c.M - c.null[None] if calib else c.M
    out = np.zeros((L, H))
    for qi in c.valid:
        ev = set(c.ev[qi])
        evmask = np.isin(c.dia, list(ev))
        top = np.argsort(-M[qi].reshape(L * H, T), axis=1)[:, :k]
        hit = evmask[top].sum(1) / evmask.sum()
        out += hit.reshape(L, H)
    return out / len(c.valid)


def agg_recall(c, weights, k=10, calib=False, norm=None):
    M = c.M - c.null[None] if calib else c.M
    rs = []
    for qi in c.valid:
        m = M[qi]
        if norm == "z":
            m = (m - m.mean(-1, keepdims=True)) / (m.std(-1, keepdims=True) + 1e-9)
        s = np.tensordot(weights, m, axes=([0, 1], [0, 1]))
        rs.append(recall_at(s, c.dia, c.ev[qi], k))
    return 100 * np.mean(rs)
