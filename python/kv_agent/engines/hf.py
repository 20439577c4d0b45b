"""Hugging Face transformers adapter (engine name ``"hf"``): capture pre-RoPE KV, place planned
KV, prefill, decode.

``HFEngine`` implements :class:`kv_agent.engines.base.Engine` (``capture``, ``query_vectors`` and
``generate`` take a :class:`PlannedContext` and load its segments from the store themselves) and
keeps the lower-level transformers API the benchmarks and tests use (``capture_on_cache``,
``build_cache``, ``query_q``, ``prefill``, ``generate_on_cache``). ``create(model=...)`` is the
registry factory behind ``CacheManager(engine="hf")``.

Canonical layout (DESIGN.md): ``kv[layer, 0|1, kv_head, token, dim]`` with index 0 = K stored
pre-RoPE (after any per-head q/k norm, before rotation) and 1 = V. Positions are int64.

Capture: forward hooks on each attention module's k/v producers (``k_norm`` when the model has
one, else ``k_proj``; ``v_proj``) record every token's K and V exactly as the model computes them,
before rotation, for every layer, independently of what the cache keeps (Gemma 3 local layers'
window caches drop old tokens; the hooks do not). See docs/engine-hf.md for why hooks rather
than un-rotating post-RoPE cache keys.

Injection: ``build_cache`` rotates pre-RoPE keys to their planned positions with
``kv_agent.rope`` (the C++ positioner) and fills a ``DynamicCache`` layer by layer; sliding
window layers receive only the last ``window - 1`` tokens (all a later query can see) and the
cache's cumulative length is set to the full context so HF builds the right masks.

On CUDA (a CUDA model and a CUDA build of kv_agent, ``fused_load_available()``), planned
segments are placed by the fused kernels instead: ``kv_agent.cuda.load`` copies each one from the
store's device tier (``store.get_device``: no host -> device copy when resident) or from a host
copy straight into the per-layer caches, keys rotated to their planned positions in the copy.

Placement cache: the placed (rotated, window-trimmed) form of the contexts passed to ``capture``
and ``query_vectors`` (in practice the shared system prefix) is kept, a few contexts at most, so
storing many turns after one prefix rotates it once; ``generate`` reuses the longest cached
leading run of its context and rotates only the rest. Entries are keyed by store, fingerprint,
segment key, position and the segment's content hash (model + tokens).

Thread-safety: an HFEngine is not thread-safe (hooks are installed on the shared model).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

import kv_agent
from kv_agent import rope as _rope  # the C++ positioner
from kv_agent.engines import base
from kv_agent.engines.base import Capture, Generation, PlannedContext
from kv_agent.engines.hf_config import layer_rope_specs
from kv_agent.errors import InvalidArgumentError, UnimplementedError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "gemma3_text")
# Layout of the per-head q/k norm's output: Qwen3 normalises before the head transpose,
# Gemma 3 after it.
_NORM_LAYOUT = {"qwen3": "bthd", "gemma3_text": "bhtd"}
_DTYPES = {
    torch.float32: kv_agent.DType.f32,
    torch.float16: kv_agent.DType.f16,
    torch.bfloat16: kv_agent.DType.bf16,
}
_DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


class UnsupportedModelError(InvalidArgumentError):
    """The model's architecture is not one the transformers adapter knows how to capture
    (an InvalidArgumentError, so also a ValueError)."""


class _StopForward(Exception):
    """Raised from a hook to end a forward once the wanted layers are computed."""


@dataclass
class CapturedKV:
    """KV of a token span as the model produced it.

    kv: float tensor [layers, 2, kv_heads, tokens, head_dim]; K pre-RoPE, V as is.
    positions: int64 tensor [tokens], the positions the tokens were encoded at.
    token_ids: int64 tensor [tokens].
    logits: float tensor [tokens, vocab] of the span (only the last row when last_logits_only).
    """

    kv: torch.Tensor
    positions: torch.Tensor
    token_ids: torch.Tensor
    logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.kv.shape[3])

    def slice(self, start: int, stop: int) -> CapturedKV:
        """Tokens [start, stop) (for splitting a turn into chunks); logits are dropped."""
        return CapturedKV(
            self.kv[:, :, :, start:stop].clone(),
            self.positions[start:stop].clone(),
            self.token_ids[start:stop].clone(),
        )


@dataclass
class GenerationResult:
    token_ids: list[int]
    prefill_tokens: int
    context_tokens: int  # tokens of injected KV the prefill attended to
    prefill_s: float  # wall time of the prefill forward
    ttft_s: float  # prefill + first token selection
    decode_s: float  # wall time of the decode steps after the first token
    total_s: float
    first_logits: torch.Tensor = field(repr=False, default=None)  # [vocab] after the prefill


def _as_ids(ids) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex():
            raise InvalidArgumentError(f"token ids must be integers, got {ids.dtype}")
        t = ids.to(torch.long)
    else:
        arr = np.asarray(ids)
        if arr.size and arr.dtype.kind not in "iu":
            raise InvalidArgumentError(f"token ids must be integers, got {arr.dtype}")
        t = torch.as_tensor(arr.astype(np.int64, copy=False))
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise InvalidArgumentError(f"token ids must be 1-D (one sequence), got shape {tuple(t.shape)}")
    return t


def concat_kv(parts) -> torch.Tensor:
    """Concatenates canonical KV arrays (torch or numpy) along the token axis."""
    ts = [torch.as_tensor(p) for p in parts if p is not None and p.shape[3] > 0]
    if not ts:
        raise InvalidArgumentError("concat_kv needs at least one non-empty part")
    return torch.cat(ts, dim=3)


class HFEngine(base.Engine):
    """Adapter around a loaded transformers causal LM (Llama, Qwen2, Qwen3, Gemma 3 text).

    Shapes use L = layers, Hkv = KV heads, Hq = query heads, D = head_dim, T = tokens.
    """

    name = "hf"
    PLACEMENT_CACHE_ENTRIES = 4  # contexts whose placed form is kept (see the module docstring)

    def __init__(self, model, tokenizer=None, *, cuda_graphs: bool = False):
        """``cuda_graphs``: run ``query_q`` (without a prefix) and ``prefill_context`` as static-shape
        forwards replayed from CUDA graphs (``kv_agent.engines.hf_static``; Llama/Qwen2/Qwen3 with
        full attention; InvalidArgumentError otherwise). A graph is captured per query length (and context
        capacity) on first use; on a CPU model the same static path runs without graphs."""
        cfg = (
            model.config.get_text_config(decoder=True)
            if hasattr(model.config, "get_text_config")
            else model.config
        )
        mt = getattr(cfg, "model_type", None)
        if mt not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"transformers adapter supports model types {SUPPORTED_MODEL_TYPES}; got {mt!r} "
                f"({type(model).__name__})"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.config = cfg
        self.model_type = mt
        base = model.model
        self.layers = list(base.layers[: cfg.num_hidden_layers])
        self.attn = [layer.self_attn for layer in self.layers]
        self.num_layers = cfg.num_hidden_layers
        self.num_q_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * self.num_layers
        self.layer_types = list(types[: self.num_layers])
        sw = getattr(cfg, "sliding_window", None)
        self.windows = [int(sw) if (t == "sliding_attention" and sw) else 0 for t in self.layer_types]
        # Softmax scale of q.k per layer (Gemma 3: query_pre_attn_scalar**-0.5, not head_dim**-0.5).
        self.attn_scale = float(self.attn[0].scaling)
        self.rope_specs = list(layer_rope_specs(cfg))[: self.num_layers]
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if self.dtype not in _DTYPES:
            raise InvalidArgumentError(f"model dtype must be float32, float16 or bfloat16, got {self.dtype}")
        self._fingerprint = None
        self._legacy_fingerprint = None
        self._spec = None
        self._chat_format = None
        self._placed = OrderedDict()  # placement cache: context identity -> _Placed
        self._fused = None  # fused_load_available(), decided on first use
        # transformers renamed the forward's cache argument (past_key_values -> cache, around 5.2x);
        # the other name would vanish into **kwargs and the forward would silently run without
        # the injected context, so use the one this version declares.
        params = inspect.signature(type(model).forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.cuda_graphs = bool(cuda_graphs)
        self._static = {}  # (kind, shape...) -> hf_static runner
        if self.cuda_graphs:
            from kv_agent.engines import hf_static

            hf_static.check_supported(self)

    # ------------------------------------------------------------------ identity
    def _attention_config(self) -> dict:
        """What of the config decides the KV given the weights, in engine-neutral form: geometry,
        per-layer window and RoPE (as parsed into RopeSpec fields), attention scale and the
        activation/norm settings. No library versions, no field spellings that change between
        transformers releases (``rope_theta`` vs ``rope_parameters``)."""
        cfg = self.config

        def rope_fields(r):
            return [r.enabled, r.theta, r.rotary_dim, r.style.name, r.scaling.name, r.factor, r.low_freq_factor,
                    r.high_freq_factor, r.original_max_position, r.beta_fast, r.beta_slow, r.attention_factor,
                    r.dynamic_max_position]

        out = {
            "model_type": self.model_type,
            "layers": self.num_layers, "q_heads": self.num_q_heads, "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "windows": self.windows, "attn_scale": self.attn_scale,
            "rope": [rope_fields(r) for r in self.rope_specs],
        }
        for name in ("hidden_size", "hidden_act", "hidden_activation", "rms_norm_eps", "attention_bias",
                     "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
                     "use_qk_norm", "tie_word_embeddings"):
            v = getattr(cfg, name, None)
            if v is not None:
                out[name] = v
        return out

    def _hash_weights(self, *hashers) -> None:
        for name, t in sorted(self.model.state_dict().items()):
            head = f"{name}|{t.dtype}|{tuple(t.shape)}".encode()
            data = memoryview(t.detach().cpu().contiguous().view(torch.uint8).numpy())
            for h in hashers:
                h.update(head)
                h.update(data)

    def weights_fingerprint(self) -> kv_agent.Hash128:
        """128-bit identity of the weights: BLAKE2b over every parameter and buffer's name, dtype,
        shape and bytes, plus the attention-relevant configuration (``_attention_config``), so it
        stays the same across transformers and kv-agent upgrades. Computed once (about a second
        per GB, together with :meth:`legacy_fingerprint`) and cached."""
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=16, person=b"kvagent-hf-v2")
            h.update(json.dumps(self._attention_config(), sort_keys=True, default=str).encode())
            legacy = hashlib.blake2b(digest_size=16)
            legacy.update(self.config.to_json_string(use_diff=False).encode())
            self._hash_weights(h, legacy)
            self._fingerprint = kv_agent.Hash128.from_hex(h.hexdigest())
            self._legacy_fingerprint = kv_agent.Hash128.from_hex(legacy.hexdigest())
        return self._fingerprint

    def legacy_fingerprint(self) -> kv_agent.Hash128:
        """The fingerprint kv-agent gave these weights before it became version-stable: BLAKE2b
        over ``config.to_json_string(use_diff=False)`` (which embeds the *installed* transformers
        version) and the weights. Memory written under it is migrated when a CacheManager for
        this model attaches (``fingerprint_aliases``); it matches only while the transformers
        version that wrote the memory is still installed."""
        self.weights_fingerprint()
        return self._legacy_fingerprint

    @property
    def fingerprint_aliases(self) -> tuple[kv_agent.Hash128, ...]:
        return (self.legacy_fingerprint(),)

    def model_spec(self, name: str | None = None) -> kv_agent.ModelSpec:
        """The kv_agent ModelSpec of this model: geometry, per-layer window and RoPE, the
        attention scale used by retrieval, KV dtype and the weights fingerprint."""
        spec = kv_agent.ModelSpec()
        spec.name = name or getattr(self.config, "_name_or_path", "") or self.model_type
        spec.num_layers = self.num_layers
        spec.num_q_heads = self.num_q_heads
        spec.num_kv_heads = self.num_kv_heads
        spec.head_dim = self.head_dim
        spec.kv_dtype = _DTYPES[self.dtype]
        spec.attn_scale = self.attn_scale
        layers = []
        for i in range(self.num_layers):
            ls = kv_agent.LayerSpec()
            ls.sliding_window = self.windows[i]
            ls.rope = self.rope_specs[i]
            layers.append(ls)
        spec.layers = layers
        spec.fingerprint = self.weights_fingerprint()
        return spec

    @property
    def spec(self) -> kv_agent.ModelSpec:
        if self._spec is None:
            self._spec = self.model_spec()
        return self._spec

    @property
    def tokenizer(self):
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tok) -> None:
        self._tokenizer = tok
        self._chat_format = None

    @property
    def chat_format(self):
        if self._chat_format is None:
            from kv_agent.chat_format import format_for

            self._chat_format = format_for(self.model_type, self.tokenizer)
        return self._chat_format

    @property
    def max_context_tokens(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 0) or 0)

    def stop_token_ids(self) -> list[int]:
        from kv_agent.models.chat import newline_token_ids

        ids = self.default_eos_ids()
        if self.tokenizer is not None and self.chat_format.stop_at_newline:
            ids += [i for i in newline_token_ids(self.tokenizer) if i not in ids]
        return ids

    # ------------------------------------------------------------------ hooks
    @contextlib.contextmanager
    def _hooks(self, want_kv: bool, q_layers=(), stop_after: int | None = None):
        """Records pre-RoPE K/V (all layers) and/or pre-RoPE Q (q_layers) of the next forward."""
        rec = {"k": [None] * self.num_layers, "v": [None] * self.num_layers, "q": {}}
        handles = []
        D = self.head_dim

        norm_layout = _NORM_LAYOUT.get(self.model_type)

        def to_bhtd(out):
            # [B, T, H*D] (projection) or the per-head norm's output -> [H, T, D]
            if out.dim() == 3:
                b, t, _ = out.shape
                return out.view(b, t, -1, D).transpose(1, 2)[0]
            return out[0].transpose(0, 1) if norm_layout == "bthd" else out[0]

        def make(kind, i):
            def hook(_mod, _inp, out):
                if kind == "q":
                    rec["q"][i] = to_bhtd(out).detach().clone()
                    if stop_after is not None and i == stop_after:
                        raise _StopForward
                else:
                    rec[kind][i] = to_bhtd(out).detach().clone()

            return hook

        try:
            for i, a in enumerate(self.attn):
                if want_kv:
                    kmod = getattr(a, "k_norm", None) or a.k_proj
                    handles.append(kmod.register_forward_hook(make("k", i)))
                    handles.append(a.v_proj.register_forward_hook(make("v", i)))
                if i in q_layers:
                    qmod = getattr(a, "q_norm", None) or a.q_proj
                    handles.append(qmod.register_forward_hook(make("q", i)))
            yield rec
        finally:
            for h in handles:
                h.remove()

    # --------------------------------------------------------------- forward
    def _forward(self, ids: torch.Tensor, cache, start: int, last_logits_only: bool):
        pos = torch.arange(start, start + ids.numel(), device=self.device).unsqueeze(0)
        kwargs = {"logits_to_keep": 1} if last_logits_only else {}
        kwargs[self._cache_arg] = cache
        out = self.model(
            input_ids=ids.to(self.device).unsqueeze(0),
            position_ids=pos,
            use_cache=True,
            **kwargs,
        )
        return out.logits[0], out.cache if hasattr(out, "cache") else out.past_key_values

    @staticmethod
    def _next_pos(cache) -> int:
        """Position of the next token fed after ``cache`` (build_cache may start at an offset)."""
        return getattr(cache, "kv_agent_start", 0) + cache.get_seq_length()

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @torch.no_grad()
    def capture_on_cache(
        self, token_ids, cache=None, start: int | None = None, last_logits_only: bool = True
    ) -> tuple[CapturedKV, object]:
        """Runs the tokens after ``cache`` (positions start..start+T-1) and records their KV.

        ``cache`` is a transformers Cache holding the context (None = empty); it is extended in
        place and returned, so turns can be captured one after another. ``start`` defaults to the
        cache's length. Returns (CapturedKV with kv [L, 2, Hkv, T, D], cache).
        """
        ids = _as_ids(token_ids)
        if ids.numel() == 0:
            raise InvalidArgumentError("capture needs at least one token")
        if cache is None:
            cache = self.new_cache()
            cache.kv_agent_start = int(start or 0)
        if start is None:
            start = self._next_pos(cache)
        elif start != self._next_pos(cache) and cache.get_seq_length() > 0:
            raise InvalidArgumentError(
                f"capture: start {start} does not continue the cache (next position {self._next_pos(cache)})"
            )
        with self._hooks(want_kv=True) as rec:
            logits, cache = self._forward(ids, cache, start, last_logits_only)
        k = torch.stack(rec["k"])  # [L, Hkv, T, D]
        v = torch.stack(rec["v"])
        kv = torch.stack([k, v], dim=1)
        positions = torch.arange(start, start + ids.numel(), dtype=torch.long)
        return CapturedKV(kv, positions, ids.clone(), logits), cache

    @torch.no_grad()
    def capture_turns(self, turns, start: int = 0, cache=None) -> tuple[list[CapturedKV], object]:
        """Captures a sequence of token spans (e.g. [system prefix, turn 1, turn 2, ...]) in order,
        each attending to all earlier ones. Returns one CapturedKV per span and the cache."""
        out = []
        for t in turns:
            c, cache = self.capture_on_cache(t, cache=cache, start=None if cache is not None else start)
            out.append(c)
        return out, cache

    # ------------------------------------------------------------- injection
    def rotate_keys(self, k: torch.Tensor, positions, layer: int, inverse: bool = False) -> torch.Tensor:
        """Applies (or undoes) layer ``layer``'s RoPE to keys [..., T, D] at ``positions`` [T]."""
        pos = torch.as_tensor(positions, dtype=torch.long).cpu()
        out = _rope.apply(k.detach().cpu(), pos, self.rope_specs[layer], self.head_dim, inverse=inverse)
        return out.to(device=self.device, dtype=k.dtype)

    def _check_kv(self, kv) -> torch.Tensor:
        if not isinstance(kv, (torch.Tensor, np.ndarray)):
            raise InvalidArgumentError(f"kv must be a torch tensor or numpy array, got {type(kv).__name__}")
        kv = torch.as_tensor(kv)
        if kv.dtype not in _DTYPES:
            raise InvalidArgumentError(f"kv dtype must be float32, float16 or bfloat16, got {kv.dtype}")
        if kv.device.type not in ("cpu", self.device.type):
            raise InvalidArgumentError(f"kv must be on the CPU or the model's device ({self.device}), got {kv.device}")
        want = (self.num_layers, 2, self.num_kv_heads, self.head_dim)
        if kv.dim() != 5 or (kv.shape[0], kv.shape[1], kv.shape[2], kv.shape[4]) != want:
            raise InvalidArgumentError(
                f"kv must be [layers={want[0]}, 2, kv_heads={want[2]}, tokens, "
                f"head_dim={want[3]}], got {tuple(kv.shape)}"
            )
        return kv

    @torch.no_grad()
    def build_cache(self, kv, start: int = 0):
        """A DynamicCache holding ``kv`` [L, 2, Hkv, P, D] (pre-RoPE K) at positions start..start+P-1.

        The planned context is contiguous: token i of ``kv`` is placed at position start + i
        (transformers masks by cache index, so contiguity is what keeps causal and sliding-window
        masks right; ``start`` only shifts the rotation, and later forwards on this cache continue
        at start + P). Sliding-window layers keep only the last window - 1 tokens, as
        transformers' own cache would.
        """
        kv = self._check_kv(kv)
        if start < 0:
            raise InvalidArgumentError(f"build_cache: start must be >= 0, got {start}")
        P = int(kv.shape[3])
        cache = self.new_cache()
        cache.kv_agent_start = int(start)
        if P == 0:
            return cache
        for i, layer in enumerate(cache.layers):
            w = self.windows[i]
            lo = max(0, P - (w - 1)) if w else 0
            k = kv[i, 0, :, lo:].to(device=self.device, dtype=self.dtype)
            v = kv[i, 1, :, lo:].to(device=self.device, dtype=self.dtype)
            k = self.rotate_keys(k, torch.arange(start + lo, start + P), i)
            layer.update(k.unsqueeze(0).contiguous(), v.unsqueeze(0).contiguous())
            if w:
                layer.cumulative_length = P  # tokens dropped above still count for masks/positions
        return cache

    # ------------------------------------------------------------- retrieval
    @torch.no_grad()
    def query_q(self, query_ids, prefix_kv=None, layers=None, *, cache=None) -> dict[int, torch.Tensor]:
        """Pre-RoPE queries of the new query tokens for retrieval scoring.

        The query tokens are run after the (injected) system prefix only, at positions
        P..P+T-1, and the forward stops right after the last requested layer's q projection
        (+ q_norm) is computed. Cost: T tokens through max(layers)+1 layers (the last only up to
        q), attention over P + T keys; nothing of it is reused by the later prefill (there the
        query attends to the retrieved context too). Returns {layer: q [Hq, T, D]} (after q_norm
        for Gemma 3/Qwen3, before rotation). ``layers`` defaults to all layers. ``cache``: a
        transformers cache holding the context instead of ``prefix_kv`` (it is extended in place).
        """
        ids = _as_ids(query_ids)
        layers = sorted(set(range(self.num_layers) if layers is None else layers))
        if not layers or layers[0] < 0 or layers[-1] >= self.num_layers:
            raise InvalidArgumentError(f"layers must be within [0, {self.num_layers}), got {layers}")
        if self.cuda_graphs and prefix_kv is None and cache is None:
            key = ("q", int(ids.numel()), tuple(layers))
            if key not in self._static:
                from kv_agent.engines.hf_static import StaticQueryQ

                self._static[key] = StaticQueryQ(self, int(ids.numel()), layers)
            return self._static[key](ids)
        if cache is None:
            cache = self.build_cache(prefix_kv) if prefix_kv is not None else self.new_cache()
        start = self._next_pos(cache)
        with (
            self._hooks(want_kv=False, q_layers=layers, stop_after=layers[-1]) as rec,
            contextlib.suppress(_StopForward),
        ):
            self._forward(ids, cache, start, last_logits_only=True)
        return {i: rec["q"][i] for i in layers}

    # ------------------------------------------------- Engine interface (planned contexts)
    @torch.no_grad()
    def capture(self, token_ids: Sequence[int], context: PlannedContext | None = None) -> Capture:
        """KV of ``token_ids`` encoded after ``context`` (canonical layout, keys pre-RoPE, on the
        model's device), positions from ``context.total_positions``."""
        ids = _as_ids(token_ids)
        self._check_token_range(ids)
        cache = self._place(context, remember=True) if context is not None and context.segments else None
        cap, _ = self.capture_on_cache(ids, cache=cache, start=None if cache is not None else 0)
        return Capture(cap.kv, cap.positions, ids.tolist())

    @torch.no_grad()
    def query_vectors(self, token_ids: Sequence[int], context: PlannedContext | None,
                      layers: Sequence[int]) -> torch.Tensor:
        """Pre-RoPE Q ``[len(layers), Hq, T, D]`` float32 (CPU) of ``token_ids`` after ``context``,
        stacked in the order of ``layers`` (repeats allowed)."""
        ids = _as_ids(token_ids)
        if ids.numel() == 0:
            raise InvalidArgumentError("query_vectors needs at least one token")
        self._check_token_range(ids)
        layers = [int(i) for i in layers]
        if not layers:
            raise InvalidArgumentError("query_vectors needs at least one layer")
        cache = self._place(context, remember=True) if context is not None and context.segments else None
        if cache is None:
            q = self.query_q(ids, layers=layers)
        else:
            q = self.query_q(ids, layers=layers, cache=cache)
        return torch.stack([q[i] for i in layers]).float().cpu().contiguous()

    @torch.no_grad()
    def generate(self, token_ids: Sequence[int], context: PlannedContext, *, max_new_tokens: int = 128,
                 stop_ids: Sequence[int] | None = None) -> Generation:
        """Places ``context`` (keys rotated once to their planned positions), prefills only
        ``token_ids`` and decodes greedily. ``stop_ids`` default: :meth:`stop_token_ids`."""
        ids = _as_ids(token_ids)
        if ids.numel() == 0:
            raise InvalidArgumentError("generate needs at least one new token")
        self._check_token_range(ids)
        if max_new_tokens < 1:
            raise InvalidArgumentError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        t0 = time.perf_counter()
        cache = self._place(context, remember=False) if context is not None else self.new_cache()
        t_load = time.perf_counter()
        res = self.generate_on_cache(ids, cache, max_new_tokens=max_new_tokens,
                                     eos_ids=self.stop_token_ids() if stop_ids is None else list(stop_ids))
        load_s = t_load - t0
        return Generation(token_ids=res.token_ids, prefill_tokens=res.prefill_tokens,
                          reused_tokens=context.total_positions if context is not None else 0,
                          ttft_s=load_s + res.ttft_s, total_s=load_s + res.total_s, load_s=load_s,
                          extra={"prefill_s": res.prefill_s, "decode_s": res.decode_s,
                                 "first_logits": res.first_logits})

    def clear_placement_cache(self) -> None:
        """Drops the placed contexts kept by ``capture`` / ``query_vectors``."""
        self._placed.clear()

    def _check_token_range(self, ids: torch.Tensor) -> None:
        vocab = int(getattr(self.config, "vocab_size", 0) or 0)
        if ids.numel() and vocab and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise InvalidArgumentError(
                f"token ids must be in [0, {vocab}) for this model, got [{int(ids.min())}, {int(ids.max())}]")

    def _segment_kv(self, context: PlannedContext, seg) -> tuple[torch.Tensor, kv_agent.Hash128]:
        if seg.recompute_tokens:
            raise UnimplementedError("the transformers adapter does not recompute leading segment tokens "
                                     "(PlanOptions.sink_repair_tokens must be 0)")
        stored = context.store.get(seg.key, context.fingerprint)
        if int(stored.num_tokens) != seg.num_tokens:
            raise InvalidArgumentError(f"segment {seg.key.hex()} holds {int(stored.num_tokens)} tokens, "
                                       f"the plan places {seg.num_tokens}")
        if not stored.pre_rope:
            raise UnimplementedError(f"segment {seg.key.hex()} holds post-RoPE keys; the adapter places pre-RoPE KV")
        return self._check_kv(stored.kv(framework="torch")), stored.content_hash()

    def _rotated_layers(self, kv: torch.Tensor, start: int, base=None) -> list:
        """Per layer (K rotated to positions start.., V) of canonical ``kv`` placed after ``base``'s
        layers (a placed leading run, or None); sliding layers keep the last window - 1 tokens."""
        T = int(kv.shape[3])
        out = []
        for i in range(self.num_layers):
            w = self.windows[i]
            lo = max(0, T - (w - 1)) if w else 0
            k = kv[i, 0, :, lo:].to(device=self.device, dtype=self.dtype)
            v = kv[i, 1, :, lo:].to(device=self.device, dtype=self.dtype)
            k = self.rotate_keys(k, torch.arange(start + lo, start + T), i)
            if base is not None:
                bk, bv = base[i]
                k, v = torch.cat([bk, k], dim=1), torch.cat([bv, v], dim=1)
                if w:
                    keep = k.shape[1] - max(0, k.shape[1] - (w - 1))
                    k, v = k[:, k.shape[1] - keep:], v[:, v.shape[1] - keep:]
            out.append((k, v))
        return out

    def fused_load_available(self) -> bool:
        """True when planned segments are placed with the fused CUDA kernels (model on a CUDA
        device and a CUDA build of kv_agent); otherwise placement rotates with the C++ positioner
        on the host."""
        if self._fused is None:
            from kv_agent import cuda as kcuda

            self._fused = self.device.type == "cuda" and kcuda.is_available()
        return self._fused

    def _device_source(self, context: PlannedContext, seg, has_tier: bool):
        """(CUDA source of ``seg``'s canonical KV in the model's dtype, its token ids). With a
        device tier: the store's resident copy (a DeviceSegment: no copy on a hit, one host ->
        device copy into the tier on a miss); without one, or for a segment larger than the
        tier, one host -> device copy of the payload."""
        from kv_agent.errors import ResourceExhaustedError

        if seg.recompute_tokens:
            raise UnimplementedError("the transformers adapter does not recompute leading segment tokens "
                                     "(PlanOptions.sink_repair_tokens must be 0)")
        src = None
        if has_tier:
            with contextlib.suppress(ResourceExhaustedError):
                src = context.store.get_device(seg.key, context.fingerprint)
        if src is None:
            src = context.store.get(seg.key, context.fingerprint)
        n, pre_rope, tokens = int(src.num_tokens), bool(src.pre_rope), src.tokens
        if n != seg.num_tokens:
            raise InvalidArgumentError(f"segment {seg.key.hex()} holds {n} tokens, the plan places {seg.num_tokens}")
        if not pre_rope:
            raise UnimplementedError(f"segment {seg.key.hex()} holds post-RoPE keys; the adapter places pre-RoPE KV")
        if not isinstance(src, kv_agent.cuda.DeviceSegment):
            src = src.kv(framework="torch").to(self.device, non_blocking=True)
        if str(src.dtype).removeprefix("torch.") not in (_DTYPE_NAMES[self.dtype], str(self.dtype).removeprefix("torch.")):
            src = (src if isinstance(src, torch.Tensor) else src.kv()).to(self.dtype)  # the kernels copy one dtype
        return src, tokens

    def _fused_layers(self, context: PlannedContext, rest, base, hashes: list) -> list:
        """As ``_rotated_layers`` over the segments ``rest``, on the GPU: each segment goes from
        its CUDA source (``_device_source``) straight into the per-layer caches through
        ``kv_agent.cuda.load``, keys rotated to their planned positions in the copy (sliding
        layers keep the last window - 1 tokens), one segment at a time (a source is dropped once
        its copy is enqueued, so a small device tier can evict it); ``base`` (a placed leading
        run) is copied in front. Appends the segments' content hashes to ``hashes``."""
        from kv_agent import cuda as kcuda

        has_tier = bool(context.store.stats().get("has_device"))
        begin = rest[0].position
        T = sum(s.num_tokens for s in rest)
        rope = kcuda.rope_table(self.spec)
        stream = kcuda.current_stream(self.device.index)
        out, keep_lo = [], []
        for i in range(self.num_layers):
            w = self.windows[i]
            lo = max(0, T - (w - 1)) if w else 0  # first token of the rest this layer keeps
            nb = 0 if base is None else int(base[i][0].shape[1])
            if w:
                nb = min(nb, max(0, (w - 1) - (T - lo)))
            k = torch.empty((self.num_kv_heads, nb + T - lo, self.head_dim), device=self.device, dtype=self.dtype)
            v = torch.empty_like(k)
            if nb:
                k[:, :nb].copy_(base[i][0][:, base[i][0].shape[1] - nb:])
                v[:, :nb].copy_(base[i][1][:, base[i][1].shape[1] - nb:])
            out.append((k, v))
            keep_lo.append((lo, nb))
        windowed = any(self.windows)
        offset = 0  # token of the rest where the segment starts
        for s in rest:
            src, tokens = self._device_source(context, s, has_tier)
            hashes.append(kv_agent.content_hash(context.fingerprint, [int(t) for t in tokens]))
            if not windowed:  # every layer keeps every token: one launch for the segment
                kcuda.load(src, [k for k, _ in out], [v for _, v in out], layout="head_major", rope=rope,
                           rotation="apply", slots=keep_lo[0][1] + offset, new_positions=begin + offset,
                           stream=stream)
            for i in range(self.num_layers) if windowed else ():
                lo, nb = keep_lo[i]
                first = max(lo, offset)  # first token of this segment the layer keeps
                count = offset + s.num_tokens - first
                if count > 0:
                    kcuda.load(src, [out[i][0]], [out[i][1]], layout="head_major", rope=rope, rotation="apply",
                               slots=nb + first - lo, new_positions=begin + first, token_begin=first - offset,
                               num_tokens=count, layer_begin=i, span_layer_begin=i, stream=stream)
            offset += s.num_tokens
            del src
        return out

    @torch.no_grad()
    def _place(self, context: PlannedContext, remember: bool):
        """A DynamicCache holding ``context`` at its planned positions (see the module docstring
        for the placement cache; ``remember`` adds this context to it)."""
        if not isinstance(context, PlannedContext):
            raise InvalidArgumentError(f"context must be a PlannedContext, got {type(context).__name__}")
        segs = context.segments
        cache = self.new_cache()
        if not segs:
            cache.kv_agent_start = 0
            return cache
        start = segs[0].position
        if start < 0:
            raise InvalidArgumentError(f"planned positions must be >= 0, got {start}")
        for a, b in zip(segs, segs[1:], strict=False):
            if b.position != a.position + a.num_tokens:
                raise InvalidArgumentError(
                    "the transformers adapter needs a contiguous plan (each segment starts where the previous "
                    f"ends): {a.key.hex()} ends at {a.position + a.num_tokens}, the next starts at {b.position}")
        ident = (id(context.store), context.fingerprint.hex())
        seg_ids = [(s.key.hex(), s.position, s.num_tokens) for s in segs]
        # The longest cached leading run of this context (entries hold their segments' content hashes).
        best, best_n = None, 0
        for (store_fp, run), entry in self._placed.items():
            n = len(run)
            if store_fp == ident and best_n < n <= len(seg_ids) and list(run) == seg_ids[:n]:
                best, best_n = entry, n
        if best is not None:
            hashes = [context.store.get(s.key, context.fingerprint).content_hash() for s in segs[:best_n]]
            if hashes != best["hashes"]:  # a key re-stored with other content: drop the stale entry
                self._placed = OrderedDict((k, e) for k, e in self._placed.items() if e is not best)
                best, best_n = None, 0
        layers, hashes = (best["layers"], list(best["hashes"])) if best is not None else (None, [])
        rest = segs[best_n:]
        if rest and self.fused_load_available():
            layers = self._fused_layers(context, rest, layers, hashes)
        elif rest:
            parts = []
            for s in rest:
                kv, h = self._segment_kv(context, s)
                parts.append(kv)
                hashes.append(h)
            layers = self._rotated_layers(torch.cat(parts, dim=3) if len(parts) > 1 else parts[0],
                                          rest[0].position, layers)
        total = context.total_positions - start
        key = (ident, tuple(seg_ids))
        if remember:
            self._placed[key] = {"layers": layers, "hashes": hashes}
            self._placed.move_to_end(key)
            while len(self._placed) > self.PLACEMENT_CACHE_ENTRIES:
                self._placed.popitem(last=False)
        elif best is not None:
            self._placed.move_to_end((ident, tuple(seg_ids[:best_n])))
        cache.kv_agent_start = int(start)
        for i, layer in enumerate(cache.layers):
            k, v = layers[i]
            layer.update(k.unsqueeze(0).contiguous(), v.unsqueeze(0).contiguous())
            if self.windows[i]:
                layer.cumulative_length = total  # tokens dropped above still count for masks/positions
        return cache

    def static_prefill(self, capacity: int, query_tokens: int):
        """The (cached) ``hf_static.StaticPrefill`` runner for up to ``capacity`` context tokens and
        ``query_tokens`` query tokens: load / inject / forward as separate steps (for timing)."""
        key = ("prefill", int(capacity), int(query_tokens))
        if key not in self._static:
            from kv_agent.engines.hf_static import StaticPrefill

            self._static[key] = StaticPrefill(self, int(capacity), int(query_tokens))
        return self._static[key]

    @torch.no_grad()
    def prefill_context(self, kv_parts, token_ids, start: int = 0, capacity: int | None = None) -> torch.Tensor:
        """Logits [vocab] of the last of ``token_ids`` run after a planned context: the parts
        (canonical [L, 2, Hkv, t, D], K pre-RoPE; any device, pinned host memory copies
        asynchronously) concatenated at positions start.. . The same as
        ``prefill(token_ids, build_cache(concat_kv(kv_parts), start))`` within rounding; with
        ``cuda_graphs`` the rotation and the forward are CUDA graph replays over a static cache of
        ``capacity`` context slots (default: the context length rounded up to a power of two,
        at least 256, so similar contexts share one graph)."""
        ids = _as_ids(token_ids)
        parts = [p for p in kv_parts if p is not None and p.shape[3] > 0]
        if not self.cuda_graphs:
            if parts:
                cache = self.build_cache(concat_kv(parts), start)
            else:
                cache = self.new_cache()
                cache.kv_agent_start = int(start)
            return self.prefill(ids, cache).float()
        n = sum(int(p.shape[3]) for p in parts)
        cap = capacity or max(256, 1 << max(0, n - 1).bit_length())
        return self.static_prefill(cap, int(ids.numel()))(parts, ids, start)

    # ------------------------------------------------------- prefill / decode
    @torch.no_grad()
    def prefill(self, token_ids, cache) -> torch.Tensor:
        """Runs only ``token_ids`` after the context in ``cache`` (extended in place); returns the
        last token's logits [vocab]."""
        ids = _as_ids(token_ids)
        logits, _ = self._forward(ids, cache, self._next_pos(cache), last_logits_only=True)
        return logits[-1]

    @torch.no_grad()
    def generate_on_cache(self, token_ids, cache=None, max_new_tokens: int = 64, eos_ids=None) -> GenerationResult:
        """Greedy decoding of ``token_ids`` after ``cache`` (e.g. from build_cache)."""
        t0 = time.perf_counter()
        cache = cache if cache is not None else self.new_cache()
        ctx = cache.get_seq_length()
        ids = _as_ids(token_ids)
        logits = self.prefill(ids, cache)
        t_pre = time.perf_counter()
        first_logits = logits.detach().float().cpu()
        eos = set(self.default_eos_ids() if eos_ids is None else eos_ids)
        out = [int(torch.argmax(logits))]
        t_first = time.perf_counter()
        while len(out) < max_new_tokens and out[-1] not in eos:
            logits = self.prefill([out[-1]], cache)
            out.append(int(torch.argmax(logits)))
        t_end = time.perf_counter()
        if out and out[-1] in eos:
            out = out[:-1]
        return GenerationResult(
            out, int(ids.numel()), ctx, t_pre - t0, t_first - t0, t_end - t_first, t_end - t0, first_logits
        )

    def default_eos_ids(self) -> list[int]:
        ids = set()
        gc = getattr(self.model, "generation_config", None)
        for src in (getattr(gc, "eos_token_id", None), getattr(self.config, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif src:
                ids.update(int(x) for x in src)
        if self.tokenizer is not None:
            for tok in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>"):
                tid = self.tokenizer.convert_tokens_to_ids(tok)
                if isinstance(tid, int) and tid != getattr(self.tokenizer, "unk_token_id", None):
                    ids.add(tid)
        return sorted(ids)


def create(model=None, tokenizer=None, *, device: str | None = None, dtype=None, cuda_graphs: bool = False,
           **options) -> HFEngine:
    """The registry factory behind ``CacheManager(engine="hf", model=...)``.

    ``model``: None (the default model, :func:`kv_agent.models.load_default_model`), a name of
    :data:`kv_agent.models.NAMED_MODELS` (e.g. ``"qwen2.5-coder-0.5b-instruct"``), a local HF
    model directory, a ``(model, tokenizer)`` pair, a loaded transformers model (with
    ``tokenizer=``) or an :class:`HFEngine` (returned as is). ``device`` defaults to CUDA when
    available; ``dtype`` (e.g. ``"bfloat16"``) applies to models loaded here.
    """
    if options:
        raise InvalidArgumentError(f"unknown option(s) for engine 'hf': {', '.join(sorted(options))}")
    if isinstance(model, HFEngine):
        return model
    if model is None or isinstance(model, (str, os.PathLike)):
        from kv_agent.models import NAMED_MODELS, load_default_model, load_model, load_named_model

        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if model is None:
            model, tokenizer = load_default_model(dtype=dtype, device=dev)
        elif isinstance(model, str) and model in NAMED_MODELS:
            name = model
            model, tokenizer = load_named_model(name, dtype=dtype, device=dev)
            engine = HFEngine(model, tokenizer, cuda_graphs=cuda_graphs)
            engine.model_name = name  # selects the model's retrieval profile (kv_agent.retrieval_profile)
            return engine
        else:
            if not os.path.isdir(os.fspath(model)):
                raise InvalidArgumentError(f"model {os.fspath(model)!r} is not a local model directory")
            model, tokenizer = load_model(model, dtype=dtype, device=dev)
    elif isinstance(model, tuple):
        if len(model) != 2:
            raise InvalidArgumentError("model=(model, tokenizer) needs exactly two items")
        model, tokenizer = model
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise InvalidArgumentError(f"engine 'hf' needs a transformers causal LM, got {type(model).__name__}")
    return HFEngine(model, tokenizer, cuda_graphs=cuda_graphs)


base.register("hf", create)
