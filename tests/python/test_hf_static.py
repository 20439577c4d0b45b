"""The adapter's static-shape (CUDA graph) path against its eager path.

``HFEngine(model, cuda_graphs=True)`` runs ``query_q`` and ``prefill_context`` as static-shape
forwards (kv_agent.engines.hf_static). On CPU the same code runs without capture: the logits and
Q vectors must match the eager adapter path (DynamicCache, HF masks, the C++ positioner's
rotation). The gpu-marked test captures and replays real CUDA graphs and checks the same.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen3Config  # noqa: E402

from kv_agent.engines.hf import HFEngine  # noqa: E402
from kv_agent.engines.hf_static import StaticPrefill  # noqa: E402

V = 97


def _model(arch: str = "llama", attn: str = "eager", seed: int = 0, dtype=torch.float32, device="cpu"):
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False)
    if arch == "llama":
        cfg = LlamaConfig(**common, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 64})
    elif arch == "qwen3":
        cfg = Qwen3Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    else:
        cfg = Gemma3TextConfig(**common, sliding_window=8)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    from transformers import AutoModelForCausalLM

    m = LlamaForCausalLM(cfg) if arch == "llama" else AutoModelForCausalLM.from_config(cfg)
    return m.to(device=device, dtype=dtype).eval()


def _context(engine, lengths, seed=1):
    """Captured (realistic) pre-RoPE KV parts of consecutive turns."""
    g = torch.Generator().manual_seed(seed)
    turns = [torch.randint(3, V, (n,), generator=g) for n in lengths]
    caps, _ = engine.capture_turns(turns)
    return [c.kv.to(engine.device) for c in caps]


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch,attn", [("llama", "eager"), ("llama", "sdpa"), ("qwen3", "sdpa")])
def test_static_prefill_matches_eager(arch, attn):
    model = _model(arch, attn)
    eager, static = HFEngine(model), HFEngine(model, cuda_graphs=True)
    q = torch.randint(3, V, (7,), generator=torch.Generator().manual_seed(5))
    for lengths, start in (([11, 5, 20], 0), ([9], 3), ([30, 2], 17)):  # one runner, shrinking contexts
        parts = _context(eager, lengths, seed=len(lengths) + start)
        want = eager.prefill_context(parts, q, start=start)
        got = static.prefill_context(parts, q, start=start, capacity=64)
        assert got.shape == want.shape
        assert _rel(got, want) < 1e-4, (lengths, start)
    assert len(static._static) == 1  # the runner was reused


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_static_query_q_matches_eager(arch):
    model = _model(arch, "sdpa")
    eager, static = HFEngine(model), HFEngine(model, cuda_graphs=True)
    q = torch.randint(3, V, (6,), generator=torch.Generator().manual_seed(2))
    for layers in ([0, 2], [1]):
        want = eager.query_q(q, layers=layers)
        got = static.query_q(q, layers=layers)
        assert sorted(got) == sorted(want) == layers
        for i in layers:
            assert got[i].shape == want[i].shape
            assert _rel(got[i], want[i]) < 1e-5


def test_static_prefill_steps_and_errors():
    model = _model()
    eng = HFEngine(model, cuda_graphs=True)
    parts = _context(eng, [10, 10])
    runner = eng.static_prefill(16, 3)
    with pytest.raises(ValueError, match="more than the capacity 16"):
        runner.load(parts)
    runner = eng.static_prefill(32, 3)
    assert isinstance(runner, StaticPrefill) and runner.load(parts) == 20
    runner.inject(0)
    with pytest.raises(ValueError, match="3 query tokens"):
        runner.forward([5, 6])
    assert torch.isfinite(runner.forward([5, 6, 7])).all()


def test_cuda_graphs_option_rejects_unsupported_models():
    with pytest.raises(ValueError, match="support model types|sliding"):
        HFEngine(_model("gemma3"), cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replays_match_eager(dtype):
    if not torch.cuda.is_available():
        pytest.fail("gpu test needs a CUDA device")
    model = _model("llama", "sdpa", dtype=dtype, device="cuda")
    eager, graphs = HFEngine(model), HFEngine(model, cuda_graphs=True)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    q = torch.randint(3, V, (5,), generator=torch.Generator().manual_seed(9))
    for lengths, start in (([40, 7], 0), ([12], 5), ([64, 60], 2)):  # graph replays with new contexts
        parts = [p.pin_memory() for p in (x.cpu() for x in _context(eager, lengths, seed=start + 1))]
        want = eager.prefill_context(parts, q, start=start)
        got = graphs.prefill_context(parts, q, start=start, capacity=128)
        assert _rel(got, want) < tol, (dtype, lengths, start)
        qw, qg = eager.query_q(q, layers=[0, 2]), graphs.query_q(q, layers=[0, 2])
        for i in (0, 2):
            assert _rel(qg[i], qw[i]) < tol
    runner = graphs.static_prefill(128, 5)
    assert runner.g_forward is not None and runner.g_inject is not None  # replayed, not eager
