"""vLLM adapter: a vLLM ``LLM`` (v1 engine, CPU or GPU build) behind the :class:`Engine` interface.

The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with the kv-agent
connector (:mod:`kv_agent.engines.vllm_connector`) configured through ``kv_transfer_config``:
the connector shares this process's open Store, so no second process ever opens the store.

* ``capture``: the context is loaded by the connector, vLLM computes ``token_ids`` (one
  forward, one sampled token), and the connector takes their KV from the paged blocks after the
  forward (keys un-rotated) -> canonical layout.
* ``query_vectors``: the same request, with forward hooks on vLLM's attention modules recording
  the pre-RoPE queries (after ``q_norm`` where the model has one) of the scheduled tokens. The
  forward is vLLM's own, so Q comes from the weights vLLM serves; see docs/engine-vllm.md for the
  choice and its cost.
* ``generate``: the planned segments are loaded into vLLM's blocks at their planned positions
  (prompt = context tokens + ``token_ids``; the connector supplies the context tokens), vLLM
  prefills only ``token_ids`` and decodes greedily. Prefilled/reused counts and TTFT are vLLM's
  (``RequestOutput.num_cached_tokens``, the request's scheduled and first-token timestamps).

vLLM's own prefix cache is off so that every context token comes from kv-agent.
Install: ``make vllm-venv`` (vLLM pins its own torch/transformers; see docs/engine-vllm.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch

from kv_agent import _core
from kv_agent import rope as _rope
from kv_agent.engines.base import Capture, Engine, Generation, PlannedContext, register
from kv_agent.errors import FailedPreconditionError, InvalidArgumentError

try:
    import vllm  # noqa: F401
except ImportError as e:  # registry turns this into FailedPreconditionError at create()
    raise ImportError(f"{e}; install vLLM with `make vllm-venv` (CPU) or `pip install vllm` (GPU)") from e

from kv_agent.engines import vllm_connector as _conn

_DTYPES = {torch.float32: _core.DType.f32, torch.float16: _core.DType.f16, torch.bfloat16: _core.DType.bf16}
_QNORM_MODEL_TYPES = ("gemma3_text", "gemma3", "qwen3")


def default_model_dir() -> Path:
    """The default model as a safetensors directory (dequantised once from its GGUF and cached by
    :mod:`kv_agent.models.loader`; vLLM's CPU build cannot read GGUF)."""
    from kv_agent.models import loader

    gguf = loader.default_gguf_path()
    out = loader.converted_dir_for(gguf, loader.DEFAULT_MODEL_NAME)
    if not (out / loader._CONVERTED_MARKER).is_file():
        loader.convert_gguf(gguf, out)
    return out


class VLLMEngine(Engine):
    """A vLLM ``LLM`` with the kv-agent connector. ``model``: a local HF safetensors directory
    (default: the default model). ``dtype``: "auto" keeps the checkpoint's dtype. ``store_path``:
    a store directory for requests sent to ``self.llm`` without a plan (prefix chunks persisted
    and reused, as with the server); planned requests use the store of their PlannedContext."""

    name = "vllm"

    def __init__(self, model: str | os.PathLike | None = None, *, dtype: str = "auto", max_model_len: int = 16384,
                 kv_cache_gb: int = 2, block_size: int | None = None, store_path: str | None = None,
                 **llm_kwargs):
        from transformers import AutoConfig, AutoTokenizer

        path = Path(model).expanduser() if model is not None else default_model_dir()
        if not (path / "config.json").is_file():
            raise InvalidArgumentError(f"{path} is not a Hugging Face model directory (no config.json)")
        self.model_dir = path
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core (and connector) in this process
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gb))
        cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
        self.config = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
        self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self._fingerprint = _conn.model_fingerprint(str(path))
        from vllm import LLM

        extra = {"fingerprint": self._fingerprint.hex()}
        if store_path is not None:
            extra["store_path"] = str(store_path)
        kw = dict(model=str(path), tokenizer=str(path), dtype=dtype, enforce_eager=True,
                  enable_prefix_caching=False, max_model_len=max_model_len,
                  max_num_batched_tokens=max_model_len, max_num_seqs=4, disable_log_stats=False,
                  kv_transfer_config={
                      "kv_connector": "KvAgentConnector", "kv_role": "kv_both",
                      "kv_connector_module_path": "kv_agent.engines.vllm_connector",
                      "kv_connector_extra_config": extra})
        if block_size is not None:
            kw["block_size"] = block_size
        kw.update(llm_kwargs)
        self.llm = LLM(**kw)
        self.model = self._model()
        self.dtype = next(self.model.parameters()).dtype
        self._store_ids: dict[int, str] = {}
        self._spec = self._make_spec()
        self.max_model_len = int(max_model_len)
        self.store_path = store_path

    @property
    def max_context_tokens(self) -> int:
        return self.max_model_len

    @property
    def plain_store(self):
        """The Store at ``store_path`` that plain requests (no plan) read and write."""
        if self.store_path is None:
            raise FailedPreconditionError("this engine was created without store_path")
        return _conn._open_path_store(str(self.store_path))

    # ------------------------------------------------------------------ identity
    def _model(self):
        core = getattr(self.llm.llm_engine, "engine_core", None)
        core = getattr(core, "engine_core", core)  # InprocClient -> EngineCore
        ex = getattr(core, "model_executor", None)
        worker = getattr(getattr(ex, "driver_worker", None), "worker", None)
        runner = getattr(worker, "model_runner", None)
        if runner is None:
            raise FailedPreconditionError("vLLM engine core is not in this process (multiprocessing is on)")
        return runner.get_model()

    def _make_spec(self) -> _core.ModelSpec:
        cfg = self.config
        spec = _core.ModelSpec()
        spec.name = self.model_dir.name
        spec.num_layers = int(cfg.num_hidden_layers)
        spec.num_q_heads = int(cfg.num_attention_heads)
        spec.num_kv_heads = int(cfg.num_key_value_heads)
        spec.head_dim = self.head_dim
        spec.kv_dtype = _DTYPES[self.dtype]
        qpas = getattr(cfg, "query_pre_attn_scalar", None)
        spec.attn_scale = float(qpas ** -0.5 if qpas else self.head_dim ** -0.5)
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * spec.num_layers
        sw = getattr(cfg, "sliding_window", None)
        ropes = _rope.layer_rope_specs(cfg)
        layers = []
        for i in range(spec.num_layers):
            ls = _core.LayerSpec()
            ls.sliding_window = int(sw) if (types[i] == "sliding_attention" and sw) else 0
            ls.rope = ropes[i]
            layers.append(ls)
        spec.layers = layers
        spec.fingerprint = self._fingerprint
        return spec

    @property
    def head_dim(self) -> int:
        cfg = self.config
        return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    @property
    def spec(self) -> _core.ModelSpec:
        return self._spec

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def chat_format(self):
        from kv_agent.chat_format import format_for

        return format_for(self.config.model_type, self._tokenizer)

    def stop_token_ids(self) -> list[int]:
        ids = set()
        for src in (getattr(self.config, "eos_token_id", None), self._tokenizer.eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif src:
                ids.update(int(x) for x in src)
        for tok in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>"):
            tid = self._tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != getattr(self._tokenizer, "unk_token_id", None):
                ids.add(tid)
        return sorted(ids)

    # ------------------------------------------------------------------ requests
    def _store_id(self, store) -> str:
        sid = self._store_ids.get(id(store))
        if sid is None:
            sid = self._store_ids[id(store)] = _conn.register_store(store)
        return sid

    def _context_tokens(self, context: PlannedContext | None) -> tuple[list[int], list[list]]:
        if context is None or not context.segments:
            return [], []
        toks, load = [], []
        for s in context.segments:
            if s.position != len(toks):
                raise InvalidArgumentError(
                    f"vLLM places context contiguously from 0: segment at {s.position}, expected {len(toks)}")
            ids = list(s.token_ids) or [int(t) for t in context.store.get(s.key, context.fingerprint).tokens]
            if len(ids) != s.num_tokens:
                raise InvalidArgumentError(f"segment {s.key.hex()} has {len(ids)} tokens, plan says {s.num_tokens}")
            toks += ids
            load.append([s.key.hex(), s.num_tokens])
        return toks, load

    def _run(self, token_ids: Sequence[int], context: PlannedContext | None, *, max_tokens: int,
             stop_ids=(), capture: str | None = None):
        from vllm import SamplingParams, TokensPrompt

        ids = [int(t) for t in token_ids]
        if not ids:
            raise InvalidArgumentError("need at least one new token")
        ctx_ids, load = self._context_tokens(context)
        store = context.store if context is not None else None
        params = {"store": self._store_id(store) if store is not None else "", "load": load, "capture": capture}
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=list(stop_ids) or None,
                            detokenize=False, extra_args={"kv_transfer_params": {_conn.PARAMS_KEY: params}})
        t0 = time.perf_counter()
        out = self.llm.generate(TokensPrompt(prompt_token_ids=ctx_ids + ids), sp, use_tqdm=False)[0]
        return out, len(ctx_ids), time.perf_counter() - t0

    # ------------------------------------------------------------------ capture / query
    def capture(self, token_ids: Sequence[int], context: PlannedContext | None = None) -> Capture:
        cid = uuid.uuid4().hex
        _, n_ctx, _ = self._run(token_ids, context, max_tokens=1, capture=cid)
        kv, pos = _conn.take_capture(cid)
        if pos.numel() != len(token_ids) or int(pos[0]) != n_ctx:
            raise FailedPreconditionError(
                f"vLLM computed {pos.numel()} tokens from position {int(pos[0])}; expected {len(token_ids)} "
                f"from {n_ctx} (was the context loaded?)")
        return Capture(kv, pos, [int(t) for t in token_ids])

    @contextlib.contextmanager
    def _q_hooks(self, layers: Sequence[int]):
        cfg = self.config
        hq, d = int(cfg.num_attention_heads), self.head_dim
        rec: dict[int, torch.Tensor] = {}
        handles = []
        decoder_layers = self.model.model.layers

        def make(i, split_qkv):
            def hook(_m, _inp, out):
                if i in rec:  # only the first forward (the prompt)
                    return
                t = out[0] if isinstance(out, tuple) else out
                if split_qkv:
                    t = t[:, : hq * d]
                rec[i] = t.detach().reshape(t.shape[0], hq, d).transpose(0, 1).float().clone()
            return hook

        try:
            for i in set(layers):
                attn = decoder_layers[i].self_attn
                qn = getattr(attn, "q_norm", None)
                mod, split = (qn, False) if qn is not None else (attn.qkv_proj, True)
                handles.append(mod.register_forward_hook(make(i, split)))
            yield rec
        finally:
            for h in handles:
                h.remove()

    def query_vectors(self, token_ids: Sequence[int], context: PlannedContext | None, layers: Sequence[int]):
        layers = [int(i) for i in layers]
        if not layers or any(i < 0 or i >= self._spec.num_layers for i in layers):
            raise InvalidArgumentError(f"layers must be within [0, {self._spec.num_layers}), got {layers}")
        with self._q_hooks(layers) as rec:
            self._run(token_ids, context, max_tokens=1)
        n = len(token_ids)
        for i in layers:
            if i not in rec or rec[i].shape[1] != n:
                got = None if i not in rec else tuple(rec[i].shape)
                raise FailedPreconditionError(f"layer {i}: recorded Q {got}, expected {n} query tokens")
        return torch.stack([rec[i] for i in layers])

    # ------------------------------------------------------------------ generate
    def generate(self, token_ids: Sequence[int], context: PlannedContext, *, max_new_tokens: int = 128,
                 stop_ids: Sequence[int] | None = None) -> Generation:
        stop = self.stop_token_ids() if stop_ids is None else list(stop_ids)
        before = self.connector_stats()
        out, n_ctx, wall = self._run(token_ids, context, max_tokens=max_new_tokens, stop_ids=stop)
        load_s = self.connector_stats().get("load_s", 0.0) - before.get("load_s", 0.0)
        comp = out.outputs[0]
        toks = [int(t) for t in comp.token_ids]
        if toks and toks[-1] in stop:
            toks = toks[:-1]
        cached = int(out.num_cached_tokens or 0)
        prompt_len = n_ctx + len(token_ids)
        ttft = _ttft(out)
        return Generation(toks, prefill_tokens=prompt_len - cached, reused_tokens=cached,
                          ttft_s=ttft if ttft is not None else wall, total_s=wall, load_s=load_s,
                          extra={"vllm_num_cached_tokens": cached, "vllm_ttft_s": ttft, "context_tokens": n_ctx,
                                 "connector": self.connector_stats()})

    def connector_stats(self) -> dict:
        conn = self._worker_connector()
        return dict(conn.stats) if conn is not None else {}

    def _worker_connector(self):
        with contextlib.suppress(Exception):
            from vllm.distributed.kv_transfer import get_kv_transfer_group

            return get_kv_transfer_group()
        return None

    def close(self) -> None:
        for sid in self._store_ids.values():
            _conn.unregister_store(sid)
        self._store_ids.clear()
        llm = getattr(self, "llm", None)
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            self.llm = None


def _ttft(out) -> float | None:
    """vLLM's time to first token of a finished request (its ``first_token_latency``: arrival to
    first token, the value behind vLLM's TTFT histogram), when stats are logged."""
    m = getattr(out, "metrics", None)
    ftl = getattr(m, "first_token_latency", None)
    if ftl:
        return float(ftl)
    x, y = getattr(m, "first_token_ts", None), getattr(m, "queued_ts", None)
    return float(x - y) if x and y else None


def server_kv_transfer_config(store_path: str, chunk_tokens: int | None = None) -> str:
    """The ``--kv-transfer-config`` JSON that makes vLLM's OpenAI server persist requests' KV."""
    extra = {"store_path": str(store_path)}
    if chunk_tokens:
        extra["chunk_tokens"] = int(chunk_tokens)
    return json.dumps({"kv_connector": "KvAgentConnector", "kv_role": "kv_both",
                       "kv_connector_module_path": "kv_agent.engines.vllm_connector",
                       "kv_connector_extra_config": extra})


register("vllm", VLLMEngine)
