"""kv-agent memory on SGLang: planned pages, portable KV, the launch command, the server (engine).

Runs in .venv-sglang (``make test-engine-sglang``); elsewhere the module skips.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.engine
pytest.importorskip(
    "sglang.srt.managers.cache_controller",
    reason="SGLang is installed only in .venv-sglang (make test-engine-sglang)",
)

import torch  # noqa: E402

from kv_agent import _core, rope  # noqa: E402
from kv_agent.engines import base  # noqa: E402
from kv_agent.engines.base import PlannedContext, PlannedSegment  # noqa: E402
from kv_agent.engines.sglang import page_hashes, plan_pages, spool_pages  # noqa: E402
from kv_agent.errors import FailedPreconditionError, InvalidArgumentError  # noqa: E402
from kv_agent.store import Segment, Store  # noqa: E402
from sglang_harness import FINGERPRINT, Harness  # noqa: E402

DOC = Path(__file__).parents[2] / "docs" / "engine-sglang.md"


def _sgl_kernel_error() -> str | None:
    try:
        import sgl_kernel  # noqa: F401
    except Exception as e:  # ImportError, or OSError (libcuda.so.1) where the wheel is installed
        return f"{type(e).__name__}: {e}"
    return None


def test_page_hashes_are_sglangs_chain():
    from sglang.srt.mem_cache.utils import get_hash_str

    ids = list(range(50, 62))
    hashes = page_hashes(ids + [1, 2], page_size=4)  # the 2-token tail is not a page
    assert len(hashes) == 3
    prev = None
    for i, h in enumerate(hashes):  # each page hash chains on the previous one
        prev = get_hash_str(ids[i * 4 : (i + 1) * 4], prev)
        assert h == prev


def _spec(layers=2, heads=2, dim=8):
    r = _core.RopeSpec()
    r.enabled, r.theta, r.rotary_dim = True, 10000.0, dim
    return _core.uniform_model_spec(
        "tiny", layers, heads, heads, dim, _core.DType.bf16, r, _core.Hash128.from_hex(FINGERPRINT)
    )


def test_planned_pages_reach_sglang_through_the_backend(tmp_path):
    spec, P = _spec(), 4
    g = torch.Generator().manual_seed(0)
    store = Store.open(None)
    turns = {"a": list(range(100, 106)), "b": list(range(200, 209)), "q": list(range(300, 305))}
    keys = {}
    for name, toks in turns.items():  # pre-RoPE turns captured at their original positions
        kv = torch.randn(2, 2, 2, len(toks), 8, generator=g).to(torch.bfloat16)
        seg = Segment(
            kv,
            tokens=toks,
            model=spec.fingerprint,
            positions=list(range(500, 500 + len(toks))),
            ns="t",
            session="s",
            turn=len(keys),
            copy=True,
        )
        store.put(seg)
        keys[name] = seg.key
    # plan: b then a (retrieval order), re-positioned from 0; 15 tokens -> 3 full pages + 3 recomputed
    ctx = PlannedContext(
        (PlannedSegment(keys["b"], 9, 0), PlannedSegment(keys["a"], 6, 9)), store, spec.fingerprint
    )
    pages = plan_pages(ctx, spec, P)
    assert pages.token_ids == turns["b"] + turns["a"] and len(pages.hashes) == 3
    # keys of each segment rotated once from pre-RoPE to the planned positions, V untouched
    for name, start in (("b", 0), ("a", 9)):
        src = store.get(keys[name], spec.fingerprint).kv("torch")
        n = min(src.shape[3], 12 - start)
        for layer in range(2):
            want_k = rope.apply(
                src[layer, 0], np.arange(start, start + src.shape[3]), spec.layers[layer].rope, 8
            )
            assert torch.equal(pages.kv[layer, 0, :, start : start + n], want_k[:, :n])
            assert torch.equal(pages.kv[layer, 1, :, start : start + n], src[layer, 1, :, :n])

    spool = tmp_path / "spool"
    assert spool_pages(pages, str(spool), spec.fingerprint, "kv-agent-plan") == 3
    h = Harness(
        layers=2,
        heads=2,
        head_dim=8,
        page_size=P,
        extra={"namespace": "kv-agent-plan", "plan_spool": str(spool), "interface_v1": 1},
    )
    try:
        # SGLang's prefetch of [planned tokens + question] hits the 3 planned pages and loads them
        hit, loaded, idx = h.prefetch(pages.token_ids + turns["q"])
        assert (hit, loaded) == (12, 12)
        for i, got in enumerate(h.pages(idx)):
            assert torch.equal(got, pages.page(i))
        assert not any(spool.iterdir())  # moved into the backend's store
    finally:
        h.close()


def test_plan_without_token_ids_is_refused():
    spec = _spec()
    store = Store.open(None)
    seg = Segment(
        torch.zeros(2, 2, 2, 4, 8, dtype=torch.bfloat16),
        tokens=[-1] * 4,
        model=spec.fingerprint,
        ns="t",
        session="s",
        turn=0,
    )
    store.put(seg)
    ctx = PlannedContext((PlannedSegment(seg.key, 4, 0),), store, spec.fingerprint)
    with pytest.raises(InvalidArgumentError, match="no token ids"):
        plan_pages(ctx, spec, 4)
    with pytest.raises(InvalidArgumentError, match="page_size"):
        plan_pages(ctx, spec, 0)


def _hf_capture(model, tok, ids):
    """Pre-RoPE canonical KV [L, 2, H, T, D] from kv-agent's transformers adapter."""
    return base.create("hf", model=(model, tok)).capture(ids).kv


