// LatentIndex's device search (IndexOptions::device = 0) against its CPU brute force
// (SearchBackend::kCpu, exact) on the same index: random summaries over a grid of shapes and
// options, filters, pins, token budgets, deletions and growth between searches, ties, many hits
// (gpu label: needs a CUDA device; every test skips without one).
//
// Agreement: every device hit's score equals the CPU brute-force score of that segment within
// float tolerance; the hit lists (keys, pinned flags, ranks) are equal unless CPU scores within
// the tolerance straddle the selection boundary; breakdowns agree within tolerance.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "index/index_test_util.h"
#include "kvagent/cuda_kv.h"
#include "kvagent/index.h"

namespace kvagent {
namespace {

using testing_index::RandomKeys;
using testing_index::RandomQuery;
using testing_index::Spec;

struct Seg {
  IndexEntry entry;
  KeySummary sum;
};

Seg MakeSeg(std::mt19937& rng, const ModelSpec& spec, int i) {
  std::uniform_int_distribution<int> tok(1, 6);
  const int T = tok(rng);
  auto k = RandomKeys(rng, spec.num_layers, spec.num_kv_heads, T, spec.head_dim);
  Seg s;
  s.sum = KeySummary::FromKeys(k.data(), DType::kF32, spec.num_layers, spec.num_kv_heads, T, spec.head_dim).value();
  IndexEntry& e = s.entry;
  e.key = MemoryKey("ns", "s" + std::to_string(i % 4), i, 0);
  e.ns = i % 7 == 6 ? "other" : "ns";
  e.agent = i % 2 ? "a1" : "a0";
  e.session = "s" + std::to_string(i % 4);
  e.turn = i;
  e.time_us = 1000 * i;
  e.num_tokens = T * 10;
  e.pinned = i % 97 == 5;
  return s;
}

std::string Describe(const IndexOptions& o) {
  std::ostringstream s;
  s << "score=" << static_cast<int>(o.score) << " norm=" << static_cast<int>(o.norm)
    << " agg=" << static_cast<int>(o.agg) << " head_reduce=" << static_cast<int>(o.head_reduce)
    << " chunks=" << o.token_chunks << " storage=" << (o.storage == DType::kF16 ? "f16" : "f32");
  return s.str();
}

// CPU brute-force scores of every candidate of `req` (top_k 0, no budget), by key.
std::map<Hash128, float> CpuAllScores(const LatentIndex& idx, const QueryView& q, SearchRequest req) {
  req.top_k = 0;
  req.token_budget.reset();
  req.explain = false;
  req.exact = true;
  req.backend = SearchBackend::kCpu;
  auto hits = idx.Search(q, req);
  EXPECT_TRUE(hits.ok()) << hits.status().ToString();
  std::map<Hash128, float> m;
  if (hits.ok()) {
    for (const Hit& h : *hits) m[h.entry.key] = h.score;
  }
  return m;
}

void ExpectNearVec(const std::vector<float>& a, const std::vector<float>& b, double tol, const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], tol) << what << "[" << i << "]";
}

