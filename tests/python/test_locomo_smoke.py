"""CI smoke run of the LoCoMo benchmark on the real data and the real default model: one
conversation (its first two sessions), one question per category, every system and one index
ablation; checks the harness end to end and that the JSON report has every field."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.model

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytest.importorskip("nltk")  # the LoCoMo scoring rules stem with nltk (absent on the GPU image)
from kv_agent.bench.locomo import DEFAULT_LOCOMO_PATH, load_locomo  # noqa: E402
from kv_agent.bench.locomo_bench import ALL_SYSTEMS, BenchConfig, run  # noqa: E402
from kv_agent.bench.report import RECALL_KS  # noqa: E402

RECORD_FIELDS = ("system", "qid", "conversation", "category", "question", "answer", "prediction", "score",
                 "evidence", "retrieved", "used", "context_tokens", "prefill_tokens", "reused_tokens", "retrieval_s",
                 "ttft_s", "total_s", "recall", "answered")
AGGREGATE_FIELDS = ("questions", "answered", "f1_by_category", "count_by_category", "f1_cat1_4", "adversarial_cat5",
                    "overall", "prefill_tokens_mean", "prefill_tokens_p95", "reused_tokens_mean", "cache_hit_rate",
                    "ttft_s_median", "ttft_s_p95", "total_s_median", "total_s_p95")


@pytest.mark.skipif(not DEFAULT_LOCOMO_PATH.exists(), reason=f"LoCoMo dev split not at {DEFAULT_LOCOMO_PATH}")
def test_locomo_smoke_on_the_dev_split(tmp_path):
    torch.set_grad_enabled(False)
    conv = load_locomo(DEFAULT_LOCOMO_PATH)[0].sample_id
    out = tmp_path / "out"
    cfg = BenchConfig(conversations=[conv], max_sessions=2, per_category=1, systems=list(ALL_SYSTEMS),
                      token_budget=128, max_new_tokens=8, out=str(out), kv_variants=["mean:zscore:max"])
    run(cfg, progress=False)
    doc = json.loads((out / "locomo.json").read_text())
    for key in ("config", "machine", "git_commit", "date", "aggregates", "records", "ingest", "wall_s"):
        assert key in doc, key
    assert set(doc["aggregates"]) == set(ALL_SYSTEMS) | {"kv-memory[mean:zscore:max]"}
    questions = {r["qid"] for r in doc["records"]}
    assert 1 <= len(questions) <= 5
    assert len(doc["records"]) == len(questions) * len(doc["aggregates"])
    for r in doc["records"]:
        for f in RECORD_FIELDS:
            assert f in r, f
        assert r["conversation"] == conv
    for name, a in doc["aggregates"].items():
        if a["answered"]:
            for f in AGGREGATE_FIELDS:
                assert f in a, (name, f)
    for name in ("rag-minilm", "rag-bm25", "kv-memory", "kv-memory[mean:zscore:max]"):
        for k in RECALL_KS:
            assert f"recall@{k}" in doc["aggregates"][name], (name, k)
    kv = doc["aggregates"]["kv-memory"]
    assert kv["reused_tokens_mean"] > 0 and kv["prefill_reduction_vs_full-context"] > 1
    ingest = doc["ingest"][f"{conv}/kv-memory"]
    assert ingest["segments"] > 0 and ingest["kv_bytes_per_token"] > 0 and ingest["store_stats"]["has_disk"]
    assert (out / "locomo.md").read_text().startswith("| system")
    assert (out / "accuracy_vs_prefill.png").stat().st_size > 1000
    assert (out / "recall_at_k.png").stat().st_size > 1000
