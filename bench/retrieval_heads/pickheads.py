# ruff: noqa: E402, E741, SIM115 (research scripts: path set-up before imports, short math names)
"""Ranks (layer, query head) pairs by single-head evidence recall@10 on the analysed questions
(analyze.py output) and writes heads.json. Usage: pickheads.py CAPTURE.pkl ANALYSIS.npz OUT.json"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evalheads import Conv, per_head_recall

out = {}
for v in ("raw", "marg"):
    c = Conv(sys.argv[1], sys.argv[2], v)
    for calib in (False, True):
        ph = per_head_recall(c, 10, calib)
        order = np.argsort(-ph.ravel())
        L, H = ph.shape
        out[v + ("_c" if calib else "")] = [(int(i // H), int(i % H), 1.0) for i in order[:32]]
        print(
            v,
            calib,
            "top heads:",
            [(int(i // H), int(i % H), round(100 * ph.ravel()[i], 1)) for i in order[:10]],
            flush=True,
        )
        print("  layer means:", np.round(100 * ph.mean(1), 1).tolist())
out["marg2k"] = out["marg"]
out["marg2k_c"] = out["marg_c"]
json.dump(out, open(sys.argv[3], "w"))