// Runs `req` on the device and on the CPU (exact) and checks that they agree.
void CompareSearch(const LatentIndex& idx, const QueryView& q, SearchRequest req, const std::string& what) {
  SCOPED_TRACE(what);
  SearchRequest dreq = req, creq = req;
  dreq.backend = SearchBackend::kDevice;
  creq.backend = SearchBackend::kCpu;
  creq.exact = true;
  auto dev = idx.Search(q, dreq);
  ASSERT_TRUE(dev.ok()) << dev.status().ToString();
  auto cpu = idx.Search(q, creq);
  ASSERT_TRUE(cpu.ok()) << cpu.status().ToString();
  const std::map<Hash128, float> all = CpuAllScores(idx, q, req);
  double big = 0;
  for (const auto& [k, v] : all) big = std::max(big, std::fabs(static_cast<double>(v)));
  auto tol_of = [&](double v) { return 2e-4 * std::fabs(v) + 2e-5 * big + 1e-30; };
  // Every device hit is a candidate with the CPU's score.
  for (const Hit& h : *dev) {
    auto it = all.find(h.entry.key);
    ASSERT_NE(it, all.end()) << "device hit " << h.entry.key.ToHex() << " is not a CPU candidate";
    EXPECT_NEAR(h.score, it->second, tol_of(it->second)) << "turn " << h.entry.turn;
  }
  // Same hits unless near-ties straddle the boundary: the CPU's lowest non-pinned hit score vs the
  // best score it left out.
  std::map<Hash128, const Hit*> cpu_by_key;
  float lowest = INFINITY;
  for (const Hit& h : *cpu) {
    cpu_by_key[h.entry.key] = &h;
    if (!h.pinned) lowest = std::min(lowest, h.score);
  }
  float best_out = -INFINITY;
  for (const auto& [k, v] : all) {
    if (!cpu_by_key.count(k)) best_out = std::max(best_out, v);
  }
  bool near_tie =
      std::isfinite(lowest) && std::isfinite(best_out) && std::fabs(lowest - best_out) <= 2 * tol_of(lowest);
  if (req.token_budget) {
    // A budget selection skips what does not fit: any near-tie among the leading scores can change
    // it, so look at adjacent pairs of the best (hits + 10) scores.
    std::vector<float> v;
    for (const auto& [k, x] : all) v.push_back(x);
    std::sort(v.begin(), v.end(), std::greater<float>());
    const size_t n = std::min(v.size(), cpu->size() + 10);
    for (size_t i = 1; i < n; ++i) near_tie |= v[i - 1] - v[i] <= 2 * tol_of(v[i - 1]);
  }
  if (!near_tie) {
    ASSERT_EQ(dev->size(), cpu->size());
  }
  if (dev->size() != cpu->size()) return;
  bool same_keys = true;
  for (size_t i = 0; i < dev->size(); ++i) same_keys &= (*dev)[i].entry.key == (*cpu)[i].entry.key;
  if (!same_keys) {
    ASSERT_TRUE(near_tie) << "hit lists differ without a near-tie at the boundary";
    return;
  }
  // Ranks can swap only between near-equal scores.
  for (size_t i = 0; i < dev->size(); ++i) {
    const Hit& d = (*dev)[i];
    const Hit& c = (*cpu)[i];
    EXPECT_EQ(d.pinned, c.pinned);
    EXPECT_EQ(d.entry, c.entry);
    if (d.rank != c.rank) {
      for (const Hit& o : *cpu) {
        if (o.rank == d.rank) {
          EXPECT_NEAR(o.score, c.score, 2 * tol_of(c.score)) << "rank swap between distant scores";
        }
      }
    }
    if (req.explain) {
      const Breakdown &bd = d.breakdown, &bc = c.breakdown;
      EXPECT_EQ(bd.layers, bc.layers);
      EXPECT_EQ(bd.chunk_tokens, bc.chunk_tokens);
      double vbig = 1e-30;
      for (float v : bc.per_layer) vbig = std::max(vbig, std::fabs(static_cast<double>(v)));
      for (const Vote& v : bc.top_votes) vbig = std::max(vbig, std::fabs(static_cast<double>(v.value)));
      const double vtol = 5e-4 * vbig + 1e-6 * big;
      ExpectNearVec(bd.per_layer, bc.per_layer, vtol, "per_layer");
      ExpectNearVec(bd.per_kv_head, bc.per_kv_head, vtol, "per_kv_head");
      ExpectNearVec(bd.per_chunk, bc.per_chunk, vtol, "per_chunk");
      ASSERT_EQ(bd.top_votes.size(), bc.top_votes.size());
      for (size_t k = 0; k < bd.top_votes.size(); ++k) {
        EXPECT_NEAR(bd.top_votes[k].value, bc.top_votes[k].value, vtol) << "top vote " << k;
      }
    }
  }
}

bool HaveDevice() { return cuda::DeviceAvailable(); }

// An index on device 0 holding `n` random segments numbered from 0 (null on failure).
std::unique_ptr<LatentIndex> DeviceIndexWith(const ModelSpec& spec, IndexOptions o, std::mt19937& rng, int n) {
  o.device = 0;
  auto made = LatentIndex::Create(spec, o);
  EXPECT_TRUE(made.ok()) << made.status().ToString();
  if (!made.ok()) return nullptr;
  for (int i = 0; i < n; ++i) {
    Seg s = MakeSeg(rng, spec, i);
    EXPECT_TRUE((*made)->Add(s.entry, s.sum).ok());
  }
  return std::move(*made);
}

