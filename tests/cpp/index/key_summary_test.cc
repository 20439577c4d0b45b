#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "index_test_util.h"
#include "kvagent/index.h"

namespace kvagent {
namespace {

using testing_index::RandomKeys;

TEST(KeySummary, MatchesPlainMinMaxMean) {
  std::mt19937 rng(1);
  for (int D : {1, 7, 64}) {
    for (int T : {1, 3, 17}) {
      const int L = 3, H = 2;
      auto k = RandomKeys(rng, L, H, T, D);
      const std::vector<int> layers = {2, 0};
      auto s = KeySummary::FromKeys(k.data(), DType::kF32, L, H, T, D, layers);
      ASSERT_TRUE(s.ok()) << s.status().ToString();
      EXPECT_EQ(s->layers, (std::vector<int>{0, 2}));
      for (int li = 0; li < 2; ++li) {
        for (int h = 0; h < H; ++h) {
          for (int d = 0; d < D; ++d) {
            float mn = 1e30f, mx = -1e30f;
            double sum = 0;
            for (int t = 0; t < T; ++t) {
              float v = k[((static_cast<size_t>(s->layers[li]) * H + h) * T + t) * D + d];
              mn = std::min(mn, v);
              mx = std::max(mx, v);
              sum += v;
            }
            const size_t o = s->Offset(li, h) + d;
            EXPECT_EQ(s->min[o], mn);
            EXPECT_EQ(s->max[o], mx);
            EXPECT_NEAR(s->mean[o], sum / T, 1e-5);
          }
        }
      }
    }
  }
}

TEST(KeySummary, HalfInputsAndSegmentPayload) {
  std::mt19937 rng(2);
  const int L = 2, H = 2, T = 5, D = 8;
  ModelSpec spec = testing_index::Spec(L, 4, H, D);
  spec.kv_dtype = DType::kBF16;
  Segment seg;
  seg.model = spec.fingerprint;
  seg.key = MemoryKey("ns", "s", 0, 0);
  seg.layout = SegmentLayout::ForModel(spec, T);
  for (int t = 0; t < T; ++t) {
    seg.tokens.push_back(t);
    seg.positions.push_back(t);
  }
  seg.payload = Buffer::Allocate(seg.layout.NumBytes()).value();
  auto k = RandomKeys(rng, L, H, T, D);
  std::vector<uint16_t> kb(k.size());
  for (size_t i = 0; i < k.size(); ++i) kb[i] = F32ToBF16(k[i]);
  // K planes from kb, V planes filled with a huge value that must not leak into the summary.
  for (int l = 0; l < L; ++l) {
    for (int h = 0; h < H; ++h) {
      for (int t = 0; t < T; ++t) {
        for (int d = 0; d < D; ++d) {
          StoreFromF32(seg.payload->data(), DType::kBF16, seg.layout.Offset(l, 0, h, t) + d,
                       BF16ToF32(kb[((static_cast<size_t>(l) * H + h) * T + t) * D + d]));
          StoreFromF32(seg.payload->data(), DType::kBF16, seg.layout.Offset(l, 1, h, t) + d, 1e6f);
        }
      }
    }
  }
  auto from_seg = KeySummary::FromSegment(seg);
  ASSERT_TRUE(from_seg.ok()) << from_seg.status().ToString();
  auto from_keys = KeySummary::FromKeys(kb.data(), DType::kBF16, L, H, T, D);
  ASSERT_TRUE(from_keys.ok());
  EXPECT_EQ(*from_seg, *from_keys);
  seg.pre_rope = false;
  EXPECT_EQ(KeySummary::FromSegment(seg).status().code(), StatusCode::kInvalidArgument);
}

TEST(KeySummary, BadInputs) {
  std::vector<float> k(2 * 2 * 3 * 4, 0.5f);
  EXPECT_EQ(KeySummary::FromKeys(nullptr, DType::kF32, 2, 2, 3, 4).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(KeySummary::FromKeys(k.data(), DType::kI8, 2, 2, 3, 4).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(KeySummary::FromKeys(k.data(), DType::kF32, 2, 2, 0, 4).status().code(), StatusCode::kInvalidArgument);
  const std::vector<int> out_of_range = {2};
  EXPECT_EQ(KeySummary::FromKeys(k.data(), DType::kF32, 2, 2, 3, 4, out_of_range).status().code(),
            StatusCode::kInvalidArgument);
  const std::vector<int> twice = {1, 1};
  EXPECT_EQ(KeySummary::FromKeys(k.data(), DType::kF32, 2, 2, 3, 4, twice).status().code(),
            StatusCode::kInvalidArgument);
  k[5] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(KeySummary::FromKeys(k.data(), DType::kF32, 2, 2, 3, 4).status().code(), StatusCode::kInvalidArgument);
}

TEST(KeySummary, SerializeRoundTrip) {
  std::mt19937 rng(3);
  auto k = RandomKeys(rng, 3, 2, 9, 12);
  const std::vector<int> layers = {1, 2};
  KeySummary s = KeySummary::FromKeys(k.data(), DType::kF32, 3, 2, 9, 12, layers).value();
  auto back32 = KeySummary::Deserialize(s.Serialize(DType::kF32));
  ASSERT_TRUE(back32.ok()) << back32.status().ToString();
  EXPECT_EQ(*back32, s);
  const std::string b16 = s.Serialize(DType::kF16);
  EXPECT_LT(b16.size(), s.Serialize(DType::kF32).size());
  auto back16 = KeySummary::Deserialize(b16);
  ASSERT_TRUE(back16.ok()) << back16.status().ToString();
  EXPECT_EQ(back16->layers, s.layers);
  for (size_t i = 0; i < s.min.size(); ++i) {
    EXPECT_LE(back16->min[i], s.min[i]);  // rounded outward: the box still contains every key
    EXPECT_GE(back16->max[i], s.max[i]);
    EXPECT_NEAR(back16->min[i], s.min[i], 2e-3 * std::max(1.0f, std::fabs(s.min[i])));
    EXPECT_NEAR(back16->max[i], s.max[i], 2e-3 * std::max(1.0f, std::fabs(s.max[i])));
    EXPECT_NEAR(back16->mean[i], s.mean[i], 1e-3 * std::max(1.0f, std::fabs(s.mean[i])));
  }
  // Out of f16 range: falls back to f32, exact.
  KeySummary big = s;
  big.max[0] = 1e6f;
  auto back_big = KeySummary::Deserialize(big.Serialize(DType::kF16));
  ASSERT_TRUE(back_big.ok());
  EXPECT_EQ(*back_big, big);
}

TEST(KeySummary, CorruptBytesAreDataLoss) {
  std::mt19937 rng(4);
  auto k = RandomKeys(rng, 1, 1, 3, 4);
  KeySummary s = KeySummary::FromKeys(k.data(), DType::kF32, 1, 1, 3, 4).value();
  for (DType dt : {DType::kF32, DType::kF16}) {
    const std::string good = s.Serialize(dt);
    for (size_t i = 0; i < good.size(); ++i) {
      std::string bad = good;
      bad[i] ^= 0x21;
      EXPECT_EQ(KeySummary::Deserialize(bad).status().code(), StatusCode::kDataLoss) << "byte " << i;
    }
    for (size_t n = 0; n < good.size(); ++n) {
      EXPECT_EQ(KeySummary::Deserialize(good.substr(0, n)).status().code(), StatusCode::kDataLoss) << "len " << n;
    }
    EXPECT_EQ(KeySummary::Deserialize(good + "x").status().code(), StatusCode::kDataLoss);
  }
}

}  // namespace
}  // namespace kvagent
