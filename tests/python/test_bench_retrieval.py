"""`kvagent bench retrieval` / `bench planted`: recall harness, ingest cache, attention oracle and the
planted-fact suite, on a tiny random model (unit) and on the default model (model smoke)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("nltk")  # LoCoMo scoring (absent on the GPU image)

from kv_agent.bench import planted  # noqa: E402
from kv_agent.bench.attention_oracle import AttentionOracle, ranked_spans  # noqa: E402
from kv_agent.bench.locomo import DEFAULT_LOCOMO_PATH, load_locomo  # noqa: E402
from kv_agent.bench.report import RECALL_KS  # noqa: E402
from kv_agent.bench.retrieval_bench import RetrievalConfig, best_head, finalize, run  # noqa: E402
from kv_agent.errors import InvalidArgumentError  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import ByteTokenizer, tiny_llama  # noqa: E402

SPLITS = {"tuning": ["conv-t"], "report": ["conv-r"]}


def synthetic_locomo(path: Path) -> Path:
    def conv(sid, texts):
        turns = lambda s, xs: [  # noqa: E731
            {"speaker": "Ann" if i % 2 == 0 else "Bob", "dia_id": f"D{s}:{i + 1}", "text": t} for i, t in enumerate(xs)]
        c = {"speaker_a": "Ann", "speaker_b": "Bob", "session_1_date_time": "1:56 pm on 8 May, 2023",
             "session_1": turns(1, texts[:4]), "session_2_date_time": "10:00 am on 20 June, 2023",
             "session_2": turns(2, texts[4:])}
        qa = [{"question": "What is the name of Ann's cat?", "answer": "Miso", "evidence": ["D1:1"], "category": 4},
              {"question": "When did Ann start pottery?", "answer": "June 2023", "evidence": ["D:2:01"], "category": 2},
              {"question": "What pets and hobbies?", "answer": "cat, pottery", "evidence": "D1:1; D2:1", "category": 1},
              {"question": "No evidence here?", "answer": "x", "evidence": [], "category": 3}]
        return {"sample_id": sid, "conversation": c, "qa": qa}

    texts = ["I adopted a cat named Miso.", "Cute! How old?", "Two years.", "Nice.",
             "I started pottery classes.", "Fun!", "We made bowls.", "Show me later."]
    p = path / "locomo_tiny.json"
    p.write_text(json.dumps([conv("conv-t", texts), conv("conv-r", texts[::-1]), conv("conv-x", texts)]))
    return p


# ------------------------------------------------------------------ oracle
@pytest.mark.parametrize("chunk", [5, 1000])
def test_oracle_equals_the_models_own_attention(chunk):
    """Per-turn mass from hooks + RoPE equals eager attention over context + question in one forward."""
    model = tiny_llama(seed=3)
    g = torch.Generator().manual_seed(0)
    spans = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (6, 9, 4, 12, 7)]
    query = torch.randint(3, 250, (5,), generator=g).tolist()
    oracle = AttentionOracle(model, chunk_tokens=chunk)
    oracle.prepare(spans)
    mass = oracle.turn_mass(query)
    ids = torch.tensor([[t for s in spans for t in s] + query])
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    n = sum(len(s) for s in spans)
    bounds = np.cumsum([0] + [len(s) for s in spans])
    for layer, att in enumerate(out.attentions):
        p = att[0, :, n:, :].mean(dim=1)  # [heads, context + query]: averaged over the question's tokens
        want = np.stack([p[:, bounds[i]:bounds[i + 1]].sum(dim=1).numpy() for i in range(1, len(spans))], axis=1)
        np.testing.assert_allclose(mass[layer], want, rtol=1e-4, atol=1e-6)
    assert mass.shape == (2, 4, 4) and (mass.sum(axis=2) <= 1 + 1e-5).all()
    oracle.turn_mass(query)  # the prepared context is not consumed by a question
    np.testing.assert_allclose(oracle.turn_mass(query), mass, rtol=1e-6)


def test_oracle_rejects_bad_input():
    oracle = AttentionOracle(tiny_llama(seed=3))
    with pytest.raises(InvalidArgumentError):
        oracle.turn_mass([5, 6])  # nothing prepared
    with pytest.raises(InvalidArgumentError):
        oracle.prepare([[4, 5], []])
    with pytest.raises(InvalidArgumentError):
        AttentionOracle(tiny_llama(seed=3), chunk_tokens=0)
    assert ranked_spans(np.array([0.1, 0.5, 0.5, 0.2]), 3).tolist() == [1, 2, 3]


# ------------------------------------------------------------------ retrieval bench
def _cfg(tmp_path, data, **kw):
    base = dict(locomo=str(data), split="all", splits=SPLITS, kv_variants=["mean:zscore:max"],
                cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "out"), oracle_chunk=16)
    base.update(kw)
    return RetrievalConfig(**base)


def test_retrieval_bench_end_to_end_with_cache(tmp_path):
    data = synthetic_locomo(tmp_path)
    mt = (tiny_llama(seed=5), ByteTokenizer())
    doc = run(_cfg(tmp_path, data), progress=False, model_and_tokenizer=mt)
    saved = json.loads((tmp_path / "out" / "retrieval.json").read_text())
    for key in ("config", "machine", "git_commit", "date", "splits", "aggregates", "timing", "oracle", "records"):
        assert key in saved, key
    assert set(saved["aggregates"]) == {"tuning", "report"}
    head = saved["oracle"]["selected_head"]
    table = np.asarray(saved["oracle"]["per_head"]["tuning"]["@10"])
    assert (head["layer"], head["head"]) == best_head(saved["oracle"]["per_head"]["tuning"])
    assert head["recall_on_selection"] == pytest.approx(table.max()) and head["selected_on"] == "tuning"
    want = {"rag-bm25", "rag-minilm", "kv-memory", "kv-memory[mean:zscore:max]", "oracle-sum", "oracle-max",
            f"oracle-head[L{head['layer']}.H{head['head']}]"}
    for split in ("tuning", "report"):
        agg = saved["aggregates"][split]
        assert set(agg) == want
        for name, a in agg.items():
            assert a["questions"] == 3, name  # the question without evidence is not scored
            for k in RECALL_KS:
                assert set(a[f"recall@{k}"]) == {"recall", "recall_any", "recall_all"}
            assert a["recall@25"]["recall"] == pytest.approx(1.0), name  # 8 turns < 25: every turn ranked
    recs = saved["records"]
    assert len(recs) == 2 * 3 * len(want)
    assert all(r["split"] == {"conv-t": "tuning", "conv-r": "report"}[r["conversation"]] for r in recs)
    assert all(len(r["retrieved"]) == len(set(r["retrieved"])) == 8 for r in recs)
    pot = next(r for r in recs if r["qid"] == "conv-t/q1")
    assert pot["evidence"] == ["D2:1"]  # "D:2:01" normalised
    md = (tmp_path / "out" / "retrieval.md").read_text()
    assert "### split `tuning` (conv-t)" in md and "### split `report` (conv-r)" in md and "Oracle best head" in md
    assert (tmp_path / "out" / "recall_at_k.png").stat().st_size > 1000
    npz = np.load(tmp_path / "out" / "oracle_heads.npz")
    assert npz["top"].shape == (6, 2, 4, 8)
    assert [saved["timing"][c]["kv"]["cached"] for c in ("conv-t", "conv-r")] == [False, False]
    assert doc["timing"]["conv-t"]["kv"]["segments"] == 8
    fin = finalize(tmp_path / "out")  # the report rebuilt from what the run saved is the same report
    assert fin["aggregates"] == saved["aggregates"] and fin["oracle"] == saved["oracle"]

    # Rerun: both stores come from the cache (no turn encoded), same rankings.
    marker = Path(saved["timing"]["conv-r"]["kv"]["path"]) / "complete.json"
    marker.unlink()  # conv-r's ingest "did not finish": it must be rebuilt, not reused
    again = run(_cfg(tmp_path, data, out=str(tmp_path / "out2")), progress=False, model_and_tokenizer=mt)
    assert again["timing"]["conv-t"]["kv"]["cached"] is True
    assert again["timing"]["conv-r"]["kv"]["cached"] is False and marker.is_file()
    key = lambda rs: {(r["system"], r["qid"]): r["retrieved"] for r in rs}  # noqa: E731
    assert key(again["records"]) == key(saved["records"])


def test_retrieval_bench_report_split_takes_the_head_from_a_tuning_run(tmp_path):
    data = synthetic_locomo(tmp_path)
    mt = (tiny_llama(seed=5), ByteTokenizer())
    tuning = run(_cfg(tmp_path, data, split="tuning", systems=["oracle"], kv_variants=[]), progress=False,
                 model_and_tokenizer=mt)
    rep = run(_cfg(tmp_path, data, split="report", systems=["oracle"], kv_variants=[], out=str(tmp_path / "rep"),
                   oracle_heads_from=str(tmp_path / "out" / "retrieval.json")), progress=False, model_and_tokenizer=mt)
    assert set(rep["aggregates"]) == {"report"}
    assert rep["oracle"]["selected_head"]["layer"] == tuning["oracle"]["selected_head"]["layer"]
    assert rep["oracle"]["selected_head"]["head"] == tuning["oracle"]["selected_head"]["head"]
    alone = run(_cfg(tmp_path, data, split="report", systems=["oracle"], kv_variants=[], out=str(tmp_path / "r2")),
                progress=False, model_and_tokenizer=mt)
    assert "selected_head" not in alone["oracle"] and set(alone["aggregates"]["report"]) == {"oracle-sum", "oracle-max"}


@pytest.mark.parametrize("bad", [
    dict(split="nope"), dict(split="tuning", conversations=["conv-r"]), dict(systems=["rag-bm25", "gpt"]),
    dict(kv_variants=["mean:zscore"]), dict(kv_variants=["mean:zscore:max"], systems=["rag-bm25"]),
    dict(oracle_heads_from="/nonexistent/retrieval.json"), dict(oracle_chunk=0), dict(systems=[]),
])
def test_retrieval_bench_rejects_bad_options_before_doing_anything(tmp_path, bad):
    data = synthetic_locomo(tmp_path)
    with pytest.raises(InvalidArgumentError):
        run(_cfg(tmp_path, data, **bad), progress=False, model_and_tokenizer=None)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_default_splits_are_disjoint_dev_conversations():
    from kv_agent.bench.retrieval_bench import SPLITS as DEFAULT

    assert set(DEFAULT["tuning"]) == {"conv-26", "conv-30", "conv-41"}
    assert set(DEFAULT["report"]) == {"conv-42", "conv-43", "conv-44", "conv-47"}


def test_cli_parses_retrieval_options(tmp_path, monkeypatch):
    import kv_agent.bench.retrieval_bench as rb
    from kv_agent import cli

    seen = {}

    def fake_run(cfg, progress=True):
        seen["cfg"] = cfg
        raise InvalidArgumentError("stop here")

    monkeypatch.setattr(rb, "run", fake_run)
    rc = cli.main(["bench", "retrieval", "--split", "report", "--conversations", "conv-42", "--systems", "rag-bm25",
                   "--kv-variants", "mean:zscore:max,bbox:softmax:max", "--cache-dir", str(tmp_path), "--out", "o",
                   "--max-sessions", "2", "--oracle-chunk", "512", "--max-segment-tokens", "128"])
    c = seen["cfg"]
    assert rc != 0
    assert (c.split, c.conversations, c.systems, c.kv_variants, c.cache_dir, c.max_sessions, c.oracle_chunk,
            c.max_segment_tokens) == ("report", ["conv-42"], ["rag-bm25"], ["mean:zscore:max", "bbox:softmax:max"],
                                      str(tmp_path), 2, 512, 128)


# ------------------------------------------------------------------ planted suite
def test_planted_suite_file_is_the_generated_one():
    assert planted.load_suite() == json.loads(json.dumps(planted.generate()))


def test_planted_suite_properties():
    suite = planted.generate()
    eps = suite["episodes"]
    assert len(eps) == planted.EPISODES and [e["split"] for e in eps].count("tuning") == len(eps) // 2
    facts = [f for e in eps for f in e["facts"]]
    assert len(facts) == planted.EPISODES * planted.FACTS >= 200
    assert {f["kind"] for f in facts} == set(planted.KINDS)
    for e in eps:
        assert len(e["exchanges"]) == planted.EXCHANGES
        assert len({f["kind"] for f in e["facts"]}) == planted.FACTS
        for f in e["facts"]:
            said = [j for j, x in enumerate(e["exchanges"])
                    if re.search(rf"\b{re.escape(f['answer'])}\b", planted.exchange_text(x))]
            assert said == [f["exchange"]], (f, said)  # stated once, in its own exchange
    stats = planted.overlap_stats(suite)
    assert stats["question_fact_overlap_mean"] < 0.2  # paraphrased: few shared content words
    assert planted.generate(seed=1) != suite and planted.generate() == suite


def test_planted_lexical_overlap():
    assert planted.lexical_overlap("Which dogs does the user own?", "I own two dogs.") == 1.0
    assert planted.lexical_overlap("What is the user's boss called?", "My new manager is Priya.") == 0.0
    assert planted.lexical_overlap("the and of", "anything") == 0.0


def test_planted_bench_tiny(tmp_path):
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps(planted.generate(episodes=2)))
    cfg = planted.PlantedConfig(suite=str(suite), split="all", out=str(tmp_path / "out"),
                                cache_dir=str(tmp_path / "cache"))
    doc = planted.run_planted(cfg, progress=False, model_and_tokenizer=(tiny_llama(seed=2), ByteTokenizer()))
    assert set(doc["aggregates"]) == {"tuning", "report"}
    for split in ("tuning", "report"):
        for name in ("rag-bm25", "rag-minilm", "kv-memory"):
            a = doc["aggregates"][split][name]
            assert a["facts"] == 5 and 0 <= a["top1"] <= a["top5"] <= 1
    kv = [r for r in doc["records"] if r["system"] == "kv-memory"]
    assert len(kv) == 10 and all(len(r["ranked"]) == 5 and all(0 <= i < 20 for i in r["ranked"]) for r in kv)
    assert "kv-memory_store_s" in doc["timing"]
    again = planted.run_planted(cfg, progress=False, model_and_tokenizer=(tiny_llama(seed=2), ByteTokenizer()))
    assert "kv-memory_open_s" in again["timing"]  # reopened from the cache
    assert [r["ranked"] for r in again["records"]] == [r["ranked"] for r in doc["records"]]
    assert (tmp_path / "out" / "planted.md").read_text().startswith("Planted-fact suite v1")
    with pytest.raises(InvalidArgumentError):
        planted.run_planted(planted.PlantedConfig(split="dev"), progress=False)
    with pytest.raises(InvalidArgumentError):
        planted.run_planted(planted.PlantedConfig(systems=["bm26"]), progress=False)


# ------------------------------------------------------------------ model smoke
@pytest.mark.model
@pytest.mark.skipif(not DEFAULT_LOCOMO_PATH.exists(), reason=f"LoCoMo dev split not at {DEFAULT_LOCOMO_PATH}")
def test_retrieval_bench_smoke_on_the_dev_split(tmp_path):
    conv = load_locomo(DEFAULT_LOCOMO_PATH)[0].sample_id
    cfg = RetrievalConfig(split="tuning", conversations=[conv], max_sessions=1, kv_variants=["mean:zscore:max"],
                          cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "out"))
    doc = run(cfg, progress=False)
    agg = doc["aggregates"]["tuning"]
    assert {"rag-bm25", "rag-minilm", "kv-memory", "kv-memory[mean:zscore:max]", "oracle-sum", "oracle-max"} <= set(agg)
    assert any(n.startswith("oracle-head[") for n in agg)
    n = agg["kv-memory"]["questions"]
    assert n >= 1 and all(a["questions"] == n and "recall@10" in a for a in agg.values())
    assert doc["timing"][conv]["kv"]["segments"] == doc["timing"][conv]["turns"]
    assert doc["oracle"]["layer_types"] and len(doc["oracle"]["per_head"]["tuning"]["@10"]) == len(
        doc["oracle"]["layer_types"])