struct Shape {
  int layers, q_heads, kv_heads, dim, segments, query_tokens;
};

TEST(LatentIndexDevice, MatchesCpuBruteForceOverGrid) {
  if (!HaveDevice()) GTEST_SKIP() << "no CUDA device";
  const Shape kShapes[] = {
      {2, 4, 2, 16, 300, 3},  {3, 6, 2, 14, 57, 1},     {4, 8, 8, 64, 2500, 5},
      {2, 8, 4, 80, 1500, 7}, {8, 32, 8, 128, 1200, 4},
  };
  std::mt19937 rng(2024);
  int combo = 0;
  for (const Shape& sh : kShapes) {
    const ModelSpec spec = Spec(sh.layers, sh.q_heads, sh.kv_heads, sh.dim);
    std::vector<Seg> segs;
    for (int i = 0; i < sh.segments; ++i) segs.push_back(MakeSeg(rng, spec, i));
    for (int v = 0; v < 6; ++v, ++combo) {
      IndexOptions o;
      o.device = 0;
      o.score = combo % 3 == 1 ? ScoreKind::kBoundingBox : ScoreKind::kMeanKey;
      o.norm = static_cast<TokenNorm>(combo % 3);
      o.agg = combo % 2 ? Aggregation::kMean : Aggregation::kMax;
      o.head_reduce = static_cast<HeadReduce>((combo / 2) % 3);
      o.token_chunks = combo % 4 == 3 ? 2 : 0;
      o.storage = combo % 5 == 4 ? DType::kF32 : DType::kF16;
      const std::string what = "shape L=" + std::to_string(sh.layers) + " Hq=" + std::to_string(sh.q_heads) +
                               " G=" + std::to_string(sh.kv_heads) + " D=" + std::to_string(sh.dim) +
                               " S=" + std::to_string(sh.segments) + " " + Describe(o);
      SCOPED_TRACE(what);
      auto made = LatentIndex::Create(spec, o);
      ASSERT_TRUE(made.ok()) << made.status().ToString();
      LatentIndex& idx = **made;
      ASSERT_EQ(idx.device(), 0);
      for (const Seg& s : segs) ASSERT_TRUE(idx.Add(s.entry, s.sum).ok());
      std::vector<float> qf = RandomQuery(rng, sh.layers, sh.q_heads, sh.query_tokens, sh.dim);
      const QueryView q{qf.data(), DType::kF32, sh.layers, sh.q_heads, sh.query_tokens, sh.dim};

      SearchRequest plain;
      plain.top_k = 5;
      CompareSearch(idx, q, plain, "plain top 5");
      SearchRequest filt;
      filt.top_k = 7;
      filt.ns = "ns";
      filt.agent = "a1";
      filt.min_time_us = 1000 * (sh.segments / 5);
      filt.max_time_us = 1000 * (sh.segments - 3);
      filt.pinned = {segs[0].entry.key, segs[2].entry.key, segs[sh.segments - 1].entry.key};
      CompareSearch(idx, q, filt, "filters + pins");
      SearchRequest sess;
      sess.top_k = 3;
      sess.session = "s2";
      sess.explain = false;
      CompareSearch(idx, q, sess, "session filter, no explain");
      SearchRequest budget;
      budget.top_k = 0;
      budget.token_budget = 200;
      budget.ns = "ns";
      CompareSearch(idx, q, budget, "token budget");
      if (HasFatalFailure()) return;
    }
  }
}

