# ruff: noqa: E402, E741, SIM115 (research scripts: path set-up before imports, short math names)
"""Per-(layer, q-head) token-level attention mass per turn for every question (scratch research).
Saves M[q, l, h, turn] (mass, f16) for several scoring variants, plus null-query mass."""

import argparse
import os
import time

import numpy as np
import torch

ap = argparse.ArgumentParser()
ap.add_argument("--npz")
ap.add_argument("--out")
ap.add_argument("--theta", type=float, default=1e6)
ap.add_argument("--variants", default="raw,marg")
ap.add_argument("--qtok", default="content")  # content | all
a = ap.parse_args()
torch.set_num_threads(1)
import pickle

z = pickle.load(open(a.npz, "rb"))
L, Hq, Hkv, D = [int(x) for x in z["cfg"]]
G = Hq // Hkv
Ks = list(z["K"])
Qs = list(z["Q"])
nullQ = z["nullQ"]
lens = np.array([k.shape[2] for k in Ks])
T = len(Ks)
turn_of = np.repeat(np.arange(T), lens)
K = torch.from_numpy(np.concatenate(Ks, axis=2)).float()  # L, Hkv, N, D
N = K.shape[2]
seg = torch.from_numpy(turn_of)
ends = torch.from_numpy(np.cumsum(lens))
starts = ends - torch.from_numpy(lens)
# RoPE half-split pairs: dim i and i + D/2 share freq theta^(-2i/D)
i = np.arange(D // 2)
freq = a.theta ** (-2 * i / D)


def marg_w(lo, hi):
    # E_{delta~U[lo,hi]} cos(w delta): position-marginalised weight per pair
    w = np.where(
        freq * (hi - lo) < 1e-9,
        np.cos(freq * lo),
        (np.sin(freq * hi) - np.sin(freq * lo)) / (freq * (hi - lo) + 1e-30),
    )
    return torch.from_numpy(np.concatenate([w, w])).float()


W = {"raw": torch.ones(D), "marg": marg_w(100, 20000), "marg2k": marg_w(50, 2000)}
scale = D**-0.5
# query token selection: suffix "\nQuestion: <q><|im_end|>\n<|im_start|>assistant\n"
q_ids = list(z["q_ids"])


def qmask(ids):
    n = len(ids)
    if a.qtok == "all":
        return np.ones(n, bool)
    m = np.zeros(n, bool)
    # content = tokens after "Question:" up to <|im_end|> (151645)
    end = ids.index(151645) if 151645 in ids else n
    start = 3  # "\n", "Question", ":" (approx; checked below)
    m[start:end] = True
    return m


out = {}
for vname in a.variants.split(","):
    w = W[vname]
    Kw = K * w  # L,Hkv,N,D
    M = np.zeros((len(Qs) + 1, L, Hq, T), np.float16)
    t0 = time.time()
    NQ = int(os.environ.get("NQ", len(Qs)))
    Qs = Qs[:NQ]
    q_ids = q_ids[:NQ] + [None] * 0
    for qi, Q in enumerate(Qs + [nullQ]):
        Qt = torch.from_numpy(Q).float()  # L, Hq, Tq, D
        ids = q_ids[qi] if qi < len(Qs) else list(z["null_ids"])
        m = torch.from_numpy(qmask(list(ids)))
        Qt = Qt[:, :, m] if qi < len(Qs) else Qt[:, :, m]
        Qg = Qt.view(L, Hkv, G, -1, D).reshape(L, Hkv, -1, D)  # L,Hkv,G*Tq,D
        logits = torch.einsum("lgtd,lgnd->lgtn", Qg, Kw) * scale
        p = torch.softmax(logits, -1)  # over all tokens
        cs = torch.cumsum(p, -1)
        cs = torch.cat([torch.zeros(*cs.shape[:-1], 1), cs], -1)
        mass = cs[..., ends] - cs[..., starts]  # per turn
        mass = mass.view(L, Hkv, G, -1, T).mean(3).reshape(L, Hq, T)
        M[qi] = mass.numpy().astype(np.float16)
        if qi % 20 == 0:
            print(f"\r{vname} {qi}/{len(Qs)} {time.time() - t0:.0f}s", end="", flush=True)
    print()
    out[vname] = M[: len(Qs) + 1]
np.savez(a.out, **out, lens=lens)
print("saved", a.out)
