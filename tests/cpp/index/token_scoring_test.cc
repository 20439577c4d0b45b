// Token-level scoring (ScoreKind::kTokens): the kernel against its double reference over awkward
// sizes, key summaries with token keys (format v2, v1 unchanged), and LatentIndex searches against
// a plain reference written here from the definition.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "index/token_scorer.h"
#include "index_test_util.h"
#include "kvagent/dtype.h"
#include "kvagent/index.h"
#include "kvagent/rope.h"

namespace kvagent {
namespace {

using index_internal::TokenAttentionScores;
using index_internal::TokenAttentionScoresReference;
using index_internal::TokenBlock;
using index_internal::TokenHead;
using testing_index::RandomKeys;
using testing_index::RandomQuery;
using testing_index::Spec;

std::vector<uint16_t> F16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = F32ToF16(v[i]);
  return out;
}

TEST(TokenScorer, MatchesReferenceOverAwkwardSizes) {
  std::mt19937 rng(7);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (int D : {8, 14, 64, 128}) {
    for (int pairs : {1, 3}) {
      for (int S : {1, 2, 7}) {
        std::vector<std::vector<uint16_t>> keys(S);
        std::vector<TokenBlock> blocks(S);
        for (int i = 0; i < S; ++i) {
          const int T = 1 + (i * 5 + D) % 9;  // odd and even counts, 1 included
          std::vector<float> k(static_cast<size_t>(pairs) * T * D);
          for (auto& x : k) x = n(rng);
          keys[i] = F16(k);
          blocks[i] = {keys[i].data(), T};
        }
        std::vector<std::vector<float>> qs;
        std::vector<TokenHead> heads;
        for (int h = 0; h < 4; ++h) {
          const int nq = 1 + h * 2;
          qs.emplace_back(static_cast<size_t>(nq) * D);
          for (auto& x : qs.back()) x = 2.0f * n(rng);  // logits large enough that the shift matters
          heads.push_back({qs.back().data(), nq, h % pairs, 0.5f + h});
        }
        std::vector<double> w(S);
        for (int i = 0; i < S; ++i) w[i] = 1.0 + (i % 3);
        for (const std::vector<double>& weights : {std::vector<double>{}, w}) {
          const auto ref = TokenAttentionScoresReference(blocks, weights, D, heads);
          for (int threads : {1, 3}) {
            const auto got = TokenAttentionScores(blocks, weights, D, heads, threads);
            ASSERT_EQ(got.size(), ref.size());
            for (int i = 0; i < S; ++i) {
              EXPECT_NEAR(got[i], ref[i], 1e-5 * (1 + std::fabs(ref[i]))) << "D=" << D << " S=" << S << " i=" << i;
            }
          }
        }
      }
    }
  }
}

TEST(TokenScorer, ThreadCountDoesNotChangeBits) {
  std::mt19937 rng(3);
  std::normal_distribution<float> n(0.0f, 1.0f);
  const int D = 32, S = 50;
  std::vector<std::vector<uint16_t>> keys(S);
  std::vector<TokenBlock> blocks(S);
  for (int i = 0; i < S; ++i) {
    std::vector<float> k(static_cast<size_t>(2) * 11 * D);
    for (auto& x : k) x = n(rng);
    keys[i] = F16(k);
    blocks[i] = {keys[i].data(), 11};
  }
  std::vector<float> q(5 * D);
  for (auto& x : q) x = n(rng);
  std::vector<TokenHead> heads;
  for (int h = 0; h < 6; ++h) heads.push_back({q.data(), 5, h % 2, 1.0f});
  EXPECT_EQ(TokenAttentionScores(blocks, {}, D, heads, 1), TokenAttentionScores(blocks, {}, D, heads, 4));
}

TEST(TokenSummary, TokenKeysRoundTripAndV1Unchanged) {
  std::mt19937 rng(1);
  const int L = 4, H = 2, T = 5, D = 16;
  const std::vector<float> k = RandomKeys(rng, L, H, T, D);
  auto plain = KeySummary::FromKeys(k.data(), DType::kF32, L, H, T, D);
  ASSERT_TRUE(plain.ok());
  EXPECT_TRUE(plain->token_layers.empty());
  const std::string v1 = plain->Serialize();
  EXPECT_EQ(static_cast<uint8_t>(v1[4]), 1);  // version byte after the magic

  const std::vector<int> tl = {3, 1};
  const std::vector<uint8_t> mask = {1, 0, 1, 1, 0};
  auto s = KeySummary::FromKeys(k.data(), DType::kF32, L, H, T, D, {}, tl, mask);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_EQ(s->token_layers, (std::vector<int>{1, 3}));
  EXPECT_EQ(s->num_token_keys, 3);
  EXPECT_EQ(s->min, plain->min);  // the box and mean still cover every token
  EXPECT_EQ(s->mean, plain->mean);
  // Token key (layer 3, head 1, kept token 2 = token 3).
  const float* tk = s->TokenKeys(s->TokenLayerSlot(3), 1);
  for (int d = 0; d < D; ++d) EXPECT_EQ(tk[2 * D + d], k[((3 * H + 1) * T + 3) * D + d]);

  for (DType dt : {DType::kF16, DType::kF32}) {
    const std::string bytes = s->Serialize(dt);
    EXPECT_EQ(static_cast<uint8_t>(bytes[4]), 2);
    auto back = KeySummary::Deserialize(bytes);
    ASSERT_TRUE(back.ok()) << back.status().ToString();
    EXPECT_EQ(back->token_layers, s->token_layers);
    EXPECT_EQ(back->num_token_keys, 3);
    ASSERT_EQ(back->token_keys.size(), s->token_keys.size());
    for (size_t i = 0; i < s->token_keys.size(); ++i) {
      const float tol = dt == DType::kF16 ? 2e-3f * (1 + std::fabs(s->token_keys[i])) : 0.0f;
      EXPECT_NEAR(back->token_keys[i], s->token_keys[i], tol);
    }
    // Every truncation and every flipped byte is DataLoss (checksum), never a crash.
    for (size_t cut = 0; cut < bytes.size(); cut += 7) {
      EXPECT_EQ(KeySummary::Deserialize(bytes.substr(0, cut)).status().code(), StatusCode::kDataLoss);
    }
  }
  // Bad arguments.
  EXPECT_EQ(KeySummary::FromKeys(k.data(), DType::kF32, L, H, T, D, {}, tl, std::vector<uint8_t>(T, 0)).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(KeySummary::FromKeys(k.data(), DType::kF32, L, H, T, D, {}, tl, std::vector<uint8_t>(T + 1, 1)).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(KeySummary::FromKeys(k.data(), DType::kF32, L, H, T, D, {}, std::vector<int>{L}).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(KeySummary::FromKeys(k.data(), DType::kF32, L, H, T, D, {}, {}, mask).status().code(),
            StatusCode::kInvalidArgument);
}

// Plain reference of a kTokens search score: the definition in include/kvagent/index.h.
std::vector<double> Reference(const ModelSpec& spec, const std::vector<int>& layers, const std::vector<KeySummary>& sums,
                              const std::vector<float>& q, int T, const std::vector<RetrievalHead>& heads,
                              const std::vector<std::vector<float>>& qw) {
  const int Hq = spec.num_q_heads, gs = spec.GroupSize(), D = spec.head_dim;
  std::vector<double> score(sums.size(), 0.0);
  for (const RetrievalHead& h : heads) {
    const int ls = static_cast<int>(std::find(layers.begin(), layers.end(), h.layer) - layers.begin());
    const int g = h.q_head / gs;
    for (int t = 0; t < T; ++t) {
      std::vector<std::vector<double>> logit(sums.size());
      double mx = -1e300;
      for (size_t i = 0; i < sums.size(); ++i) {
        const KeySummary& s = sums[i];
        const float* k = s.TokenKeys(s.TokenLayerSlot(h.layer), g);
        for (int n = 0; n < s.num_token_keys; ++n) {
          double d = 0;
          for (int j = 0; j < D; ++j) {
            const double qq = q[((static_cast<size_t>(ls) * Hq + h.q_head) * T + t) * D + j] * double{qw[ls][j]};
            d += qq * F16ToF32(F32ToF16(k[static_cast<size_t>(n) * D + j]));
          }
          logit[i].push_back(d);
          mx = std::max(mx, d);
        }
      }
      std::vector<double> m(sums.size(), 0.0);
      double z = 0;
      for (size_t i = 0; i < sums.size(); ++i) {
        for (double d : logit[i]) m[i] += std::exp(d - mx);
        z += m[i];
      }
      for (size_t i = 0; i < sums.size(); ++i) score[i] += h.weight * m[i] / z / T;
    }
  }
  return score;
}

TEST(TokenIndex, SearchMatchesDefinitionWithHeadsMarginalisationAndNullQuery) {
  std::mt19937 rng(11);
  ModelSpec spec = Spec(6, 4, 2, 16);
  for (auto& l : spec.layers) l.rope.theta = 10000.0;
  const std::vector<int> layers = {4, 1};  // caller's order, not sorted
  IndexOptions o;
  o.score = ScoreKind::kTokens;
  o.layers = layers;
  o.heads = {{1, 0, 1.0f}, {4, 3, 0.5f}, {4, 1, 2.0f}};
  o.rope_marginal_min = 10;
  o.rope_marginal_max = 400;
  o.num_threads = 2;
  auto idx = LatentIndex::Create(spec, o);
  ASSERT_TRUE(idx.ok()) << idx.status().ToString();
  std::vector<KeySummary> sums;
  for (int i = 0; i < 12; ++i) {
    const int T = 1 + i % 6;
    auto k = RandomKeys(rng, 6, 2, T, 16);
    auto s = KeySummary::FromKeys(k.data(), DType::kF32, 6, 2, T, 16, {}, std::vector<int>{1, 4});
    ASSERT_TRUE(s.ok());
    IndexEntry e;
    e.key = Hash128{static_cast<uint64_t>(i + 1), 7};
    e.turn = i;
    e.time_us = i;
    e.num_tokens = T;
    ASSERT_TRUE((*idx)->Add(e, *s).ok());
    sums.push_back(*s);
  }
  EXPECT_GT((*idx)->TokenKeyBytes(), 0u);
  // Query weights: attention scale x mean of cos(omega * delta) over [10, 400].
  std::vector<std::vector<float>> qw;
  for (int l : layers) {
    auto f = ComputeRopeFrequencies(spec.layers[l].rope, 16);
    ASSERT_TRUE(f.ok());
    std::vector<float> w(16);
    for (int i = 0; i < 8; ++i) {
      const double om = f->inv_freq[i];
      const double m = (std::sin(om * 400) - std::sin(om * 10)) / (om * 390);
      w[i] = w[i + 8] = static_cast<float>(spec.EffectiveAttnScale() * m);
    }
    qw.push_back(w);
  }
  const int T = 5;
  const std::vector<float> q = RandomQuery(rng, 2, 4, T, 16);
  QueryView qv{q.data(), DType::kF32, 2, 4, T, 16};
  SearchRequest r;
  r.top_k = 12;
  auto hits = (*idx)->Search(qv, r);
  ASSERT_TRUE(hits.ok()) << hits.status().ToString();
  const auto ref = Reference(spec, layers, sums, q, T, o.heads, qw);
  ASSERT_EQ(hits->size(), 12u);
  for (const Hit& h : *hits) EXPECT_NEAR(h.score, ref[h.entry.turn], 1e-5) << h.entry.turn;

  // Null query: its score is subtracted per candidate.
  const std::vector<float> nq = RandomQuery(rng, 2, 4, 3, 16);
  ASSERT_TRUE((*idx)->SetNullQuery(QueryView{nq.data(), DType::kF32, 2, 4, 3, 16}).ok());
  EXPECT_TRUE((*idx)->has_null_query());
  const auto base = Reference(spec, layers, sums, nq, 3, o.heads, qw);
  hits = (*idx)->Search(qv, r);
  ASSERT_TRUE(hits.ok());
  for (const Hit& h : *hits) EXPECT_NEAR(h.score, ref[h.entry.turn] - base[h.entry.turn], 1e-5);
  ASSERT_TRUE((*idx)->SetNullQuery(QueryView{}).ok());
  EXPECT_FALSE((*idx)->has_null_query());

  // Removal keeps each remaining segment's token keys.
  ASSERT_TRUE((*idx)->Remove(Hash128{3, 7}).ok());
  hits = (*idx)->Search(qv, r);
  ASSERT_TRUE(hits.ok());
  std::vector<KeySummary> rest;
  std::vector<int> turns;
  for (int i = 0; i < 12; ++i) {
    if (i != 2) {
      rest.push_back(sums[i]);
      turns.push_back(i);
    }
  }
  const auto ref2 = Reference(spec, layers, rest, q, T, o.heads, qw);
  ASSERT_EQ(hits->size(), 11u);
  for (const Hit& h : *hits) {
    const size_t j = std::find(turns.begin(), turns.end(), h.entry.turn) - turns.begin();
    EXPECT_NEAR(h.score, ref2[j], 1e-5);
  }
}

TEST(TokenIndex, RejectsBadOptionsAndSummariesWithoutTokenKeys) {
  ModelSpec spec = Spec(4, 4, 2, 8);
  IndexOptions o;
  o.score = ScoreKind::kTokens;
  o.layers = {1, 2};
  o.heads = {{3, 0, 1.0f}};  // not an index layer
  EXPECT_EQ(LatentIndex::Create(spec, o).status().code(), StatusCode::kInvalidArgument);
  o.heads = {{1, 4, 1.0f}};  // q_head out of range
  EXPECT_EQ(LatentIndex::Create(spec, o).status().code(), StatusCode::kInvalidArgument);
  o.heads = {{1, 0, 1.0f}, {1, 0, 2.0f}};
  EXPECT_EQ(LatentIndex::Create(spec, o).status().code(), StatusCode::kInvalidArgument);
  o.heads = {};
  o.rope_marginal_min = 5;
  o.rope_marginal_max = 5;
  EXPECT_EQ(LatentIndex::Create(spec, o).status().code(), StatusCode::kInvalidArgument);
  IndexOptions m;
  m.heads = {{1, 0, 1.0f}};  // heads on a mean-key index
  EXPECT_EQ(LatentIndex::Create(spec, m).status().code(), StatusCode::kInvalidArgument);
  o.rope_marginal_min = 0;
  o.rope_marginal_max = 0;
  auto idx = LatentIndex::Create(spec, o);
  ASSERT_TRUE(idx.ok());
  std::mt19937 rng(2);
  auto k = RandomKeys(rng, 4, 2, 3, 8);
  auto plain = KeySummary::FromKeys(k.data(), DType::kF32, 4, 2, 3, 8);
  IndexEntry e;
  e.key = Hash128{1, 1};
  EXPECT_EQ((*idx)->Add(e, *plain).code(), StatusCode::kInvalidArgument);
  auto partial = KeySummary::FromKeys(k.data(), DType::kF32, 4, 2, 3, 8, {}, std::vector<int>{1});
  EXPECT_EQ((*idx)->Add(e, *partial).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*idx)->size(), 0u);
  std::vector<float> bad(2 * 4 * 2 * 8, 0.0f);
  EXPECT_EQ((*idx)->SetNullQuery(QueryView{bad.data(), DType::kF32, 3, 4, 2, 8}).code(), StatusCode::kInvalidArgument);
  auto mean_idx = LatentIndex::Create(spec, IndexOptions{});
  EXPECT_EQ((*mean_idx)->SetNullQuery(QueryView{bad.data(), DType::kF32, 2, 4, 2, 8}).code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvagent
