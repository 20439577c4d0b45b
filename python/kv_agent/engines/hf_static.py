"""Static-shape forwards of the transformers adapter, replayed as CUDA graphs.

The two small forwards on kv-memory's path to the first token (the query's Q vectors for
retrieval, and the prefill of the query after the retrieved context) are launch-bound in
transformers' eager path: a few hundred small kernels, each issued from Python. Here each runs
with fixed shapes over preallocated buffers, so on a CUDA device it is captured once as a CUDA
graph and replayed (``torch.cuda.CUDAGraph``); on other devices the same code runs eagerly
(that is what the CPU tests compare with the eager adapter path).

What stays the model's own: the embedding, every decoder layer's module (projections, norms,
RoPE of the new tokens, attention through the configured implementation, MLP), the final norm
and the LM head are the model's modules, called in the model's order. What is replaced: the
cache (a duck-typed static K/V buffer whose ``update`` writes the new tokens at fixed slots) and
the mask (an explicit additive mask, so every attention implementation sees the same thing).

Scope (``check_supported``): Llama / Qwen2 / Qwen3 style decoders with full attention on every
layer and one half-split RoPE with ``rotary_dim == head_dim`` shared by all layers. Other models
keep the eager path.

Layout of the retrieved context: canonical ``[L, 2, Hkv, T, D]`` parts (K pre-RoPE), as
``HFEngine.build_cache`` takes them; the parts are concatenated along T into a staging buffer
(asynchronous copies when the source is pinned host memory), then one graph rotates every
layer's keys to positions ``start..start+n-1`` (fp32 arithmetic, angles from the positioner's
fp32 inverse frequencies in double precision, as ``kv_agent.rope`` does) and copies K and V into
the static cache, and a second graph runs the query tokens at ``start+n..``.

Thread-safety: none (buffers are reused); one runner per engine and shape.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from kv_agent import rope as _rope
from kv_agent.errors import FailedPreconditionError, InvalidArgumentError, UnimplementedError

_SUPPORTED = ("llama", "qwen2", "qwen3")


def check_supported(engine) -> None:
    """Raises InvalidArgumentError naming why ``engine``'s model cannot use the static path."""
    if engine.model_type not in _SUPPORTED:
        raise InvalidArgumentError(f"static (CUDA graph) forwards support model types {_SUPPORTED}, not {engine.model_type!r}")
    if any(engine.windows):
        raise InvalidArgumentError("static (CUDA graph) forwards need full attention on every layer (no sliding windows)")
    inv0 = _rope.inv_freq(engine.rope_specs[0], engine.head_dim)
    f0 = _rope.attention_factor(engine.rope_specs[0])
    if inv0.size * 2 != engine.head_dim or engine.rope_specs[0].style != _rope.RopeStyle.half_split:
        raise InvalidArgumentError("static (CUDA graph) forwards need half-split RoPE over the whole head")
    for s in engine.rope_specs[1:]:
        if not np.array_equal(_rope.inv_freq(s, engine.head_dim), inv0) or _rope.attention_factor(s) != f0:
            raise InvalidArgumentError("static (CUDA graph) forwards need one RoPE shared by all layers")


def _cache_kwarg(layer) -> str | None:
    """Name under which this transformers version's decoder layer takes the cache."""
    params = inspect.signature(type(layer).forward).parameters
    for name in ("cache", "past_key_values", "past_key_value"):
        if name in params:
            return name
    return None


