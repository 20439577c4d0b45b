"""End-to-end smoke test of the LoCoMo harness on a synthetic conversation and a tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

pytest.importorskip("nltk")  # the LoCoMo scoring rules stem with nltk (absent on the GPU image)
from kv_agent.bench.locomo_bench import ALL_SYSTEMS, BenchConfig, run  # noqa: E402
from kv_agent.bench.report import RECALL_KS  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import ByteTokenizer, tiny_llama  # noqa: E402


def synthetic_locomo(path: Path) -> Path:
    turns = lambda s, texts: [  # noqa: E731
        {"speaker": "Ann" if i % 2 == 0 else "Bob", "dia_id": f"D{s}:{i + 1}", "text": t} for i, t in enumerate(texts)]
    conv = {
        "speaker_a": "Ann", "speaker_b": "Bob",
        "session_1_date_time": "1:56 pm on 8 May, 2023",
        "session_1": turns(1, ["I adopted a cat named Miso.", "Cute! How old?", "Two years.", "Nice."]),
        "session_2_date_time": "10:00 am on 20 June, 2023",
        "session_2": turns(2, ["I started pottery classes.", "Fun!", "We made bowls.", "Show me later."]),
    }
    qa = [
        {"question": "What is the name of Ann's cat?", "answer": "Miso", "evidence": ["D1:1"], "category": 4},
        {"question": "When did Ann start pottery?", "answer": "June 2023", "evidence": ["D2:1"], "category": 2},
        {"question": "What pets and hobbies does Ann have?", "answer": "cat, pottery",
         "evidence": ["D1:1", "D2:1"], "category": 1},
        {"question": "Would Ann like a pottery gift?", "answer": "yes; likely", "evidence": ["D2:1"], "category": 3},
        {"question": "What is Bob's cat called?", "adversarial_answer": "Miso", "evidence": ["D1:1"], "category": 5},
    ]
    p = path / "locomo_tiny.json"
    p.write_text(json.dumps([{"sample_id": "conv-t", "conversation": conv, "qa": qa}]))
    return p


def test_harness_end_to_end(tmp_path):
    torch.set_grad_enabled(False)
    data = synthetic_locomo(tmp_path)
    out = tmp_path / "out"
    cfg = BenchConfig(locomo=str(data), systems=list(ALL_SYSTEMS), token_budget=40, max_new_tokens=4, out=str(out),
                      kv_variants=["mean:zscore:max"])
    doc = run(cfg, progress=False, model_and_tokenizer=(tiny_llama(seed=5), ByteTokenizer()))
    saved = json.loads((out / "locomo.json").read_text())
    for key in ("config", "machine", "git_commit", "date", "aggregates", "records", "ingest", "wall_s"):
        assert key in saved, key
    systems = set(saved["aggregates"])
    assert systems == set(ALL_SYSTEMS) | {"kv-memory[mean:zscore:max]"}
    assert len(saved["records"]) == 5 * len(systems)
    for r in saved["records"]:
        for f in ("system", "qid", "category", "prediction", "score", "evidence", "retrieved", "used",
                  "context_tokens", "prefill_tokens", "reused_tokens", "retrieval_s", "ttft_s", "total_s", "recall",
                  "answered"):
            assert f in r, f
        if r["system"].startswith("kv-memory["):  # ablation rows: retrieval and recall only by default
            assert not r["answered"] and r["score"] is None and r["recall"]
        else:
            assert r["answered"] and 0.0 <= r["score"] <= 1.0
    agg = saved["aggregates"]
    assert agg["kv-memory[mean:zscore:max]"]["answered"] == 0 and "recall@10" in agg["kv-memory[mean:zscore:max]"]
    for name, a in agg.items():
        if not a["answered"]:
            continue
        for f in ("f1_cat1_4", "adversarial_cat5", "overall", "prefill_tokens_mean", "prefill_tokens_p95",
                  "ttft_s_median", "total_s_median", "cache_hit_rate", "f1_by_category"):
            assert f in a, (name, f)
    for name in ("rag-bm25", "rag-minilm", "kv-memory"):
        for k in RECALL_KS:
            assert f"recall@{k}" in agg[name]
        assert agg[name]["recall@25"]["recall"] == pytest.approx(1.0)  # 8 turns < 25: everything retrieved
    # Prefill accounting: kv-memory prefills only the question suffix; full context all turns.
    kv = [r for r in saved["records"] if r["system"] == "kv-memory"]
    full = [r for r in saved["records"] if r["system"] == "full-context"]
    assert all(r["reused_tokens"] > 0 for r in kv)
    assert sum(r["prefill_tokens"] for r in kv) < sum(r["prefill_tokens"] for r in full)
    assert agg["kv-memory"]["prefill_reduction_vs_full-context"] > 1
    md = (out / "locomo.md").read_text()
    assert md.startswith("| system") and "| kv-memory[mean:zscore:max] |" in md  # ablation table
    # Every system stops at the end of the answer line, so no prediction spans lines.
    assert all("\n" not in r["prediction"] for r in saved["records"])
    assert (out / "accuracy_vs_prefill.png").stat().st_size > 1000
    assert doc["plots"]


def test_question_sampling_is_stratified_round_robin(tmp_path):
    from kv_agent.bench.locomo import load_locomo
    from kv_agent.bench.locomo_bench import select_questions

    conv = load_locomo(str(synthetic_locomo(tmp_path)))[0]
    picked = select_questions(conv, BenchConfig(questions=3))
    assert len(picked) == 3 and len({q.category for q in picked}) == 3  # one per category before repeats
    assert select_questions(conv, BenchConfig(questions=3)) == picked  # seeded
    assert len(select_questions(conv, BenchConfig(questions=50))) == len(conv.questions)  # capped at what exists
    assert [q.qid for q in select_questions(conv, BenchConfig(per_category=1))] == [q.qid for q in conv.questions]


def test_full_context_keeps_the_latest_turns_that_fit(tmp_path):
    torch.set_grad_enabled(False)
    data = synthetic_locomo(tmp_path)
    model = tiny_llama(seed=5)
    model.config.max_position_embeddings = 560  # room for a few turns only
    cfg = BenchConfig(locomo=str(data), systems=["full-context", "kv-memory"], token_budget=40, max_new_tokens=4,
                      out=str(tmp_path / "out"), kv_variants=["bbox:softmax:mean", "mean:softmax:max:0-1"], variants_answer=True,
                      prefill_chunk=7)
    doc = run(cfg, progress=False, model_and_tokenizer=(model, ByteTokenizer()))
    full = [r for r in doc["records"] if r["system"] == "full-context"]
    ing = doc["ingest"]["conv-t/full-context"]
    assert 0 < ing["dropped_turns"] < 8
    assert all(len(r["used"]) == 8 - ing["dropped_turns"] and r["used"][-1] == "D2:4" for r in full)
    assert all(r["context_tokens"] <= 560 for r in full)
    # variants_answer: the ablation row answers too.
    assert all(r["answered"] for r in doc["records"])


def test_merge_runs_over_disjoint_conversations(tmp_path):
    import copy as _copy

    from kv_agent.bench.report import merge_runs

    torch.set_grad_enabled(False)
    data = synthetic_locomo(tmp_path)
    a = tmp_path / "a"
    doc = run(BenchConfig(locomo=str(data), systems=["no-memory", "kv-memory"], token_budget=40, max_new_tokens=3,
                          out=str(a), kv_variants=["mean:zscore:max"]),
              progress=False, model_and_tokenizer=(tiny_llama(seed=5), ByteTokenizer()))
    # A second "run" over another conversation: the same records under another conversation id.
    other = _copy.deepcopy(json.loads((a / "locomo.json").read_text()))
    for r in other["records"]:
        r["conversation"], r["qid"] = "conv-u", r["qid"].replace("conv-t", "conv-u")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "locomo.json").write_text(json.dumps(other))
    merged = merge_runs([a / "locomo.json", tmp_path / "b" / "locomo.json"], tmp_path / "m")
    assert len(merged["records"]) == 2 * len(doc["records"])
    assert merged["aggregates"]["kv-memory"]["questions"] == 2 * doc["aggregates"]["kv-memory"]["questions"]
    assert merged["config"]["conversations"] == ["conv-t", "conv-u"] and len(merged["merged_from"]) == 2
    with pytest.raises(ValueError, match="more than one run"):
        merge_runs([a / "locomo.json", a / "locomo.json"], tmp_path / "m2")
    other["config"]["token_budget"] = 99
    (tmp_path / "b" / "locomo.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="token_budget"):
        merge_runs([a / "locomo.json", tmp_path / "b" / "locomo.json"], tmp_path / "m3")
