#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "kvagent/rope.h"

namespace kvagent {
namespace {

// Layer 0: default theta 1e4; layer 1: no RoPE; layer 2: local theta 1e4 again (shares the
// table with layer 0); layer 3: global linear x8 at theta 1e6 (Gemma 3 style).
ModelSpec MixedSpec(DType dtype) {
  RopeSpec local;
  local.theta = 10000;
  RopeSpec none;
  none.enabled = false;
  RopeSpec global;
  global.theta = 1e6;
  global.scaling = RopeScaling::kLinear;
  global.factor = 8;
  ModelSpec m = UniformModelSpec("mixed", 4, 4, 2, 80, dtype, local, Hash128{});
  m.layers[1].rope = none;
  m.layers[3].rope = global;
  m.layers[2].sliding_window = 512;
  return m;
}

template <typename T>
std::vector<T> Fill(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d;
  std::vector<T> v(n);
  for (auto& x : v) {
    float f = d(rng);
    if constexpr (sizeof(T) == 4) {
      x = f;
    } else {
      x = F32ToBF16(f);
    }
  }
  return v;
}

template <typename T>
void CheckSegment(DType dtype) {
  ModelSpec m = MixedSpec(dtype);
  SegmentLayout layout = SegmentLayout::ForModel(m, 37);
  std::vector<T> payload = Fill<T>(layout.NumElements(), 11);
  const std::vector<T> original = payload;
  std::vector<int64_t> pos(37), to(37);
  for (int t = 0; t < 37; ++t) {
    pos[t] = 1000 + t;
    to[t] = 900000 + 3 * t;
  }
  auto bytes = std::as_writable_bytes(std::span(payload));
  ASSERT_TRUE(RotateSegmentKeys(m, layout, bytes, pos).ok());

  for (int l = 0; l < m.num_layers; ++l) {
    for (int h = 0; h < layout.num_kv_heads; ++h) {
      // Each K plane equals a direct RopeApply of the original plane with the layer's spec.
      std::vector<T> expect(layout.PlaneElements());
      auto in = RopeTensorView::Dense(const_cast<T*>(&original[layout.Offset(l, 0, h, 0)]), dtype, 1, 37, 80);
      auto out = RopeTensorView::Dense(expect.data(), dtype, 1, 37, 80);
      ASSERT_TRUE(RopeApply(m.layers[l].rope, 80, in, out, pos, RopeDirection::kForward).ok());
      ASSERT_EQ(0, std::memcmp(expect.data(), &payload[layout.Offset(l, 0, h, 0)], expect.size() * sizeof(T)))
          << "layer " << l << " head " << h;
      // V untouched.
      ASSERT_EQ(0, std::memcmp(&original[layout.Offset(l, 1, h, 0)], &payload[layout.Offset(l, 1, h, 0)],
                               layout.PlaneElements() * sizeof(T)));
    }
  }
  // Disabled layer untouched.
  EXPECT_EQ(0, std::memcmp(&original[layout.Offset(1, 0, 0, 0)], &payload[layout.Offset(1, 0, 0, 0)],
                           2 * layout.num_kv_heads * layout.PlaneElements() * sizeof(T)));

  // Reposition equals unrotate + rotate at the new positions (within one storage rounding).
  std::vector<T> moved = payload;
  ASSERT_TRUE(RepositionSegmentKeys(m, layout, std::as_writable_bytes(std::span(moved)), pos, to).ok());
  std::vector<T> direct = original;
  ASSERT_TRUE(RotateSegmentKeys(m, layout, std::as_writable_bytes(std::span(direct)), to).ok());
  ASSERT_TRUE(UnrotateSegmentKeys(m, layout, bytes, pos).ok());
  for (size_t i = 0; i < payload.size(); ++i) {
    float a, b, c, o;
    if constexpr (sizeof(T) == 4) {
      a = moved[i], b = direct[i], c = payload[i], o = original[i];
    } else {
      a = BF16ToF32(moved[i]), b = BF16ToF32(direct[i]), c = BF16ToF32(payload[i]), o = BF16ToF32(original[i]);
    }
    const float tol = sizeof(T) == 4 ? 2e-5f : 0.03f;
    ASSERT_NEAR(a, b, tol) << i;
    ASSERT_NEAR(c, o, tol) << i;
  }
}

TEST(RopeSegment, F32PerLayerSpecsKOnly) { CheckSegment<float>(DType::kF32); }
TEST(RopeSegment, BF16PerLayerSpecsKOnly) { CheckSegment<uint16_t>(DType::kBF16); }

TEST(RopeSegment, RejectsMismatchesWithoutWriting) {
  ModelSpec m = MixedSpec(DType::kF32);
  SegmentLayout layout = SegmentLayout::ForModel(m, 5);
  std::vector<float> payload(layout.NumElements(), 1.0f);
  auto bytes = std::as_writable_bytes(std::span(payload));
  std::vector<int64_t> pos = {0, 1, 2, 3};
  EXPECT_EQ(RotateSegmentKeys(m, layout, bytes, pos).code(), StatusCode::kInvalidArgument);
  std::vector<int64_t> pos5 = {0, 1, 2, 3, 4};
  SegmentLayout wrong = layout;
  wrong.head_dim = 64;
  EXPECT_EQ(RotateSegmentKeys(m, wrong, bytes, pos5).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(RotateSegmentKeys(m, layout, bytes.subspan(4), pos5).code(), StatusCode::kInvalidArgument);
  m.layers[3].rope.rotary_dim = 81;
  Status st = RotateSegmentKeys(m, layout, bytes, pos5);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("layer 3"), std::string::npos) << st.message();
  for (float v : payload) ASSERT_EQ(v, 1.0f);
}

}  // namespace
}  // namespace kvagent
