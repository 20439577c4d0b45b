"""kv_agent.index against a plain numpy reference scorer."""

from __future__ import annotations

import numpy as np
import pytest

import kv_agent
from kv_agent import index as ki
from kv_agent.errors import (
    AlreadyExistsError,
    DataLossError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)


def make_spec(layers=4, q_heads=8, kv_heads=2, dim=16, attn_scale=0.0):
    spec = kv_agent.uniform_model_spec(
        "t",
        layers,
        q_heads,
        kv_heads,
        dim,
        kv_agent.DType.f32,
        kv_agent.RopeSpec(),
        kv_agent.Hash128.of_str("w"),
    )
    spec.attn_scale = attn_scale
    return spec


def summarize_ref(keys, layers):
    k = keys[layers].astype(np.float64)  # [L, H, T, D]
    return k.min(axis=2), k.max(axis=2), k.mean(axis=2)


def score_ref(spec, opts, layers, boxes, q):
    """Reference of the whole scoring pipeline; boxes: list of (min, max, mean) [L_all?, H, D] per segment
    restricted to `layers`; q [L_sel, Hq, T, D]."""
    L, Hq, T, D = q.shape
    G = spec.num_kv_heads
    gs = Hq // G
    C = T if opts.token_chunks == 0 else min(opts.token_chunks, T)
    scale = spec.effective_attn_scale()
    q = q.astype(np.float64)
    S = len(boxes)
    x = np.zeros((S, L, G, C))
    for c in range(C):
        t0, t1 = c * T // C, (c + 1) * T // C
        qc = q[:, :, t0:t1, :].mean(axis=2) * scale  # [L, Hq, D]
        for g in range(G):
            grp = qc[:, g * gs : (g + 1) * gs, :]  # [L, gs, D]
            vecs = grp.mean(axis=1, keepdims=True) if opts.head_reduce == "mean_query" else grp
            for s, (mn, mx, mu) in enumerate(boxes):
                if opts.score == "bbox":
                    per = np.maximum(vecs * mn[:, None, g, :], vecs * mx[:, None, g, :]).sum(-1)
                else:
                    per = (vecs * mu[:, None, g, :]).sum(-1)
                x[s, :, g, c] = per.max(axis=1) if opts.head_reduce == "max_score" else per.mean(axis=1)
    if opts.norm == "softmax":
        e = np.exp(x - x.max(axis=0, keepdims=True))
        x = e / e.sum(axis=0, keepdims=True)
    elif opts.norm == "zscore":
        sd = x.std(axis=0, keepdims=True)
        x = np.where(sd > 0, (x - x.mean(axis=0, keepdims=True)) / np.where(sd > 0, sd, 1), 0)
    flat = x.reshape(S, -1)
    if opts.agg == "max":
        return flat.max(axis=1)
    if opts.agg == "top_p":
        n = max(1, int(np.ceil(opts.top_p * flat.shape[1] - 1e-9)))
        return -np.sort(-flat, axis=1)[:, :n].mean(axis=1)
    return flat.mean(axis=1)


def build(spec, opts, n=20, seed=0, tokens=6):
    rng = np.random.default_rng(seed)
    idx = ki.LatentIndex(spec, opts)
    layers = idx.layers
    boxes, keys = [], []
    for i in range(n):
        k = (
            rng.standard_normal((spec.num_layers, spec.num_kv_heads, tokens, spec.head_dim))
            + rng.standard_normal((spec.num_layers, spec.num_kv_heads, 1, spec.head_dim))
        ).astype(np.float32)
        key = kv_agent.memory_key("ns", f"s{i % 2}", i, 0)
        idx.add(
            key,
            ki.summarize(k, dtype="f32"),
            ns="ns",
            session=f"s{i % 2}",
            turn=i,
            time_us=i,
            num_tokens=10 + i,
        )
        keys.append(key)
        boxes.append(summarize_ref(k, layers))
    return idx, keys, boxes


@pytest.mark.parametrize("score", ["bbox", "mean"])
@pytest.mark.parametrize("norm", ["softmax", "zscore", "none"])
@pytest.mark.parametrize("agg", ["mean", "max", "top_p"])
@pytest.mark.parametrize("head_reduce", ["mean_query", "max_score"])
def test_scores_match_numpy_reference(score, norm, agg, head_reduce):
    spec = make_spec(attn_scale=0.2 if score == "mean" else 0.0)
    opts = ki.IndexOptions(
        score=score, norm=norm, agg=agg, head_reduce=head_reduce, layers=[3, 1], token_chunks=2, storage="f32"
    )
    idx, keys, boxes = build(spec, opts)
    q = np.random.default_rng(1).standard_normal((2, 8, 5, 16)).astype(np.float32)
    hits = idx.search(q, top_k=0)
    assert len(hits) == len(keys)
    got = {h.key: h.score for h in hits}
    want = score_ref(spec, opts, [3, 1], boxes, q)
    for key, w in zip(keys, want, strict=True):
        assert got[key] == pytest.approx(w, rel=2e-5, abs=1e-6)


