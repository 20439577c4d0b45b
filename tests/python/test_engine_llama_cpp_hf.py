"""Portable memory: KV and query vectors captured by llama.cpp (from the GGUF, quantised weights,
f16 cache) agree with the transformers adapter's (the same GGUF dequantised to float32) to
quantisation tolerance, token for token and layer by layer."""

from __future__ import annotations

import numpy as np
import pytest

from kv_agent import _core

pytestmark = [
    pytest.mark.engine,
    pytest.mark.model,
    pytest.mark.skipif(not hasattr(_core, "LlamaEngine"), reason="kv_agent built without llama.cpp (make llama-cpp)"),
]


@pytest.fixture(scope="module")
def engines():
    torch = pytest.importorskip("torch")
    from kv_agent.engines.hf import HFEngine
    from kv_agent.engines.llama_cpp import LlamaCppEngine
    from kv_agent.models import load_default_model

    model, tok = load_default_model()
    return LlamaCppEngine(context_tokens=1024), HFEngine(model, tok), torch


def _cos(a, b):
    a, b = a.reshape(-1), b.reshape(-1)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_geometry_and_rope_agree(engines):
    lc, hf, _ = engines
    a, b = lc.spec, hf.spec
    assert (a.num_layers, a.num_q_heads, a.num_kv_heads, a.head_dim) == (b.num_layers, b.num_q_heads,
                                                                         b.num_kv_heads, b.head_dim)
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert la.sliding_window == lb.sliding_window
        assert la.rope.theta == pytest.approx(lb.rope.theta) and la.rope.style == lb.rope.style
    assert a.attn_scale == pytest.approx(b.attn_scale)


def test_captured_kv_and_queries_agree_with_transformers(engines):
    lc, hf, torch = engines
    text = ("Maria moved to Porto in 2019 to work as a marine biologist; she studies octopuses and "
            "writes a blog about tide pools. ") * 4
    ids = ([lc.tokenizer.bos_token_id] if lc.tokenizer.bos_token_id is not None else []) + lc.encode(text)
    a = lc.capture(ids).kv.astype(np.float32)
    b = torch.as_tensor(hf.capture(ids).kv).float().numpy()
    assert a.shape == b.shape
    for layer in range(a.shape[0]):
        for kv in (0, 1):
            c = _cos(a[layer, kv], b[layer, kv])
            assert c > 0.99, f"layer {layer} {'kv'[kv]}: cosine {c:.4f}"
    layers = [0, lc.spec.num_layers // 2, lc.spec.num_layers - 1]
    qa = lc.query_vectors(ids[-8:], None, layers)
    qb = torch.as_tensor(hf.query_vectors(ids[-8:], None, layers)).float().numpy()
    for i, layer in enumerate(layers):
        c = _cos(qa[i], qb[i])
        assert c > 0.98, f"Q layer {layer}: cosine {c:.4f}"  # measured 0.988 at the last layer