TEST(LatentIndexDevice, DeletionsGrowthAndPinsBetweenSearches) {
  if (!HaveDevice()) GTEST_SKIP() << "no CUDA device";
  const ModelSpec spec = Spec(4, 8, 4, 32);
  std::mt19937 rng(77);
  IndexOptions o;
  o.device = 0;
  auto made = LatentIndex::Create(spec, o);
  ASSERT_TRUE(made.ok()) << made.status().ToString();
  LatentIndex& idx = **made;
  std::vector<Seg> live;
  int next = 0;
  for (; next < 900; ++next) live.push_back(MakeSeg(rng, spec, next));
  for (const Seg& s : live) ASSERT_TRUE(idx.Add(s.entry, s.sum).ok());
  std::vector<float> qf = RandomQuery(rng, 4, 8, 6, 32);
  const QueryView q{qf.data(), DType::kF32, 4, 8, 6, 32};
  for (int round = 0; round < 6; ++round) {
    SCOPED_TRACE("round " + std::to_string(round) + ", " + std::to_string(idx.size()) + " segments");
    SearchRequest r;
    r.top_k = 8;
    CompareSearch(idx, q, r, "all");
    r.ns = "ns";
    r.agent = "a0";
    r.pinned = {live[live.size() / 2].entry.key};
    CompareSearch(idx, q, r, "filtered");
    if (HasFatalFailure()) return;
    // Remove a random 15% (including the current best hits), pin/unpin some, add more than were
    // removed so the mirror grows past its first capacity (1024 rows).
    auto top = idx.Search(q, SearchRequest{});
    ASSERT_TRUE(top.ok());
    for (const Hit& h : *top) {
      if (round % 2 == 0) {
        ASSERT_TRUE(idx.Remove(h.entry.key).ok());
      }
    }
    std::shuffle(live.begin(), live.end(), rng);
    const size_t drop = live.size() * 15 / 100;
    for (size_t i = 0; i < drop; ++i) (void)idx.Remove(live[i].entry.key);
    live.erase(live.begin(), live.begin() + drop);
    live.erase(std::remove_if(live.begin(), live.end(), [&](const Seg& s) { return !idx.Contains(s.entry.key); }),
               live.end());
    for (size_t i = 0; i < 5 && i < live.size(); ++i) ASSERT_TRUE(idx.SetPinned(live[i].entry.key, round % 2).ok());
    for (int i = 0; i < 300; ++i, ++next) {
      live.push_back(MakeSeg(rng, spec, next));
      ASSERT_TRUE(idx.Add(live.back().entry, live.back().sum).ok());
    }
  }
  EXPECT_GT(idx.DeviceMemoryBytes(), 0u);
  // Remove everything: empty results, then refill.
  for (const Seg& s : live) ASSERT_TRUE(idx.Remove(s.entry.key).ok());
  SearchRequest r;
  r.backend = SearchBackend::kDevice;
  auto empty = idx.Search(q, r);
  ASSERT_TRUE(empty.ok()) << empty.status().ToString();
  EXPECT_TRUE(empty->empty());
  for (int i = 0; i < 50; ++i, ++next) {
    Seg s = MakeSeg(rng, spec, next);
    ASSERT_TRUE(idx.Add(s.entry, s.sum).ok());
  }
  CompareSearch(idx, q, SearchRequest{}, "refilled");
}

TEST(LatentIndexDevice, TiesBreakByKeyAsOnCpu) {
  if (!HaveDevice()) GTEST_SKIP() << "no CUDA device";
  // Identical summaries: every score ties; the CPU takes the lowest keys, and so must the device
  // (its top-k breaks ties by row, so the index falls back to a host selection).
  const ModelSpec spec = Spec(2, 4, 2, 16);
  std::mt19937 rng(5);
  const Seg proto = MakeSeg(rng, spec, 0);
  for (TokenNorm norm : {TokenNorm::kSoftmax, TokenNorm::kZScore, TokenNorm::kNone}) {
    IndexOptions o;
    o.device = 0;
    o.norm = norm;
    auto made = LatentIndex::Create(spec, o);
    ASSERT_TRUE(made.ok());
    LatentIndex& idx = **made;
    for (int i = 0; i < 200; ++i) {
      IndexEntry e = proto.entry;
      e.key = MemoryKey("ns", "tie", i, 0);
      e.turn = i;
      e.pinned = false;
      ASSERT_TRUE(idx.Add(e, proto.sum).ok());
    }
    std::vector<float> qf = RandomQuery(rng, 2, 4, 3, 16);
    const QueryView q{qf.data(), DType::kF32, 2, 4, 3, 16};
    for (int k : {1, 5, 60}) {
      SearchRequest r;
      r.top_k = k;
      SearchRequest c = r;
      r.backend = SearchBackend::kDevice;
      c.backend = SearchBackend::kCpu;
      auto dh = idx.Search(q, r);
      auto ch = idx.Search(q, c);
      ASSERT_TRUE(dh.ok() && ch.ok());
      ASSERT_EQ(dh->size(), ch->size());
      for (size_t i = 0; i < dh->size(); ++i) {
        EXPECT_EQ((*dh)[i].entry.key, (*ch)[i].entry.key) << "norm " << static_cast<int>(norm) << " k " << k;
        EXPECT_EQ((*dh)[i].rank, (*ch)[i].rank);
      }
    }
  }
}

