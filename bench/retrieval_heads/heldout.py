# ruff: noqa: E402, E741, SIM115 (research scripts: path set-up before imports, short math names)
"""Selected heads on held-out questions (numpy/torch; same math as the C++ kTokens path)."""

import json
import pickle
import sys

import numpy as np
import torch

torch.set_num_threads(1)
cap, heads_json, q0, q1 = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
z = pickle.load(open(cap, "rb"))
L, Hq, Hkv, D = [int(x) for x in z["cfg"]]
G = Hq // Hkv
heads = json.load(open(heads_json))
Ks = z["K"]
lens = np.array([k.shape[2] for k in Ks])
ends = torch.from_numpy(np.cumsum(lens))
starts = ends - torch.from_numpy(lens)
K = torch.from_numpy(np.concatenate(Ks, axis=2)).float()
i = np.arange(D // 2)
freq = 1e6 ** (-2 * i / D)


def mw(lo, hi):
    w = (np.sin(freq * hi) - np.sin(freq * lo)) / (freq * (hi - lo))
    return torch.from_numpy(np.concatenate([w, w])).float()


W = {"raw": torch.ones(D), "marg": mw(100, 20000), "marg2k": mw(50, 2000)}


def content(Q, ids):
    end = ids.index(151645) if 151645 in ids else len(ids)
    return torch.from_numpy(Q[:, :, 3:end].astype(np.float32))


def score(Q, w, hs):
    s = torch.zeros(len(Ks))
    for l, h, wt in hs:
        q = Q[l, h] * w * D**-0.5
        k = K[l, h // G]
        p = torch.softmax(q @ k.T, -1)
        cs = torch.cat([torch.zeros(p.shape[0], 1), torch.cumsum(p, -1)], -1)
        s += wt * (cs[:, ends] - cs[:, starts]).mean(0)
    return s.numpy()


dia = z["dia"]
null = content(z["nullQ"], list(z["null_ids"]))
res = {}
for v in ("raw", "marg", "marg2k"):
    for calib in (False, True):
        for nh in (8, 16, 32):
            hs = heads[v + ("_c" if calib else "")][:nh]
            base = score(null, W[v], hs) if calib else 0
            r = {5: [], 10: [], 25: []}
            for qi in range(q0, min(q1, len(z["Q"]))):
                ev = [e for e in z["evidence"][qi] if e in set(dia)]
                if not ev:
                    continue
                s = score(content(z["Q"][qi], list(z["q_ids"][qi])), W[v], hs) - base
                top = np.argsort(-s, kind="stable")
                for k in r:
                    r[k].append(np.mean([e in set(dia[top[:k]]) for e in ev]))
            res[f"{v} calib={calib} heads={nh}"] = {k: round(100 * np.mean(x), 1) for k, x in r.items()}
            print(
                f"{v} calib={calib} heads={nh}",
                res[f"{v} calib={calib} heads={nh}"],
                "n=",
                len(r[5]),
                flush=True,
            )