def test_torch_bf16_and_f16_queries_and_keys():
    torch = pytest.importorskip("torch")
    spec = make_spec()
    opts = ki.IndexOptions(storage="f32", layers=[0, 2])
    idx, keys, boxes = build(spec, opts)
    q32 = torch.randn(2, 8, 3, 16)
    for dt in (torch.bfloat16, torch.float16):
        q = q32.to(dt)
        hits = idx.search(q, top_k=0)
        want = score_ref(spec, opts, [0, 2], boxes, q.float().numpy())
        got = {h.key: h.score for h in hits}
        for key, w in zip(keys, want, strict=True):
            assert got[key] == pytest.approx(w, rel=2e-5, abs=1e-6)
    # numpy float16 too, and a non-contiguous tensor (made contiguous by the wrapper).
    assert len(idx.search(q32.numpy().astype(np.float16), top_k=3)) == 3
    assert len(idx.search(q32.transpose(0, 1).contiguous().transpose(0, 1), top_k=3)) == 3
    # bf16 keys summarise like their f32 values.
    k = torch.randn(4, 2, 5, 16).to(torch.bfloat16)
    a = ki.summary_info(ki.summarize(k, dtype="f32"))
    b = ki.summary_info(ki.summarize(k.float().numpy(), dtype="f32"))
    assert a == b


def test_summary_round_trip_and_layers():
    rng = np.random.default_rng(2)
    k = rng.standard_normal((5, 2, 7, 16)).astype(np.float32)
    info = ki.summary_info(ki.summarize(k, layers=[4, 1], dtype="f32"))
    assert info["layers"] == [1, 4]
    mn, mx, mu = summarize_ref(k, [1, 4])
    np.testing.assert_array_equal(np.array(info["min"]).reshape(2, 2, 16), mn.astype(np.float32))
    np.testing.assert_array_equal(np.array(info["max"]).reshape(2, 2, 16), mx.astype(np.float32))
    np.testing.assert_allclose(np.array(info["mean"]).reshape(2, 2, 16), mu, rtol=1e-6, atol=1e-6)
    b16 = ki.summarize(k)  # f16: outward-rounded box
    i16 = ki.summary_info(b16)
    assert len(b16) < len(ki.summarize(k, dtype="f32"))
    assert np.all(np.array(i16["min"]).reshape(5, 2, 16) <= summarize_ref(k, range(5))[0] + 0)
    assert np.all(np.array(i16["max"]).reshape(5, 2, 16) >= summarize_ref(k, range(5))[1])


def test_bbox_bounds_every_key():
    rng = np.random.default_rng(3)
    spec = make_spec(layers=2, q_heads=8, kv_heads=2, dim=64)
    opts = ki.IndexOptions(score="bbox", norm="none", agg="max", head_reduce="max_score", token_chunks=0, layers=[0, 1])
    idx = ki.LatentIndex(spec, opts)
    k = rng.standard_normal((2, 2, 11, 64)).astype(np.float32)
    idx.add(kv_agent.Hash128.of_str("a"), ki.summarize(k), num_tokens=11)
    q = rng.standard_normal((2, 8, 4, 64)).astype(np.float32)
    (hit,) = idx.search(q)
    kk = np.repeat(k, 4, axis=1)  # key of each query head's group
    true_max = np.einsum("lhtd,lhsd->lhts", q, kk).max() * spec.effective_attn_scale()
    assert hit.score >= true_max - 1e-4


