"""The full-attention oracle: where does the question's own attention go with every turn in context?

The conversation (a prefix span and one span per turn) is run once through the model at positions
0..N-1, in chunks (bounded attention memory on long conversations); forward hooks record every
layer's pre-RoPE keys (after any per-head k norm, as the model computes them). For each question,
its tokens are run after a copy of that cache at positions N..N+T-1 (so its queries are exactly
what the model computes with the whole conversation in context) and the hooks record its pre-RoPE
queries and keys. Keys and queries are rotated to their in-context positions with the model's own
RoPE (``kv_agent.rope``, fp32 angles), and for every layer and query head

    p = softmax(scale * q . k)  over every context token and the question's own earlier tokens

(one query head at a time, so memory is T x (N + T) floats). A turn's mass is the sum of ``p``
over its tokens, averaged over the question's tokens: ``mass[layer, head, turn]``.

Every layer is scored over the whole context, also sliding-window layers (Gemma 2/3 local
layers), whose real attention sees only the last ``window`` tokens: their rows say what those
heads would pick if they saw everything; ``layer_types`` tells them apart. Attention logit
soft-capping (Gemma 2) is not applied.

Thread-safety: not thread-safe (hooks are installed on the shared model during each forward).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Sequence

import numpy as np
import torch

from kv_agent import rope as _rope
from kv_agent.errors import InvalidArgumentError

# Layout of a per-head q/k norm's output: Qwen3 normalises before the head transpose ([B, T, H, D]),
# Gemma 3 after it ([B, H, T, D]).
_NORM_BTHD = ("qwen3",)


class AttentionOracle:
    """Per-turn attention mass of a question over a whole conversation in context."""

    def __init__(self, model, chunk_tokens: int = 1024):
        if chunk_tokens < 1:
            raise InvalidArgumentError("chunk_tokens must be >= 1")
        self.model = model
        cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        self.config = cfg
        self.attn = [layer.self_attn for layer in model.model.layers[: cfg.num_hidden_layers]]
        self.num_layers = len(self.attn)
        self.num_q_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.scales = [float(a.scaling) for a in self.attn]
        self.layer_types = list((getattr(cfg, "layer_types", None) or ["full_attention"] * self.num_layers)
                                [: self.num_layers])
        self.rope_specs = list(_rope.layer_rope_specs(cfg))[: self.num_layers]
        self.chunk_tokens = int(chunk_tokens)
        self._bthd = getattr(cfg, "model_type", "") in _NORM_BTHD
        params = inspect.signature(type(model).forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.device = next(model.parameters()).device
        self._cache = None

    # ------------------------------------------------------------------ hooks
    def _heads(self, out: torch.Tensor) -> torch.Tensor:
        """A q/k producer's output -> [H, T, D] float32 on the CPU."""
        if out.dim() == 3:
            b, t, _ = out.shape
            out = out.view(b, t, -1, self.head_dim).transpose(1, 2)
        elif self._bthd:
            out = out.transpose(1, 2)
        return out[0].detach().float().cpu()

    @contextlib.contextmanager
    def _recording(self, want_q: bool):
        rec = {"q": [None] * self.num_layers, "k": [None] * self.num_layers}
        handles = []

        def make(kind, i):
            def hook(_mod, _inp, out):
                rec[kind][i] = self._heads(out)

            return hook

        try:
            for i, a in enumerate(self.attn):
                handles.append((getattr(a, "k_norm", None) or a.k_proj).register_forward_hook(make("k", i)))
                if want_q:
                    handles.append((getattr(a, "q_norm", None) or a.q_proj).register_forward_hook(make("q", i)))
            yield rec
        finally:
            for h in handles:
                h.remove()

    def _forward(self, ids: Sequence[int], cache, start: int) -> None:
        x = torch.as_tensor(list(ids), dtype=torch.long, device=self.device).unsqueeze(0)
        pos = torch.arange(start, start + x.shape[1], device=self.device).unsqueeze(0)
        self.model(input_ids=x, position_ids=pos, use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})

    def _rotate(self, x: torch.Tensor, start: int, layer: int) -> torch.Tensor:
        pos = torch.arange(start, start + x.shape[-2], dtype=torch.long)
        return torch.as_tensor(_rope.apply(x.contiguous(), pos, self.rope_specs[layer], self.head_dim))

    # --------------------------------------------------------------- context
    @torch.no_grad()
    def prepare(self, spans: Sequence[Sequence[int]], first_scored: int = 1) -> None:
        """Runs the context: ``spans`` of token ids in order (e.g. [BOS + prefix, turn 1, ...]).
        Spans before ``first_scored`` (the prefix) take attention but are not scored."""
        from transformers import DynamicCache

        if not spans or any(len(s) == 0 for s in spans):
            raise InvalidArgumentError("every context span needs at least one token")
        if not 0 <= first_scored < len(spans):
            raise InvalidArgumentError(f"first_scored {first_scored} out of range for {len(spans)} spans")
        ids = [int(t) for s in spans for t in s]
        owner = np.concatenate([np.full(len(s), i - first_scored, dtype=np.int64) for i, s in enumerate(spans)])
        self.num_spans = len(spans) - first_scored
        self.span_of_token = torch.as_tensor(owner)  # -k: prefix spans (not scored)
        self.context_tokens = len(ids)
        cache = DynamicCache(config=self.model.config)
        keys = [[] for _ in range(self.num_layers)]
        for s in range(0, len(ids), self.chunk_tokens):
            with self._recording(want_q=False) as rec:
                self._forward(ids[s:s + self.chunk_tokens], cache, s)
            for i in range(self.num_layers):
                keys[i].append(rec["k"][i])
        self.keys = [self._rotate(torch.cat(k, dim=1), 0, i) for i, k in enumerate(keys)]  # [Hkv, N, D]
        self._cache = cache

    # --------------------------------------------------------------- queries
    @torch.no_grad()
    def turn_mass(self, query_ids: Sequence[int]) -> np.ndarray:
        """``mass[layer, q_head, span]`` (float32) of ``query_ids`` run after the prepared
        context: the attention probability each scored span receives, averaged over the query's
        tokens. Rows sum to at most 1 (the rest goes to the prefix and the query itself)."""
        if self._cache is None:
            raise InvalidArgumentError("prepare() the context first")
        if len(query_ids) == 0:
            raise InvalidArgumentError("the query has no tokens")
        n = self.context_tokens
        with self._recording(want_q=True) as rec:
            self._forward(query_ids, copy.deepcopy(self._cache), n)
        T = len(query_ids)
        group = self.num_q_heads // self.num_kv_heads
        scored = self.span_of_token >= 0
        owner = self.span_of_token[scored]
        out = np.zeros((self.num_layers, self.num_q_heads, self.num_spans), dtype=np.float32)
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        for i in range(self.num_layers):
            q = self._rotate(rec["q"][i], n, i)  # [Hq, T, D]
            kq = self._rotate(rec["k"][i], n, i)  # [Hkv, T, D]
            for h in range(self.num_q_heads):
                g = h // group
                ctx = (q[h] @ self.keys[i][g].T) * self.scales[i]  # [T, N]
                own = ((q[h] @ kq[g].T) * self.scales[i]).masked_fill(causal, float("-inf"))
                p = torch.softmax(torch.cat([ctx, own], dim=1), dim=1)[:, :n].mean(dim=0)  # [N]
                out[i, h] = torch.zeros(self.num_spans).index_add_(0, owner, p[scored]).numpy()
        return out


def ranked_spans(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores along the last axis, best first (ties: lower index)."""
    k = min(k, scores.shape[-1])
    order = np.argsort(-scores, axis=-1, kind="stable")
    return order[..., :k]
