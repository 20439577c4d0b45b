# ruff: noqa: E402, E741, SIM115 (research scripts: path set-up before imports, short math names)
"""Research capture: per-turn pre-RoPE K (turn encoded after the shared prefix) and per-question
pre-RoPE Q at every layer, for a LoCoMo conversation. Scratch tool, not product code."""

import argparse
import importlib.util
import os
import sys
import time

import numpy as np
import torch


# import the bench data module without importing kv_agent/__init__ (needs _core)
def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    m = importlib.util.module_from_spec(spec)
    sys.modules[name] = m
    spec.loader.exec_module(m)
    return m


import types

_pkg = types.ModuleType("kv_agent")  # bench/locomo.py needs only kv_agent.errors
_err = types.ModuleType("kv_agent.errors")


class NotFoundError(KeyError):
    pass


_err.NotFoundError = NotFoundError
_pkg.errors = _err
sys.modules.setdefault("kv_agent", _pkg)
sys.modules.setdefault("kv_agent.errors", _err)
locomo = load(
    "locomo_mod",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../python/kv_agent/bench/locomo.py"),
)
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("--model")
ap.add_argument("--conv", nargs="+")
ap.add_argument("--out")
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
tok = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, local_files_only=True).eval()
cfg = model.config
L, Hq, Hkv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
D = cfg.hidden_size // Hq
caps = {}


def mk(kind, i):
    def hook(mod, inp, out):
        caps[(kind, i)] = out.detach()

    return hook


for i, layer in enumerate(model.model.layers):
    layer.self_attn.k_proj.register_forward_hook(mk("k", i))
    layer.self_attn.q_proj.register_forward_hook(mk("q", i))

INSTR = (
    "Below are excerpts from a long conversation between {a} and {b}, one message per line, "
    "each with the date it was sent. Use them to answer the question at the end with a short "
    'phrase. If the excerpts do not contain the answer, reply "Not mentioned in the conversation".'
)


def ids(t):
    return tok(t, add_special_tokens=False)["input_ids"]


PREFIX_CACHE = {}


@torch.no_grad()
def run(seqs, prefix=None):
    """seqs: list of token lists; returns per-seq K [L,Hkv,T,D] and Q [L,Hq,T,D] (f16 numpy)."""
    n = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    x = torch.full((len(seqs), n), pad, dtype=torch.long)
    m = torch.zeros((len(seqs), n), dtype=torch.long)
    for b, s in enumerate(seqs):
        x[b, : len(s)] = torch.tensor(s)
        m[b, : len(s)] = 1
    if prefix is None:
        model.model(input_ids=x, attention_mask=m, use_cache=False)
    else:
        from transformers import DynamicCache

        P = len(prefix)
        key = tuple(prefix)
        if key not in PREFIX_CACHE:
            o = model.model(input_ids=torch.tensor([prefix]), use_cache=True)
            pc = o.past_key_values
            PREFIX_CACHE.clear()
            PREFIX_CACHE[key] = [(pc.layers[l].keys, pc.layers[l].values) for l in range(L)]
        B = len(seqs)
        cache = DynamicCache()
        for l, (k, v) in enumerate(PREFIX_CACHE[key]):
            cache.update(k.expand(B, -1, -1, -1).contiguous(), v.expand(B, -1, -1, -1).contiguous(), l)
        am = torch.cat([torch.ones(B, P, dtype=torch.long), m], 1)
        pos = torch.arange(P, P + n).unsqueeze(0).expand(B, -1)
        model.model(input_ids=x, attention_mask=am, past_key_values=cache, position_ids=pos, use_cache=True)
    K = torch.stack([caps[("k", i)] for i in range(L)], 1)  # B, L, T, Hkv*D
    Q = torch.stack([caps[("q", i)] for i in range(L)], 1)
    B = len(seqs)
    K = K.view(B, L, n, Hkv, D).permute(0, 1, 3, 2, 4)
    Q = Q.view(B, L, n, Hq, D).permute(0, 1, 3, 2, 4)
    return [
        (K[b, :, :, : len(s)].half().numpy(), Q[b, :, :, : len(s)].half().numpy()) for b, s in enumerate(seqs)
    ]


data = locomo.load_locomo(locomo.DEFAULT_LOCOMO_PATH) if hasattr(locomo, "load_locomo") else None
for cid in a.conv:
    conv = [c for c in data if c.sample_id == cid][0]
    sys_txt = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    prefix = ids(sys_txt + INSTR.format(a=conv.speaker_a, b=conv.speaker_b) + "\n\n")
    P = len(prefix)
    lines = [
        f"[{t.date_time.split(' on ', 1)[-1]}] {t.speaker}: {t.text}\n"
        for t in conv.turns
    ]
    line_ids = [ids(l) for l in lines]
    t0 = time.time()
    Ks = [None] * len(lines)
    order = sorted(range(len(lines)), key=lambda i: len(line_ids[i]))
    for s in range(0, len(order), a.batch):
        idx = order[s : s + a.batch]
        res = run([line_ids[i] for i in idx], prefix)
        for i, (K, _q) in zip(idx, res, strict=False):
            Ks[i] = K
        print(f"\r{cid} turns {s + len(idx)}/{len(lines)} {time.time() - t0:.0f}s", end="", flush=True)
    print()
    qs = [q for q in conv.questions]

    def suf(q):
        return "\nQuestion: " + q + "<|im_end|>\n<|im_start|>assistant\n"

    q_ids = [ids(suf(q.question)) for q in qs]
    null_ids = ids(suf("N/A"))
    Qs = [None] * len(qs)
    allq = q_ids + [null_ids]
    order = sorted(range(len(allq)), key=lambda i: len(allq[i]))
    for s in range(0, len(order), a.batch):
        idx = order[s : s + a.batch]
        res = run([allq[i] for i in idx], prefix)
        for i, (_k, Q) in zip(idx, res, strict=False):
            if i < len(qs):
                Qs[i] = Q
            else:
                nullQ = Q
        print(f"\r{cid} questions {s + len(idx)}/{len(allq)} {time.time() - t0:.0f}s", end="", flush=True)
    print()
    os.makedirs(a.out, exist_ok=True)
    import pickle

    with open(f"{a.out}/{cid}.pkl", "wb") as f:
        pickle.dump(
            dict(
                K=Ks,
                Q=Qs,
                nullQ=nullQ,
                line_ids=line_ids,
                q_ids=q_ids,
                null_ids=null_ids,
                dia=np.array([t.dia_id for t in conv.turns]),
                lines=lines,
                questions=[q.question for q in qs],
                cats=np.array([q.category for q in qs]),
                evidence=[list(q.evidence) for q in qs],
                answers=[q.answer for q in qs],
                prefix=prefix,
                cfg=np.array([L, Hq, Hkv, D]),
            ),
            f,
            protocol=4,
        )
    print(cid, "saved", time.time() - t0)