@pytest.mark.model
def test_kv_through_sglang_pages_matches_the_transformers_adapter(tmp_path):
    """Portable memory: post-RoPE KV as an engine caches it, put into SGLang's host pool with
    SGLang's own page API, backed up by SGLang's controller into the store, and un-rotated by
    kv-agent at the record's positions, equals the transformers adapter's pre-RoPE capture."""
    from kv_agent.models import load_default_model

    model, tok = load_default_model()
    cfg = model.config.get_text_config(decoder=True)
    L, H = cfg.num_hidden_layers, cfg.num_key_value_heads
    D = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    ids = tok(
        "The lighthouse keeper counted forty ships before the storm reached the harbour, then he "
        "wrote their names in the log.",
        add_special_tokens=False,
    )["input_ids"][:16]
    P = 8
    assert len(ids) == 16
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
    pkv = out.past_key_values
    k_post = torch.stack([pkv.layers[i].keys[0] for i in range(L)])  # [L, H, T, D], RoPE applied
    v = torch.stack([pkv.layers[i].values[0] for i in range(L)])
    dtype = k_post.dtype

    h = Harness(
        layers=L,
        heads=H,
        head_dim=D,
        page_size=P,
        dtype=dtype,
        layout="layer_first",
        extra={"interface_v1": 1},
    )
    try:
        idx = h.host_pool.alloc(16)
        for p in range(2):  # SGLang's flat page: [k|v, layer, token, head, dim]
            sl = slice(p * P, (p + 1) * P)
            flat = torch.stack([k_post[:, :, sl].permute(0, 2, 1, 3), v[:, :, sl].permute(0, 2, 1, 3)])
            h.host_pool.set_from_flat_data_page(int(idx[p * P]), flat.flatten())
        h.controller.write_storage(idx, ids, hash_value=h.page_hashes(ids), prefix_keys=[])
        assert h.controller.ack_backup_queue.get(timeout=60).completed_tokens == 16

        want = _hf_capture(model, tok, ids)  # [L, 2, H, T, D], K pre-RoPE
        from kv_agent.rope import layer_rope_specs

        ropes = layer_rope_specs(cfg)
        for p, page_hash in enumerate(h.page_hashes(ids)):
            seg = h.backend.store.get(h.backend.store_key(page_hash), FINGERPRINT)
            assert list(seg.positions) == list(range(p * P, (p + 1) * P)) and not seg.pre_rope
            kv = seg.kv("torch").float()
            for layer in range(L):
                k_pre = torch.as_tensor(
                    rope.apply(kv[layer, 0], np.asarray(seg.positions), ropes[layer], D, inverse=True)
                )
                ref = want[layer, :, :, p * P : (p + 1) * P].float()
                torch.testing.assert_close(k_pre, ref[0], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(kv[layer, 1], ref[1], rtol=0, atol=0)
    finally:
        h.close()


def _doc_launch_argv(fp: str) -> list[str]:
    """The launch command of docs/engine-sglang.md, expanded by bash as a user's shell would."""
    text = DOC.read_text()
    block = re.search(r"# 2\. SGLang .*?\n(python -m sglang\.launch_server .*?)\n```", text, re.S).group(1)
    script = (
        "set -- "
        + block.replace("python -m sglang.launch_server", "", 1)
        + '\nfor a in "$@"; do printf "%s\\0" "$a"; done'
    )
    r = subprocess.run(["bash", "-c", script], capture_output=True, env=dict(os.environ, FP=fp), check=True)
    return [a.decode() for a in r.stdout.split(b"\0") if a]


def test_documented_launch_command_loads_the_backend(tmp_path):
    """The documented flags, parsed by SGLang's own server argument parser, load this backend
    through SGLang's factory (the server itself needs CUDA kernels; see the skip below)."""
    from sglang.srt.server_args import ServerArgs

    argv = _doc_launch_argv(FINGERPRINT)
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    assert args.enable_hierarchical_cache and args.hicache_storage_backend == "dynamic"
    import json

    extra = json.loads(args.hicache_storage_backend_extra_config)
    extra["path"] = str(tmp_path / "store")  # the documented /var/lib path is not writable in tests
    h = Harness(layout=args.hicache_mem_layout, page_size=args.page_size, extra=extra)
    try:
        assert type(h.backend).__name__ == "KvAgentHiCacheStorage"
        assert h.backend.namespace == "prod" and h.backend.fingerprint.hex() == FINGERPRINT
        ids = list(range(3 * args.page_size))
        assert h.backup(h.fill(ids, seed=9), ids) == len(ids)
        assert h.prefetch(ids)[1] == len(ids)
    finally:
        h.close()


def test_create_says_why_sglang_cannot_run_here():
    err = _sgl_kernel_error()
    if err is None:
        pytest.skip("SGLang's kernels load here: the server test below runs instead")
    with pytest.raises(FailedPreconditionError, match="kernels do not load"):
        base.create("sglang", model_path="/nonexistent", hf=object(), spool_dir="/tmp/x")


def test_sglang_server_reuses_planned_memory(tmp_path):
    err = _sgl_kernel_error()
    if err is not None:
        pytest.skip(f"SGLang's server cannot start here: its CUDA kernels do not load ({err})")
    pytest.importorskip("torch.cuda")
    if not torch.cuda.is_available():
        pytest.skip("SGLang's server needs a CUDA GPU")
    from kv_agent.models import load_default_model
    from kv_agent.models.loader import DEFAULT_MODEL_NAME, converted_dir_for, default_gguf_path

    model, tok = load_default_model()
    hf = base.create("hf", model=(model, tok))
    sg = base.create(
        "sglang",
        model_path=str(converted_dir_for(default_gguf_path(), DEFAULT_MODEL_NAME)),
        hf=hf,
        spool_dir=str(tmp_path / "spool"),
        page_size=16,
    )
    try:
        store = Store.open(None)
        text = "The harbour master's boat is painted green. " * 6
        ids = hf.encode(text)[:64]
        cap = hf.capture(ids)
        seg = Segment(cap.kv, tokens=ids, model=hf.spec.fingerprint, ns="t", session="s", turn=0, copy=True)
        store.put(seg)
        ctx = PlannedContext.contiguous([(seg.key, len(ids))], store, hf.spec.fingerprint)
        gen = sg.generate(hf.encode(" What colour is the boat?"), ctx, max_new_tokens=8)
        assert gen.reused_tokens >= 48 and gen.extra["planned_pages"] == 4
    finally:
        sg.close()