TEST(LatentIndexDevice, ManyHitsAndBf16Query) {
  if (!HaveDevice()) GTEST_SKIP() << "no CUDA device";
  // top_k above the device top-k limit (1024) and top_k = 0 take the all-scores path.
  const ModelSpec spec = Spec(2, 4, 4, 32);
  std::mt19937 rng(9);
  IndexOptions o;
  o.norm = TokenNorm::kZScore;
  o.agg = Aggregation::kMean;
  auto made = DeviceIndexWith(spec, o, rng, 3000);
  ASSERT_NE(made, nullptr);
  LatentIndex& idx = *made;
  std::vector<float> qf = RandomQuery(rng, 2, 4, 2, 32);
  std::vector<uint16_t> qb(qf.size());
  for (size_t i = 0; i < qf.size(); ++i) qb[i] = F32ToBF16(qf[i]);
  const QueryView q{qb.data(), DType::kBF16, 2, 4, 2, 32};
  SearchRequest r;
  r.top_k = 1500;
  r.explain = false;
  CompareSearch(idx, q, r, "top 1500");
  r.top_k = 0;
  CompareSearch(idx, q, r, "all hits");
}

TEST(LatentIndexDevice, ConcurrentSearchesAgree) {
  if (!HaveDevice()) GTEST_SKIP() << "no CUDA device";
  const ModelSpec spec = Spec(3, 8, 2, 64);
  std::mt19937 rng(31);
  auto made = DeviceIndexWith(spec, IndexOptions{}, rng, 2000);
  ASSERT_NE(made, nullptr);
  LatentIndex& idx = *made;
  std::vector<std::vector<float>> qs;
  for (int t = 0; t < 4; ++t) qs.push_back(RandomQuery(rng, 3, 8, 4, 64));
  std::vector<std::vector<Hit>> want(4);
  for (int t = 0; t < 4; ++t) {
    auto h = idx.Search(QueryView{qs[t].data(), DType::kF32, 3, 8, 4, 64}, SearchRequest{});
    ASSERT_TRUE(h.ok());
    want[t] = *h;
  }
  std::vector<int> bad(4, 0);
  std::vector<std::thread> th;
  for (int t = 0; t < 4; ++t) {
    th.emplace_back([&, t] {
      for (int rep = 0; rep < 20; ++rep) {
        auto h = idx.Search(QueryView{qs[t].data(), DType::kF32, 3, 8, 4, 64}, SearchRequest{});
        if (!h.ok() || h->size() != want[t].size()) {
          ++bad[t];
          continue;
        }
        for (size_t i = 0; i < h->size(); ++i) {
          if ((*h)[i].entry.key != want[t][i].entry.key || (*h)[i].score != want[t][i].score) ++bad[t];
        }
      }
    });
  }
  for (auto& x : th) x.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(bad[t], 0) << "thread " << t;
}

TEST(LatentIndexDevice, TopPIsUnimplementedOnDeviceAndAutoPicksCpu) {
  if (!HaveDevice()) GTEST_SKIP() << "no CUDA device";
  const ModelSpec spec = Spec(2, 4, 2, 16);
  IndexOptions o;
  o.device = 0;
  o.agg = Aggregation::kTopP;
  auto made = LatentIndex::Create(spec, o);
  ASSERT_FALSE(made.ok());
  EXPECT_EQ(made.status().code(), StatusCode::kUnimplemented);
  o.device = kAutoDevice;
  auto cpu = LatentIndex::Create(spec, o);
  ASSERT_TRUE(cpu.ok());
  EXPECT_EQ((*cpu)->device(), kCpuDevice);
  o.agg = Aggregation::kMax;
  auto dev = LatentIndex::Create(spec, o);
  ASSERT_TRUE(dev.ok());
  EXPECT_EQ((*dev)->device(), 0);
}

}  // namespace
}  // namespace kvagent