def test_selection_filters_pins_budget_and_order():
    spec = make_spec()
    idx, keys, _ = build(spec, ki.IndexOptions(layers=[0]), n=12)
    q = np.random.default_rng(4).standard_normal((1, 8, 3, 16)).astype(np.float32)
    hits = idx.search(q, top_k=3, pinned=[keys[11]], session="s0")
    assert keys[11] in {h.key for h in hits}
    assert sum(not h.pinned for h in hits) == 3
    assert all(h.session == "s0" for h in hits if not h.pinned)
    assert [h.time_us for h in hits] == sorted(h.time_us for h in hits)
    assert sorted(h.rank for h in hits) == list(range(len(hits)))
    by_rank = sorted(hits, key=lambda h: h.rank)
    assert all(a.score >= b.score for a, b in zip(by_rank, by_rank[1:], strict=False))
    hits = idx.search(q, top_k=0, token_budget=40, min_time_us=2, max_time_us=8)
    assert sum(h.num_tokens for h in hits) <= 40
    assert all(2 <= h.time_us <= 8 for h in hits)
    assert idx.search(q, ns="elsewhere") == []
    bd = hits[0].breakdown
    assert bd["layers"] == [0] and len(bd["per_kv_head"]) == 2 and len(bd["per_chunk"]) == 3
    assert bd["top_votes"][0]["layer"] == 0


def test_add_remove_len_and_errors():
    spec = make_spec()
    idx, keys, _ = build(spec, ki.IndexOptions(layers=[1]), n=5)
    assert len(idx) == 5 and keys[0] in idx
    idx.remove(keys[0])
    assert len(idx) == 4 and keys[0] not in idx
    with pytest.raises(NotFoundError):
        idx.remove(keys[0])
    k = np.zeros((4, 2, 3, 16), np.float32)
    with pytest.raises(AlreadyExistsError):
        idx.add(keys[1], ki.summarize(k), num_tokens=3)
    with pytest.raises(InvalidArgumentError):  # summary lacks indexed layer 1
        idx.add(kv_agent.Hash128.of_str("x"), ki.summarize(k, layers=[0]), num_tokens=3)
    with pytest.raises(InvalidArgumentError):  # wrong head_dim
        idx.add(kv_agent.Hash128.of_str("x"), ki.summarize(np.zeros((4, 2, 3, 8), np.float32)), num_tokens=3)
    good = ki.summarize(k)
    with pytest.raises(DataLossError):
        idx.add(kv_agent.Hash128.of_str("x"), good[:-1], num_tokens=3)
    bad = bytearray(good)
    bad[20] ^= 1
    with pytest.raises(DataLossError):
        idx.add(kv_agent.Hash128.of_str("x"), bytes(bad), num_tokens=3)
    with pytest.raises(InvalidArgumentError):
        ki.summarize(np.zeros((4, 2, 3), np.float32))
    with pytest.raises(InvalidArgumentError):
        ki.summarize(np.zeros((4, 2, 3, 16), np.int32))
    with pytest.raises(InvalidArgumentError):
        ki.summarize(k, layers=[9])
    with pytest.raises(InvalidArgumentError):
        ki.summarize(np.full((1, 1, 1, 4), np.nan, np.float32))
    q = np.zeros((1, 8, 3, 16), np.float32)
    for bad_q in (
        np.zeros((2, 8, 3, 16), np.float32),
        np.zeros((1, 4, 3, 16), np.float32),
        np.zeros((1, 8, 3, 16), np.float64),
        np.zeros((8, 3, 16), np.float32),
        [1, 2],
    ):
        with pytest.raises(InvalidArgumentError):
            idx.search(bad_q)
    assert len(idx.search(q)) == 4
    with pytest.raises(InvalidArgumentError):
        ki.LatentIndex(spec, ki.IndexOptions(score="cosine"))
    with pytest.raises(InvalidArgumentError):
        ki.LatentIndex(spec, ki.IndexOptions(layers=[7]))


def test_two_stage_options_and_exact_search():
    spec = make_spec()
    n = 60
    exact_opts = ki.IndexOptions(prefilter_min_segments=0)
    two_opts = ki.IndexOptions(
        prefilter_min_segments=10, prefilter_keep=8, prefilter_layers=1, prefilter_sample=4
    )
    brute, keys, _ = build(spec, exact_opts, n=n)
    two, _, _ = build(spec, two_opts, n=n)
    assert brute.prefilter_row_bytes() == 0
    assert two.prefilter_row_bytes() == 2 * 16 * 2  # one layer, 2 KV heads, head_dim 16, f16 mean keys
    q = np.random.default_rng(7).standard_normal((len(two.layers), 8, 5, 16)).astype(np.float32)

    def scores(hits):
        return {h.key: h.score for h in hits}

    want = scores(brute.search(q, top_k=3))
    assert scores(two.search(q, top_k=3, exact=True)) == want
    assert scores(two.search(q, top_k=0)) == scores(brute.search(q, top_k=0))  # top_k = 0: always exact
    got = two.search(q, top_k=3, pinned=[keys[5]])
    assert len(got) == 4 and keys[5] in {h.key for h in got}
    # Filtered down to at most prefilter_min_segments candidates: exact again.
    assert scores(two.search(q, top_k=3, session="s0", max_time_us=19)) == scores(
        brute.search(q, top_k=3, session="s0", max_time_us=19)
    )
    with pytest.raises(InvalidArgumentError):
        ki.LatentIndex(spec, ki.IndexOptions(prefilter_keep=-1))


