"""Plumbing check of the GPU TTFT benchmark on a tiny random model (CPU): every system runs and the
outputs have their fields. Timing on the real shape is a GPU-machine run (docs/results/gpu.md)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")


@pytest.mark.parametrize("layers,graphs", [("", False), ("0-1", False), ("0-1", True)])
def test_gpu_ttft_tiny_runs(tmp_path, layers, graphs):
    from kv_agent.bench import gpu_ttft

    args = ["--tiny", "--histories", "512", "--budget", "256", "--repeats", "1", "--skip-offloaded",
            "--out", str(tmp_path)]
    if layers:
        args += ["--index-layers", layers]
    if graphs:  # the adapter's static path (no capture on CPU) next to the eager one
        args += ["--cuda-graphs"]
    assert gpu_ttft.main(args) == 0
    doc = json.loads((tmp_path / "gpu_ttft.json").read_text())
    assert doc["meta"]["weights"].startswith("random")
    assert doc["meta"]["index_layers"] == (layers or "default")
    row = doc["rows"][0]
    for k in ("full_recompute_s", "kv_total_s", "kv_query_q_s", "kv_search_s", "kv_load_s", "kv_prefill_s"):
        assert row[k] > 0, k
    assert row["kv_loaded_tokens"] <= 256
    if graphs:
        assert row["kv_eager_total_s"] > 0 and doc["meta"]["kv_path"].startswith("cuda graphs")
    assert (tmp_path / "gpu_ttft.md").read_text().startswith("| history")
