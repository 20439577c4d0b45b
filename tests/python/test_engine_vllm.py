"""The vLLM adapter and connector against real vLLM (CPU build) on the default model.

One vLLM engine for the whole module (an engine start takes about a minute on 2 cores). Runs in
the vLLM environment (``make test-engine-vllm``); skipped where vLLM is not installed."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.engine

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from kv_agent import _core  # noqa: E402
from kv_agent.engines.base import PlannedContext  # noqa: E402
from kv_agent.store import Segment, Store  # noqa: E402

TEXT = ("Notes from earlier conversations with the user. " * 4 +
        ("User: My sister Olivia moved to Reykjavik last spring and she loves the long summer days there. "
         "Assistant: Got it, I will remember that. ") * 8)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from kv_agent.engines.base import create

    eng = create("vllm", kv_cache_gb=1, store_path=str(tmp_path_factory.mktemp("plain") / "store"))
    yield eng
    eng.close()


@pytest.fixture()
def store():
    s = Store.open(None)
    yield s
    s.close()


def _capture_segment(engine, store, ids, context=None, key=None):
    cap = engine.capture(ids, context)
    key = key or _core.prefix_key(engine.spec.fingerprint, _core.Hash128(), ids)
    store.put(Segment(cap.kv.contiguous(), tokens=ids, model=engine.spec.fingerprint, key=key,
                      positions=cap.positions.numpy()))
    return cap, key


def test_registry_and_spec(engine):
    from kv_agent.engines.base import create, names

    assert "vllm" in names()
    spec = engine.spec
    assert spec.num_layers == engine.config.num_hidden_layers and len(spec.layers) == spec.num_layers
    assert not spec.fingerprint.is_zero()
    with pytest.raises(Exception, match="not a Hugging Face model directory"):
        create("vllm", model="/nonexistent")


def test_kv_matches_transformers_canonical_layout(engine):
    """vLLM's CPU paged blocks, read by the connector and un-rotated, equal the transformers
    adapter's pre-RoPE KV for the same weights and tokens."""
    from kv_agent.engines.hf import HFEngine
    from kv_agent.models import load_model

    tok = engine.tokenizer
    ids = [tok.bos_token_id] + engine.encode(TEXT)
    assert len(ids) > 2 * 128  # spans several vLLM blocks
    cap = engine.capture(ids)
    model, _ = load_model(engine.model_dir, dtype=engine.dtype)
    ref = HFEngine(model, tok).capture(ids)  # the transformers adapter, through the same interface
    del model
    assert cap.kv.shape == ref.kv.shape
    assert torch.equal(torch.as_tensor(cap.positions), torch.as_tensor(ref.positions))
    # Two engines' kernels round differently (bf16: 8-bit mantissa, compounding over the layers);
    # a layout or rotation mistake gives errors of the order of the values themselves.
    bf16 = engine.dtype == torch.bfloat16
    errors = {}
    for what in (0, 1):
        a, b = cap.kv[:, what].float(), ref.kv[:, what].float()
        errors["KV"[what]] = (((a - b).abs().amax() / b.abs().amax()).item(),
                              ((a - b).abs().mean() / b.abs().mean()).item())
    # (max error / largest value, mean error / mean value) for K and V
    assert all(w < (5e-2 if bf16 else 2e-3) and m < (2e-2 if bf16 else 1e-3) for w, m in errors.values()), errors


def test_planned_context_is_loaded_not_recomputed(engine, store):
    """A context captured earlier and placed by the connector gives the same greedy answer as vLLM
    recomputing it, and vLLM reports the context tokens as not computed."""
    tok = engine.tokenizer
    ctx_ids = [tok.bos_token_id] + engine.encode(TEXT)
    q_ids = engine.encode("\nQuestion: Where does my sister Olivia live?\nAnswer:")
    _, key = _capture_segment(engine, store, ctx_ids)
    ctx = PlannedContext.contiguous([(key, len(ctx_ids))], store, engine.spec.fingerprint)
    with_memory = engine.generate(q_ids, ctx, max_new_tokens=12, stop_ids=[])
    empty = PlannedContext((), store, engine.spec.fingerprint)
    recomputed = engine.generate(ctx_ids + q_ids, empty, max_new_tokens=12, stop_ids=[])
    assert with_memory.token_ids == recomputed.token_ids
    assert with_memory.reused_tokens == len(ctx_ids) and with_memory.prefill_tokens == len(q_ids)
    assert recomputed.reused_tokens == 0 and recomputed.prefill_tokens == len(ctx_ids) + len(q_ids)


def test_repositioned_segments(engine, store):
    """Segments captured at other positions are rotated to their planned positions: two turns
    captured separately after a prefix, then planned in the other order."""
    tok = engine.tokenizer
    prefix = [tok.bos_token_id] + engine.encode("Notes from earlier conversations with the user.\n\n")
    _, pkey = _capture_segment(engine, store, prefix)
    pctx = PlannedContext.contiguous([(pkey, len(prefix))], store, engine.spec.fingerprint)
    a = engine.encode("User: The wifi password at our cabin is bluefalcon42.\nAssistant: Noted.\n")
    b = engine.encode("User: I adopted a parrot and named him Captain Mango.\nAssistant: Noted.\n")
    cap_a, ka = _capture_segment(engine, store, a, pctx, key=_core.memory_key("t", "s", 1, 0))
    cap_b, kb = _capture_segment(engine, store, b, pctx, key=_core.memory_key("t", "s", 2, 0))
    assert int(cap_a.positions[0]) == len(prefix) == int(cap_b.positions[0])
    ctx = PlannedContext.contiguous([(pkey, len(prefix)), (kb, len(b)), (ka, len(a))], store,
                                    engine.spec.fingerprint)
    q = engine.encode("Question: What is the wifi password at our cabin?\nAnswer:")
    gen = engine.generate(q, ctx, max_new_tokens=8, stop_ids=[])
    assert gen.prefill_tokens == len(q) and gen.reused_tokens == len(prefix) + len(a) + len(b)
    assert "bluefalcon" in tok.decode(gen.token_ids).lower()