def test_concurrent_searches_from_threads():
    import threading

    spec = make_spec(layers=1, q_heads=4, kv_heads=2, dim=64)
    idx = ki.LatentIndex(spec, ki.IndexOptions(num_threads=1))
    rng = np.random.default_rng(5)
    blob = ki.summarize(rng.standard_normal((1, 2, 4, 64)).astype(np.float32))
    for i in range(3000):
        idx.add(kv_agent.Hash128.of_str(str(i)), blob, num_tokens=4)
    q = rng.standard_normal((1, 4, 2, 64)).astype(np.float32)
    results = []
    threads = [threading.Thread(target=lambda: results.append(len(idx.search(q, top_k=2)))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [2, 2, 2, 2]


# ---- device search (IndexOptions.device) ----


def _device_usable() -> bool:
    try:
        ki.LatentIndex(make_spec(), ki.IndexOptions(device=0))
    except UnavailableError:
        return False
    return True


def test_device_option_without_a_device_is_an_error():
    if _device_usable():
        pytest.skip("a CUDA device is usable here")
    spec = make_spec()
    for device in (0, 1, "cuda", "cuda:1"):
        with pytest.raises(UnavailableError, match="device"):
            ki.LatentIndex(spec, ki.IndexOptions(device=device))
    with pytest.raises(InvalidArgumentError):
        ki.LatentIndex(spec, ki.IndexOptions(device=-5))
    # "auto" is the one option that may pick the CPU.
    idx, keys, _ = build(spec, ki.IndexOptions(device="auto"))
    assert idx.device == -1 and idx.device_memory_bytes() == 0
    q = np.random.default_rng(1).standard_normal((len(idx.layers), 8, 3, 16)).astype(np.float32)
    assert len(idx.search(q, top_k=3)) == 3
    assert [h.key for h in idx.search(q, top_k=3, backend="cpu")] == [h.key for h in idx.search(q, top_k=3)]
    with pytest.raises(UnavailableError):
        idx.search(q, top_k=3, backend="device")
    with pytest.raises(InvalidArgumentError):
        idx.search(q, top_k=3, backend="gpu")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "score,norm,agg,head_reduce",
    [
        ("mean", "softmax", "max", "mean_query"),
        ("bbox", "zscore", "mean", "max_score"),
        ("mean", "none", "max", "mean_score"),
    ],
)
def test_device_search_matches_cpu_brute_force(score, norm, agg, head_reduce):
    if not _device_usable():
        pytest.skip("no CUDA device (or kv_agent built without CUDA)")
    spec = make_spec()
    opts = ki.IndexOptions(score=score, norm=norm, agg=agg, head_reduce=head_reduce, device=0)
    idx, keys, _ = build(spec, opts, n=120)
    assert idx.device == 0
    q = np.random.default_rng(3).standard_normal((len(idx.layers), 8, 4, 16)).astype(np.float32)

    def compare(**kw):
        dev = idx.search(q, backend="device", **kw)
        cpu = idx.search(q, backend="cpu", exact=True, **kw)
        assert [h.key for h in dev] == [h.key for h in cpu]
        assert [h.pinned for h in dev] == [h.pinned for h in cpu]
        big = max(abs(h.score) for h in cpu)
        np.testing.assert_allclose([h.score for h in dev], [h.score for h in cpu], rtol=2e-4, atol=2e-5 * big)
        for d, c in zip(dev, cpu, strict=True):
            bd, bc = d.breakdown, c.breakdown
            assert bd["layers"] == bc["layers"]
            tol = 5e-4 * max(1e-30, *map(abs, bc["per_layer"]))
            np.testing.assert_allclose(bd["per_layer"], bc["per_layer"], rtol=1e-3, atol=tol)

    compare(top_k=5)
    compare(top_k=4, session="s1", max_time_us=90, pinned=[keys[0], keys[3]])
    compare(top_k=0, token_budget=120)
    # Deletions and additions between searches reach the device mirror.
    for k in keys[::7]:
        idx.remove(k)
    compare(top_k=5)
    assert idx.device_memory_bytes() > 0