class _StaticKV:
    """Duck-typed transformers cache over preallocated K and V ``[L, 1, Hkv, N, D]``: ``update``
    writes the new tokens' (post-RoPE) K and V at the slots in ``slots`` and returns the layer's
    whole buffers; slots a query must not see are hidden by the caller's mask."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor):
        self.k, self.v, self.slots = k, v, slots

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.k[layer_idx], self.v[layer_idx]
        k.index_copy_(2, self.slots, key_states.to(k.dtype))
        v.index_copy_(2, self.slots, value_states.to(v.dtype))
        return k, v


def _capture(fn):
    """Runs fn twice on a side stream (warm-up: kernel selection, lazy buffers), then captures it
    into a CUDA graph; returns (graph, fn's output tensors, now static)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


class _Runner:
    def __init__(self, engine, use_graphs: bool | None):
        check_supported(engine)
        self.engine = engine
        self.model = engine.model
        self.base = engine.model.model
        self.device, self.dtype = engine.device, engine.dtype
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else bool(use_graphs)
        if self.use_graphs and self.device.type != "cuda":
            raise FailedPreconditionError("CUDA graphs need the model on a CUDA device")
        self.cache_kw = _cache_kwarg(engine.layers[0])
        self.mask_min = torch.finfo(self.dtype).min

    def _layers(self, hidden, pos_ids, mask, cache, upto: int):
        emb = self.base.rotary_emb(hidden, pos_ids)
        kw = {"attention_mask": mask, "position_ids": pos_ids, "position_embeddings": emb}
        if cache is not None:
            if self.cache_kw is None:
                raise UnimplementedError("this transformers version's decoder layer takes no cache argument")
            kw[self.cache_kw] = cache
            kw["use_cache"] = True
        for layer in self.engine.layers[:upto]:
            out = layer(hidden, **kw)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def _mask(self, kv_len: int, first_query_slot: torch.Tensor | int, q_len: int) -> torch.Tensor:
        """Additive mask [1, 1, q_len, kv_len]: query i sees slots <= first_query_slot + i."""
        kv_idx = torch.arange(kv_len, device=self.device)
        q_slot = torch.arange(q_len, device=self.device) + first_query_slot
        allowed = kv_idx[None, :] <= q_slot[:, None]
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        low = torch.full((), self.mask_min, dtype=self.dtype, device=self.device)
        return torch.where(allowed, zero, low)[None, None]


class StaticQueryQ(_Runner):
    """``HFEngine.query_q`` without a prefix, for a fixed number of query tokens and layers: the
    tokens run at positions 0..T-1 through layers 0..max(layers) (the last one whole), and the
    pre-RoPE Q of the wanted layers is recorded by the adapter's own hooks."""

    def __init__(self, engine, num_tokens: int, layers, use_graphs: bool | None = None):
        super().__init__(engine, use_graphs)
        self.T = int(num_tokens)
        self.layers = sorted(set(int(i) for i in layers))
        self.ids = torch.zeros((1, self.T), dtype=torch.long, device=self.device)
        self.pos = torch.arange(self.T, device=self.device)[None]
        self.graph = None
        self.out = None

    def _body(self):
        with self.engine._hooks(want_kv=False, q_layers=self.layers) as rec:
            hidden = self.base.embed_tokens(self.ids)
            mask = self._mask(self.T, 0, self.T)
            self._layers(hidden, self.pos, mask, None, self.layers[-1] + 1)
        return {i: rec["q"][i] for i in self.layers}

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> dict[int, torch.Tensor]:
        if ids.numel() != self.T:
            raise InvalidArgumentError(f"StaticQueryQ was built for {self.T} tokens, got {ids.numel()}")
        self.ids.copy_(ids.reshape(1, -1).to(self.device), non_blocking=True)
        if not self.use_graphs:
            return self._body()
        if self.graph is None:
            self.graph, self.out = _capture(self._body)
        self.graph.replay()
        return {i: q.clone() for i, q in self.out.items()}


class StaticPrefill(_Runner):
    """Prefill of ``query_tokens`` new tokens after up to ``capacity`` tokens of planned context.

    ``load(parts)`` copies the context (canonical [L, 2, Hkv, t, D] parts, K pre-RoPE) into the
    staging buffer; ``inject(start)`` rotates the keys to positions start.. and fills the static
    cache; ``forward(ids)`` runs the query and returns the last token's logits [vocab] (float32).
    ``__call__`` does all three. Each of inject and forward is one CUDA graph replay."""

    def __init__(self, engine, capacity: int, query_tokens: int, use_graphs: bool | None = None):
        super().__init__(engine, use_graphs)
        e = engine
        self.C, self.Q = int(capacity), int(query_tokens)
        if self.C < 1 or self.Q < 1:
            raise InvalidArgumentError("StaticPrefill needs capacity >= 1 and query_tokens >= 1")
        L, H, D = e.num_layers, e.num_kv_heads, e.head_dim
        dev, dt = self.device, self.dtype
        # Zero-filled: slots past the context are masked, but must never hold NaN (0 * NaN).
        self.stage = torch.zeros((L, 2, H, self.C, D), dtype=dt, device=dev)
        # Host parts land here back to back (plain DMA copies, no kernel between them), then one
        # device copy per part scatters them into the staging layout.
        self.landing = torch.empty((L * 2 * H * self.C * D,), dtype=dt, device=dev)
        self.k = torch.zeros((L, 1, H, self.C + self.Q, D), dtype=dt, device=dev)
        self.v = torch.zeros_like(self.k)
        self.n = torch.zeros((), dtype=torch.long, device=dev)  # context tokens
        self.start = torch.zeros((), dtype=torch.long, device=dev)  # position of context token 0
        self.ids = torch.zeros((1, self.Q), dtype=torch.long, device=dev)
        self.slots = torch.zeros((self.Q,), dtype=torch.long, device=dev)
        spec = e.rope_specs[0]
        self.inv = torch.tensor(_rope.inv_freq(spec, D), dtype=torch.float64, device=dev)
        self.factor = float(_rope.attention_factor(spec))
        self.cache = _StaticKV(self.k, self.v, self.slots)
        self.g_inject = self.g_forward = None
        self.logits = None
        self.loaded = 0

    @torch.no_grad()
    def load(self, parts) -> int:
        """Copies the parts into the staging buffer in order; returns the context length."""
        parts = [torch.as_tensor(p) for p in parts]
        n = sum(int(p.shape[3]) for p in parts)
        if n > self.C:
            raise InvalidArgumentError(f"context of {n} tokens is more than the capacity {self.C}")
        on_device, pos = [], 0
        for p in parts:
            if p.device.type == "cpu":
                dst = self.landing[pos : pos + p.numel()].view(p.shape)
                dst.copy_(p.contiguous(), non_blocking=True)
                pos += p.numel()
                p = dst
            on_device.append(p)
        off = 0
        for p in on_device:
            t = int(p.shape[3])
            self.stage[:, :, :, off : off + t].copy_(p)
            off += t
        self.loaded = n
        self.n.fill_(n)
        return n

    def _inject_body(self):
        h = self.engine.head_dim // 2
        pos = (torch.arange(self.C, device=self.device) + self.start).to(torch.float64)
        ang = pos[:, None] * self.inv[None, :]
        cos = (torch.cos(ang) * self.factor).to(torch.float32)
        sin = (torch.sin(ang) * self.factor).to(torch.float32)
        k = self.stage[:, 0].float()  # [L, Hkv, C, D]
        k1, k2 = k[..., :h], k[..., h:]
        kc = self.k[:, 0, :, : self.C]
        kc[..., :h].copy_(k1 * cos - k2 * sin)
        kc[..., h:].copy_(k2 * cos + k1 * sin)
        self.v[:, 0, :, : self.C].copy_(self.stage[:, 1])

    @torch.no_grad()
    def inject(self, start: int = 0) -> None:
        """Rotates the loaded keys to positions start..start+n-1 into the static cache."""
        if start < 0:
            raise InvalidArgumentError(f"start must be >= 0, got {start}")
        self.start.fill_(int(start))
        if not self.use_graphs:
            self._inject_body()
            return
        if self.g_inject is None:
            self.g_inject, _ = _capture(self._inject_body)
        self.g_inject.replay()

    def _forward_body(self):
        q_idx = torch.arange(self.Q, device=self.device)
        self.slots.copy_(q_idx + self.n)
        pos = (q_idx + self.n + self.start)[None]
        mask = self._mask(self.C + self.Q, self.n, self.Q)
        hidden = self.base.embed_tokens(self.ids)
        hidden = self._layers(hidden, pos, mask, self.cache, self.engine.num_layers)
        hidden = self.base.norm(hidden[:, -1:])
        return self.model.lm_head(hidden)[0, -1].float()

    @torch.no_grad()
    def forward(self, ids) -> torch.Tensor:
        """Runs the query tokens after the injected context; returns the last token's logits."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        if ids.shape[1] != self.Q:
            raise InvalidArgumentError(f"StaticPrefill was built for {self.Q} query tokens, got {ids.shape[1]}")
        self.ids.copy_(ids.to(self.device), non_blocking=True)
        if not self.use_graphs:
            return self._forward_body()
        if self.g_forward is None:
            self.g_forward, self.logits = _capture(self._forward_body)
        self.g_forward.replay()
        return self.logits.clone()

    def __call__(self, parts, ids, start: int = 0) -> torch.Tensor:
        self.load(parts)
        self.inject(start)
        return self.forward(ids)
