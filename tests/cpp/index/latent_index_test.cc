#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>

#include "index_test_util.h"
#include "kvagent/index.h"

namespace kvagent {
namespace {

using testing_index::RandomKeys;
using testing_index::RandomQuery;
using testing_index::ReferenceScores;
using testing_index::Spec;

struct Fixture {
  ModelSpec spec;
  std::vector<KeySummary> sums;
  std::vector<IndexEntry> entries;
};

Fixture MakeFixture(std::mt19937& rng, const ModelSpec& spec, int segments) {
  Fixture f{spec, {}, {}};
  std::uniform_int_distribution<int> tok(1, 9);
  for (int i = 0; i < segments; ++i) {
    const int T = tok(rng);
    auto k = RandomKeys(rng, spec.num_layers, spec.num_kv_heads, T, spec.head_dim);
    f.sums.push_back(
        KeySummary::FromKeys(k.data(), DType::kF32, spec.num_layers, spec.num_kv_heads, T, spec.head_dim).value());
    IndexEntry e;
    e.key = MemoryKey("ns", "s" + std::to_string(i % 3), i, 0);
    e.ns = i % 5 == 4 ? "other" : "ns";
    e.agent = i % 2 ? "a1" : "a0";
    e.session = "s" + std::to_string(i % 3);
    e.turn = i;
    e.time_us = 1000 * i;
    e.num_tokens = T * 10;
    f.entries.push_back(e);
  }
  return f;
}

std::unique_ptr<LatentIndex> Build(const Fixture& f, IndexOptions o) {
  auto idx = LatentIndex::Create(f.spec, std::move(o));
  EXPECT_TRUE(idx.ok()) << idx.status().ToString();
  for (size_t i = 0; i < f.sums.size(); ++i) EXPECT_TRUE((*idx)->Add(f.entries[i], f.sums[i]).ok());
  return std::move(*idx);
}

// Query in the requested dtype plus its f32 view as the index sees it.
struct Query {
  std::vector<float> f32;
  std::vector<uint16_t> half;
  QueryView view;
};
Query MakeQuery(std::mt19937& rng, int L, int Hq, int T, int D, DType dt) {
  Query q;
  q.f32 = RandomQuery(rng, L, Hq, T, D);
  if (dt != DType::kF32) {
    q.half.resize(q.f32.size());
    for (size_t i = 0; i < q.f32.size(); ++i) {
      q.half[i] = dt == DType::kF16 ? F32ToF16(q.f32[i]) : F32ToBF16(q.f32[i]);
      q.f32[i] = dt == DType::kF16 ? F16ToF32(q.half[i]) : BF16ToF32(q.half[i]);
    }
  }
  q.view = QueryView{dt == DType::kF32 ? static_cast<const void*>(q.f32.data()) : q.half.data(), dt, L, Hq, T, D};
  return q;
}

std::map<Hash128, float> ScoresByKey(const std::vector<Hit>& hits) {
  std::map<Hash128, float> m;
  for (const Hit& h : hits) m[h.entry.key] = h.score;
  return m;
}

TEST(LatentIndex, ScoresEqualReferenceOverGrid) {
  std::mt19937 rng(11);
  struct Shape {
    int q_heads, kv_heads, dim;
  };
  const Shape shapes[] = {{2, 2, 64}, {8, 2, 128}, {8, 1, 256}, {6, 3, 12}};
  int cases = 0;
  for (const Shape& sh : shapes) {
    ModelSpec spec = Spec(3, sh.q_heads, sh.kv_heads, sh.dim, sh.dim == 12 ? 0.3 : 0.0);
    Fixture f = MakeFixture(rng, spec, 23);
    for (ScoreKind sk : {ScoreKind::kBoundingBox, ScoreKind::kMeanKey}) {
      for (TokenNorm nm : {TokenNorm::kNone, TokenNorm::kSoftmax, TokenNorm::kZScore}) {
        for (Aggregation ag : {Aggregation::kMean, Aggregation::kMax, Aggregation::kTopP}) {
          const int variant = cases++;
          IndexOptions o;
          o.score = sk;
          o.norm = nm;
          o.agg = ag;
          o.head_reduce = static_cast<HeadReduce>(variant % 3);
          o.token_chunks = variant % 4 == 0 ? 0 : 2;
          o.layers = variant % 2 ? std::vector<int>{2, 0} : std::vector<int>{};
          o.storage = DType::kF32;
          o.num_threads = 1 + variant % 2;
          const std::vector<int> layers = o.layers.empty() ? std::vector<int>{0, 1, 2} : o.layers;
          auto idx = Build(f, o);
          const DType qdt = static_cast<DType>(variant % 3);
          const int T = 1 + variant % 6;
          Query q = MakeQuery(rng, static_cast<int>(layers.size()), sh.q_heads, T, sh.dim, qdt);
          SearchRequest req;
          req.top_k = 0;
          auto hits = idx->Search(q.view, req);
          ASSERT_TRUE(hits.ok()) << hits.status().ToString();
          ASSERT_EQ(hits->size(), f.sums.size());
          auto want = ReferenceScores(spec, o, layers, f.sums, q.f32, T);
          auto got = ScoresByKey(*hits);
          for (size_t i = 0; i < f.sums.size(); ++i) {
            const double tol = 2e-5 * std::max(1.0, std::fabs(want[i])) + 1e-6;
            EXPECT_NEAR(got[f.entries[i].key], want[i], tol)
                << "dim " << sh.dim << " gqa " << sh.q_heads / sh.kv_heads << " variant " << variant;
          }
        }
      }
    }
  }
}

TEST(LatentIndex, F16StorageMatchesReferenceOnRoundedSummaries) {
  std::mt19937 rng(12);
  ModelSpec spec = Spec(2, 8, 2, 128);
  Fixture f = MakeFixture(rng, spec, 30);
  for (ScoreKind sk : {ScoreKind::kBoundingBox, ScoreKind::kMeanKey}) {
    IndexOptions o;
    o.score = sk;
    o.storage = DType::kF16;
    auto idx = Build(f, o);
    Fixture rounded = f;
    for (auto& s : rounded.sums) s = KeySummary::Deserialize(s.Serialize(DType::kF16)).value();
    Query q = MakeQuery(rng, 2, 8, 7, 128, DType::kBF16);
    SearchRequest req;
    req.top_k = 0;
    auto got = ScoresByKey(idx->Search(q.view, req).value());
    auto want = ReferenceScores(spec, o, {0, 1}, rounded.sums, q.f32, 7);
    for (size_t i = 0; i < f.sums.size(); ++i) EXPECT_NEAR(got[f.entries[i].key], want[i], 1e-5 + 2e-5 * want[i]);
  }
}

TEST(LatentIndex, TopKEqualsBruteForce) {
  std::mt19937 rng(13);
  ModelSpec spec = Spec(4, 8, 2, 64);
  Fixture f = MakeFixture(rng, spec, 300);
  IndexOptions o;
  o.storage = DType::kF32;
  o.layers = {1, 3};
  o.num_threads = 2;
  auto idx = Build(f, o);
  for (int trial = 0; trial < 5; ++trial) {
    Query q = MakeQuery(rng, 2, 8, 9, 64, DType::kF32);
    SearchRequest req;
    req.top_k = 1 + trial * 7;
    auto hits = idx->Search(q.view, req).value();
    auto want = ReferenceScores(spec, o, o.layers, f.sums, q.f32, 9);
    std::vector<size_t> order(f.sums.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return want[a] > want[b]; });
    ASSERT_EQ(hits.size(), static_cast<size_t>(req.top_k));
    const double kth = want[order[req.top_k - 1]];
    std::set<Hash128> got;
    for (const Hit& h : hits) got.insert(h.entry.key);
    for (size_t r = 0; r < order.size(); ++r) {
      const double w = want[order[r]];
      if (std::fabs(w - kth) < 1e-6 * std::max(1.0, std::fabs(kth))) continue;  // near-tie at the boundary
      EXPECT_EQ(got.count(f.entries[order[r]].key) == 1, static_cast<int>(r) < req.top_k) << "rank " << r;
    }
    // ranks follow the score, output follows time.
    for (size_t i = 1; i < hits.size(); ++i) EXPECT_LT(hits[i - 1].entry.time_us, hits[i].entry.time_us);
    for (const Hit& a : hits)
      for (const Hit& b : hits)
        if (a.rank < b.rank) {
          EXPECT_GE(a.score, b.score);
        }
  }
}

TEST(LatentIndex, BoundingBoxIsUpperBound) {
  std::mt19937 rng(14);
  for (int dim : {64, 128, 256}) {
    for (int ratio : {1, 4, 8}) {
      ModelSpec spec = Spec(2, 2 * ratio, 2, dim);
      for (DType storage : {DType::kF32, DType::kF16}) {
        IndexOptions o;
        o.score = ScoreKind::kBoundingBox;
        o.norm = TokenNorm::kNone;
        o.agg = Aggregation::kMax;
        o.head_reduce = HeadReduce::kMaxScore;
        o.token_chunks = 0;
        o.storage = storage;
        auto idx = LatentIndex::Create(spec, o).value();
        const int T = 13, Tq = 5;
        auto k = RandomKeys(rng, 2, 2, T, dim);
        KeySummary s = KeySummary::FromKeys(k.data(), DType::kF32, 2, 2, T, dim).value();
        IndexEntry e;
        e.key = HashString("seg");
        ASSERT_TRUE(idx->Add(e, s).ok());
        Query q = MakeQuery(rng, 2, 2 * ratio, Tq, dim, DType::kF16);
        const double scale = spec.EffectiveAttnScale();
        KeySummary s16 = KeySummary::Deserialize(s.Serialize(DType::kF16)).value();
        double best = -1e300;
        for (int l = 0; l < 2; ++l) {
          for (int h = 0; h < 2 * ratio; ++h) {
            const int g = h / ratio;
            for (int t = 0; t < Tq; ++t) {
              const float* qv = q.f32.data() + ((static_cast<size_t>(l) * 2 * ratio + h) * Tq + t) * dim;
              double true_max = -1e300;
              for (int j = 0; j < T; ++j) {
                double dot = 0;
                for (int d = 0; d < dim; ++d) dot += qv[d] * k[((static_cast<size_t>(l) * 2 + g) * T + j) * dim + d];
                true_max = std::max(true_max, dot);
              }
              // Per (token, head): the box bound of the f32 and the f16-rounded summary.
              const size_t o2 = s.Offset(l, g);
              EXPECT_GE(BoxUpperBound(qv, &s.min[o2], &s.max[o2], dim), true_max - 1e-4);
              EXPECT_GE(BoxUpperBound(qv, &s16.min[o2], &s16.max[o2], dim), true_max - 1e-4);
              best = std::max(best, true_max * scale);
            }
          }
        }
        SearchRequest req;
        auto hits = idx->Search(q.view, req).value();
        ASSERT_EQ(hits.size(), 1u);
        EXPECT_GE(hits[0].score, best - 1e-4) << dim << " " << ratio;
      }
    }
  }
}

TEST(LatentIndex, FiltersPinsAndBudget) {
  std::mt19937 rng(15);
  ModelSpec spec = Spec(1, 4, 2, 8);
  Fixture f = MakeFixture(rng, spec, 40);
  f.entries[7].pinned = true;  // ns "ns", session s1, agent a1
  auto idx = Build(f, IndexOptions{});
  Query q = MakeQuery(rng, 1, 4, 3, 8, DType::kF32);

  SearchRequest req;
  req.top_k = 0;
  req.ns = "ns";
  req.agent = "a0";
  req.session = "s2";
  req.min_time_us = 5000;
  req.max_time_us = 30000;
  req.pinned = {f.entries[9].key, HashString("unknown")};
  auto hits = idx->Search(q.view, req).value();
  std::set<Hash128> keys;
  for (const Hit& h : hits) keys.insert(h.entry.key);
  for (size_t i = 0; i < f.entries.size(); ++i) {
    const IndexEntry& e = f.entries[i];
    const bool pinned = i == 7 || i == 9;
    const bool pass = e.ns == "ns" && e.agent == "a0" && e.session == "s2" && e.time_us >= 5000 && e.time_us <= 30000;
    EXPECT_EQ(keys.count(e.key) == 1, (e.ns == "ns") && (pinned || pass)) << i;
  }
  for (const Hit& h : hits) EXPECT_EQ(h.pinned, h.entry.key == f.entries[7].key || h.entry.key == f.entries[9].key);

  // Budget: pinned first, never exceeded by the rest; top_k caps the non-pinned hits.
  for (int64_t budget : {0, 35, 100, 250, 10000}) {
    SearchRequest b;
    b.top_k = 6;
    b.token_budget = budget;
    b.ns = "ns";
    auto bh = idx->Search(q.view, b).value();
    int64_t used = 0, pinned_tokens = 0;
    int unpinned = 0;
    bool has7 = false;
    for (const Hit& h : bh) {
      used += h.entry.num_tokens;
      if (h.pinned) pinned_tokens += h.entry.num_tokens;
      unpinned += !h.pinned;
      has7 |= h.entry.key == f.entries[7].key;
    }
    EXPECT_TRUE(has7);
    EXPECT_LE(unpinned, 6);
    EXPECT_LE(used, std::max(budget, pinned_tokens));
    if (budget == 10000) {
      EXPECT_EQ(unpinned, 6);
    }
  }
  // ns filter excludes even pinned segments of other namespaces.
  SearchRequest o;
  o.ns = "nothing";
  EXPECT_TRUE(idx->Search(q.view, o).value().empty());
}

TEST(LatentIndex, BreakdownIsConsistent) {
  std::mt19937 rng(16);
  ModelSpec spec = Spec(3, 4, 2, 16);
  Fixture f = MakeFixture(rng, spec, 10);
  IndexOptions o;
  o.layers = {0, 2};
  o.token_chunks = 3;
  o.agg = Aggregation::kMean;
  auto idx = Build(f, o);
  Query q = MakeQuery(rng, 2, 4, 7, 16, DType::kF32);
  auto hits = idx->Search(q.view, SearchRequest{}).value();
  ASSERT_EQ(hits.size(), 5u);
  for (const Hit& h : hits) {
    const Breakdown& b = h.breakdown;
    EXPECT_EQ(b.layers, (std::vector<int>{0, 2}));
    ASSERT_EQ(b.per_layer.size(), 2u);
    ASSERT_EQ(b.per_kv_head.size(), 2u);
    ASSERT_EQ(b.per_chunk.size(), 3u);
    EXPECT_EQ(b.chunk_tokens, (std::vector<std::pair<int, int>>{{0, 2}, {2, 4}, {4, 7}}));
    // Aggregation is the mean: every marginal averages back to the score.
    EXPECT_NEAR((b.per_layer[0] + b.per_layer[1]) / 2, h.score, 1e-6);
    EXPECT_NEAR((b.per_chunk[0] + b.per_chunk[1] + b.per_chunk[2]) / 3, h.score, 1e-6);
    ASSERT_EQ(b.top_votes.size(), 3u);
    EXPECT_GE(b.top_votes[0].value, b.top_votes[1].value);
    EXPECT_TRUE(b.top_votes[0].layer == 0 || b.top_votes[0].layer == 2);
  }
}

TEST(LatentIndex, AddRemoveAndErrors) {
  std::mt19937 rng(17);
  ModelSpec spec = Spec(2, 4, 2, 8);
  Fixture f = MakeFixture(rng, spec, 12);
  IndexOptions o;
  o.layers = {1};
  auto idx = Build(f, o);
  EXPECT_EQ(idx->size(), 12u);
  EXPECT_EQ(idx->Add(f.entries[0], f.sums[0]).code(), StatusCode::kAlreadyExists);
  ASSERT_TRUE(idx->Remove(f.entries[3].key).ok());
  EXPECT_EQ(idx->Remove(f.entries[3].key).code(), StatusCode::kNotFound);
  EXPECT_FALSE(idx->Contains(f.entries[3].key));
  EXPECT_TRUE(idx->Contains(f.entries[11].key));
  EXPECT_EQ(idx->Get(f.entries[11].key).value(), f.entries[11]);
  ASSERT_TRUE(idx->SetPinned(f.entries[11].key, true).ok());
  EXPECT_TRUE(idx->Get(f.entries[11].key).value().pinned);

  // After removal the scores of the remaining segments equal a fresh index over them.
  Fixture g = f;
  g.sums.erase(g.sums.begin() + 3);
  g.entries.erase(g.entries.begin() + 3);
  g.entries[10].pinned = true;
  auto fresh = Build(g, o);
  Query q = MakeQuery(rng, 1, 4, 4, 8, DType::kF32);
  SearchRequest all;
  all.top_k = 0;
  auto a = ScoresByKey(idx->Search(q.view, all).value());
  auto b = ScoresByKey(fresh->Search(q.view, all).value());
  EXPECT_EQ(a, b);

  // Bad summaries.
  KeySummary wrong = f.sums[0];
  wrong.layers = {0};
  wrong.min.resize(2 * 8);
  wrong.max.resize(2 * 8);
  wrong.mean.resize(2 * 8);
  IndexEntry e;
  e.key = HashString("new");
  EXPECT_EQ(idx->Add(e, wrong).code(), StatusCode::kInvalidArgument);  // lacks layer 1
  KeySummary huge = f.sums[0];
  huge.max[huge.Offset(1, 0)] = 1e9f;  // layer 1 is indexed; layer 0 values are not checked
  EXPECT_EQ(idx->Add(e, huge).code(), StatusCode::kInvalidArgument);  // beyond f16 storage
  EXPECT_EQ(idx->AddSerialized(e, "garbage").code(), StatusCode::kDataLoss);
  EXPECT_EQ(idx->size(), 11u);
  ASSERT_TRUE(idx->AddSerialized(e, f.sums[0].Serialize()).ok());

  // Bad queries.
  QueryView bad = q.view;
  bad.num_q_heads = 2;
  EXPECT_EQ(idx->Search(bad, all).status().code(), StatusCode::kInvalidArgument);
  bad = q.view;
  bad.num_layers = 2;
  EXPECT_EQ(idx->Search(bad, all).status().code(), StatusCode::kInvalidArgument);
  bad = q.view;
  bad.dtype = DType::kI8;
  EXPECT_EQ(idx->Search(bad, all).status().code(), StatusCode::kInvalidArgument);
  SearchRequest neg;
  neg.top_k = -1;
  EXPECT_EQ(idx->Search(q.view, neg).status().code(), StatusCode::kInvalidArgument);

  // Bad options.
  IndexOptions bo;
  bo.layers = {2};
  EXPECT_FALSE(LatentIndex::Create(spec, bo).ok());
  bo = {};
  bo.top_p = 0;
  EXPECT_FALSE(LatentIndex::Create(spec, bo).ok());
  bo = {};
  bo.storage = DType::kBF16;
  EXPECT_FALSE(LatentIndex::Create(spec, bo).ok());
}

TEST(LatentIndex, ManyBlocksAndThreads) {
  // Small rows force several storage blocks; the 2-thread and 1-thread results agree.
  std::mt19937 rng(18);
  ModelSpec spec = Spec(1, 2, 1, 8);
  Fixture f = MakeFixture(rng, spec, 5000);
  IndexOptions o1;
  o1.num_threads = 1;
  IndexOptions o2 = o1;
  o2.num_threads = 2;
  auto a = Build(f, o1);
  auto b = Build(f, o2);
  for (int i = 0; i < 5000; i += 3) ASSERT_TRUE(a->Remove(f.entries[i].key).ok());
  for (int i = 0; i < 5000; i += 3) ASSERT_TRUE(b->Remove(f.entries[i].key).ok());
  Query q = MakeQuery(rng, 1, 2, 6, 8, DType::kF32);
  SearchRequest req;
  req.top_k = 20;
  auto ha = a->Search(q.view, req).value();
  auto hb = b->Search(q.view, req).value();
  ASSERT_EQ(ha.size(), hb.size());
  for (size_t i = 0; i < ha.size(); ++i) {
    EXPECT_EQ(ha[i].entry.key, hb[i].entry.key);
    EXPECT_NEAR(ha[i].score, hb[i].score, 1e-6 * std::fabs(ha[i].score) + 1e-9);
  }
}

}  // namespace
}  // namespace kvagent
