"""AgentMemory(backend="gpu"): the product path on CUDA (device tier, device index, fused loads
in the transformers adapter) against the CPU path, device-tier eviction under pressure, and the
CPU fallback. Tiny random-weight models (fp32) with a byte tokenizer; the gpu tests run through
the device tool (scripts/gpu_product_run.sh), the fallback tests everywhere."""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from kv_agent import api  # noqa: E402
from kv_agent.api import AgentMemory, CacheManager  # noqa: E402
from kv_agent.engines.hf import HFEngine  # noqa: E402
from kv_agent.index import IndexOptions  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import ByteTokenizer, tiny_llama  # noqa: E402

TURNS = [("where do I keep the spare key?", "under the blue flower pot by the door"),
         ("what is my cat called?", "her name is Miso and she is three"),
         ("which train do I take to work?", "the 7:42 from Northgate, platform two"),
         ("what did I cook on Sunday?", "a lentil soup with smoked paprika"),
         ("when is my sister's birthday?", "the ninth of March")]
QUERIES = ["what is the cat's name?", "where is the spare key?", "when is the birthday?"]


def _tiny_gemma3():
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                           num_attention_heads=4, head_dim=16, max_position_embeddings=4096, bos_token_id=1,
                           eos_token_id=2, pad_token_id=0, num_hidden_layers=4, num_key_value_heads=1,
                           sliding_window=6, query_pre_attn_scalar=24,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                        "sliding_attention"],
                           rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})
    cfg._attn_implementation = "eager"
    torch.manual_seed(1234)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _answers(model, backend: str, **memory_options):
    """Greedy answers to QUERIES after storing TURNS, through the public API."""
    torch.set_grad_enabled(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mem = AgentMemory(":memory:", backend=backend, write_behind=False, **memory_options)
    mgr = CacheManager(HFEngine(model, ByteTokenizer()), memory=mem, session="s")
    for prompt, response in TURNS:
        mgr.store_kv(prompt, response)
    out = [mgr.generate(q, top_k=3, max_new_tokens=12) for q in QUERIES]
    return mem, mgr, out


# ------------------------------------------------------------------ CPU-only (fallback)
@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback needs a machine without CUDA")
def test_gpu_backend_without_cuda_warns_and_runs_the_cpu_path():
    with pytest.warns(RuntimeWarning, match="falling back to 'cpu'"):
        mem = AgentMemory(":memory:", backend="gpu", write_behind=False, device_capacity_bytes=1 << 20)
    assert mem.backend == "cpu" and mem.device_capacity_bytes == 0
    assert not mem.store.stats()["has_device"]
    engine = HFEngine(tiny_llama(seed=3), ByteTokenizer())
    mgr = CacheManager(engine, memory=mem, session="s")
    assert mem.index.device == -1 and not engine.fused_load_available()
    mgr.store_kv(*TURNS[1])
    ans = mgr.generate(QUERIES[0], top_k=1, max_new_tokens=4)
    assert ans.hits and ans.hits[0].turn == 1 and ans.reused_tokens > ans.prefill_tokens
    cpu = AgentMemory(":memory:", backend="cpu", write_behind=False)
    cmgr = CacheManager(engine, memory=cpu, session="s")
    cmgr.store_kv(*TURNS[1])
    assert cmgr.generate(QUERIES[0], top_k=1, max_new_tokens=4).token_ids == ans.token_ids


def test_backend_and_device_arguments_are_checked():
    for bad in ({"backend": "tpu"}, {"device": -1}, {"device_capacity_bytes": 0}, {"device": "0"}):
        with pytest.raises(api.InvalidArgumentError):
            AgentMemory(":memory:", **bad)


def test_device_index_options():
    assert api._device_index_options(None, 1).device == 1
    assert api._device_index_options(IndexOptions(device="cpu"), 0).device == "cpu"
    assert api._device_index_options(IndexOptions(device=2), 0).device == 2
    with pytest.warns(RuntimeWarning, match="top_p"):
        assert api._device_index_options(IndexOptions(agg="top_p"), 0).device == -1


# ------------------------------------------------------------------ GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gpu_product_path_gives_the_cpu_path_greedy_tokens(arch):
    model = tiny_llama(seed=5, layers=3) if arch == "llama" else _tiny_gemma3()
    cpu_mem, _, want = _answers(copy.deepcopy(model), "cpu")
    mem, mgr, got = _answers(model.cuda(), "gpu")
    assert mem.backend == "gpu" and mem.index.device == 0 and mgr.engine.fused_load_available()
    stats = mem.store.stats()
    assert stats["has_device"] and stats["device"]["misses"] > 0 and stats["device"]["hits"] > 0
    for a, b in zip(got, want, strict=True):
        assert [h.key for h in a.hits] == [h.key for h in b.hits]
        assert a.token_ids == b.token_ids
    assert cpu_mem.backend == "cpu" and not cpu_mem.store.stats()["has_device"]


@pytest.mark.gpu
@gpu
def test_device_tier_evicts_under_pressure_and_answers_stay_the_same():
    model = tiny_llama(seed=5, layers=3)
    _, _, want = _answers(copy.deepcopy(model), "cpu")
    probe, _, _ = _answers(copy.deepcopy(model).cuda(), "gpu")
    seg_bytes = max(i.layout.nbytes for i in probe.store.list())
    cap = 2 * seg_bytes  # room for two of the six segments (prefix + five turns) the answers read
    mem, _, got = _answers(model.cuda(), "gpu", device_capacity_bytes=cap)
    st = mem.store.stats()["device"]
    assert st["capacity_bytes"] == cap and st["evictions"] > 0 and st["bytes"] <= cap
    assert [a.token_ids for a in got] == [a.token_ids for a in want]
