# ruff: noqa: E402, E741, SIM115 (research scripts: path set-up before imports, short math names)
import importlib.util
import pickle
import sys

import numpy as np


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


import bm25s


class B:
    def __init__(self, docs):
        self.r = bm25s.BM25()
        self.r.index(bm25s.tokenize(list(docs), stopwords="en", show_progress=False), show_progress=False)

    def search(self, q, k):
        t = bm25s.tokenize([q], stopwords="en", show_progress=False)
        idx, sc = self.r.retrieve(t, k=k, show_progress=False)
        return [(int(i), float(s)) for i, s in zip(idx[0], sc[0], strict=False)]


z = pickle.load(open(sys.argv[1], "rb"))
q0, q1 = int(sys.argv[2]), int(sys.argv[3])
dia = z["dia"]
r = B(z["lines"])
res = {5: [], 10: [], 25: []}
for qi in range(q0, min(q1, len(z["Q"]))):
    ev = [e for e in z["evidence"][qi] if e in set(dia)]
    if not ev:
        continue
    got = [dia[i] for i, _ in r.search(z["questions"][qi], 25)]
    for k in res:
        res[k].append(np.mean([e in set(got[:k]) for e in ev]))
print({k: round(100 * np.mean(v), 1) for k, v in res.items()}, "n=", len(res[5]))