def test_query_vectors_in_the_order_asked(engine, store):
    from kv_agent.engines.hf import HFEngine
    from kv_agent.models import load_model

    tok = engine.tokenizer
    prefix = [tok.bos_token_id] + engine.encode("Notes from earlier conversations with the user.\n\n")
    _, pkey = _capture_segment(engine, store, prefix)
    pctx = PlannedContext.contiguous([(pkey, len(prefix))], store, engine.spec.fingerprint)
    q = engine.encode("Question: Where does my sister Olivia live?\nAnswer:")
    layers = [5, 1, 3]
    qv = engine.query_vectors(q, pctx, layers)
    assert qv.shape == (3, engine.spec.num_q_heads, len(q), engine.spec.head_dim) and qv.dtype == torch.float32
    model, _ = load_model(engine.model_dir, dtype=engine.dtype)
    ref = HFEngine(model, tok)
    prefix_kv = store.get(pkey, engine.spec.fingerprint).kv(framework="torch")
    rq = ref.query_q(q, prefix_kv=prefix_kv, layers=sorted(layers))
    del model
    for j, layer in enumerate(layers):
        err = ((qv[j] - rq[layer].float()).abs().amax() / rq[layer].float().abs().amax()).item()
        assert err < (2e-2 if engine.dtype == torch.bfloat16 else 2e-3), (layer, err)
    with pytest.raises(Exception, match="layers must be within"):
        engine.query_vectors(q, pctx, [engine.spec.num_layers])


def test_plain_requests_persist_prefix_chunks(engine):
    """Requests without a plan (the server path): full 128-token chunks of the prompt are saved
    into the store at store_path and loaded back for the next identical prompt."""
    from vllm import SamplingParams, TokensPrompt

    tok = engine.tokenizer
    ids = [tok.bos_token_id] + engine.encode(TEXT + " Question: Where does Olivia live? Answer:")
    sp = SamplingParams(temperature=0.0, max_tokens=10)
    first = engine.llm.generate(TokensPrompt(prompt_token_ids=ids), sp, use_tqdm=False)[0]
    second = engine.llm.generate(TokensPrompt(prompt_token_ids=ids), sp, use_tqdm=False)[0]
    chunk = 128
    assert (first.num_cached_tokens or 0) == 0
    assert second.num_cached_tokens == (len(ids) - 1) // chunk * chunk > 0
    assert list(first.outputs[0].token_ids) == list(second.outputs[0].token_ids)


FACTS = [
    ("My sister Olivia moved to Reykjavik last spring.", "Where does my sister Olivia live?", "reykjavik"),
    ("The wifi password at our cabin is bluefalcon42.", "What is the wifi password at our cabin?", "bluefalcon"),
]
DISTRACTORS = ["the weather", "a new recipe", "weekend plans", "a football match", "the traffic", "a podcast",
               "gardening", "a board game"]


def test_memory_reuse_planted_facts(engine, tmp_path):
    """Planted facts among distractor turns, each turn's KV captured by vLLM after the shared prefix
    and stored with its compressed keys; the question's Q (from vLLM) retrieves the fact, and vLLM
    answers it with only the question prefilled ([prefix][retrieved] loaded by the connector)."""
    from kv_agent.index import LatentIndex, summarize

    fp, fmt = engine.spec.fingerprint, engine.chat_format
    store = Store.open(str(tmp_path / "mem"))
    index = LatentIndex(engine.spec)
    prefix = engine.bos_ids + engine.encode(fmt.prefix("Notes from earlier conversations with the user."))
    _, pkey = _capture_segment(engine, store, prefix)
    pctx = PlannedContext.contiguous([(pkey, len(prefix))], store, fp)
    turns = [(f"d{i}", f"Let's talk about {t} today.", f"Sure, what about {t}?") for i, t in enumerate(DISTRACTORS)]
    for i, (fact, _, _) in enumerate(FACTS):
        turns.insert(3 * i + 1, (f"fact{i}", fact, "Got it, I will remember that."))
    keys = {}
    for n, (session, user, assistant) in enumerate(turns):
        ids = engine.encode(fmt.turn(user, assistant))
        cap = engine.capture(ids, pctx)
        key = _core.memory_key("mem", session, 1, 0)
        seg = Segment(cap.kv.contiguous(), tokens=ids, model=fp, key=key, positions=cap.positions.numpy(),
                      ns="mem", session=session, turn=1, time_us=n, text=user, summary=summarize(cap.kv[:, 0]))
        store.put(seg)
        index.add(key, seg.summary, ns="mem", session=session, turn=1, time_us=n, num_tokens=len(ids))
        keys[session] = (key, len(ids))
    for i, (_, question, keyword) in enumerate(FACTS):
        q = engine.encode(fmt.query(question))
        hits = index.search(engine.query_vectors(q, pctx, index.layers), top_k=3)
        assert keys[f"fact{i}"][0] in [h.key for h in hits], [store.info(h.key).meta.session for h in hits]
        ctx = PlannedContext.contiguous([(pkey, len(prefix))] + [(h.key, h.num_tokens) for h in hits], store, fp)
        gen = engine.generate(q, ctx, max_new_tokens=16)
        assert gen.prefill_tokens == len(q)  # vLLM's count: only the question was computed
        assert gen.reused_tokens == len(prefix) + sum(h.num_tokens for h in hits)
        assert keyword in engine.tokenizer.decode(gen.token_ids).lower()
    store.close()
