#include "kvagent/rope.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "rope/rope_reference.h"

namespace kvagent {
namespace {

using testing::ReferenceInvFreq;
using testing::ReferenceRotate;

RopeSpec MakeSpec(RopeScaling scaling, RopeStyle style, int rotary_dim) {
  RopeSpec s;
  s.theta = 500000.0;
  s.style = style;
  s.rotary_dim = rotary_dim;
  s.scaling = scaling;
  switch (scaling) {
    case RopeScaling::kNone:
      s.theta = 10000.0;
      break;
    case RopeScaling::kLinear:
      s.factor = 8.0;
      s.theta = 1e6;
      break;
    case RopeScaling::kLlama3:
      s.factor = 8.0;
      s.low_freq_factor = 1.0;
      s.high_freq_factor = 4.0;
      s.original_max_position = 8192;
      break;
    case RopeScaling::kYarn:
      s.theta = 1e6;
      s.factor = 4.0;
      s.original_max_position = 32768;
      s.beta_fast = 32;
      s.beta_slow = 1;
      break;
    case RopeScaling::kDynamicNtk:
      s.theta = 10000.0;
      s.factor = 2.0;
      s.original_max_position = 4096;
      s.dynamic_max_position = 20000;
      break;
  }
  return s;
}

constexpr RopeScaling kAllScalings[] = {RopeScaling::kNone, RopeScaling::kLinear, RopeScaling::kLlama3,
                                        RopeScaling::kYarn, RopeScaling::kDynamicNtk};
constexpr RopeStyle kStyles[] = {RopeStyle::kHalfSplit, RopeStyle::kInterleaved};
constexpr int kHeadDims[] = {64, 80, 128, 256};

std::vector<float> RandomValues(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

std::vector<int64_t> RandomPositions(int tokens, uint32_t seed, int64_t max_pos) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> d(0, max_pos);
  std::vector<int64_t> p(static_cast<size_t>(tokens));
  for (auto& x : p) x = d(rng);
  if (tokens > 1) p[1] = max_pos;  // always include the extreme
  return p;
}

// Values rounded through `t` so the f32 path and the f16/bf16 path see the same inputs.
std::vector<float> RoundedThrough(const std::vector<float>& v, DType t) {
  std::vector<float> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    r[i] = t == DType::kBF16 ? BF16ToF32(F32ToBF16(v[i])) : t == DType::kF16 ? F16ToF32(F32ToF16(v[i])) : v[i];
  }
  return r;
}

std::vector<uint16_t> Narrow(const std::vector<float>& v, DType t) {
  std::vector<uint16_t> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = t == DType::kBF16 ? F32ToBF16(v[i]) : F32ToF16(v[i]);
  return r;
}

double RowNorm(const float* x, int dim) {
  double s = 0;
  for (int j = 0; j < dim; ++j) s += static_cast<double>(x[j]) * x[j];
  return std::sqrt(s);
}

TEST(RopeFrequencies, MatchDoubleFormulasForEveryScaling) {
  for (RopeScaling sc : kAllScalings) {
    for (int dim : kHeadDims) {
      for (int rot : {0, dim / 2}) {
        RopeSpec s = MakeSpec(sc, RopeStyle::kHalfSplit, rot);
        auto f = ComputeRopeFrequencies(s, dim);
        ASSERT_TRUE(f.ok()) << f.status().ToString();
        std::vector<double> ref = ReferenceInvFreq(s, dim);
        ASSERT_EQ(f->inv_freq.size(), ref.size());
        // HF's fp32 pipeline rounds the exponent 2i/dim to float; pow amplifies that relative
        // error by ln(base) (base up to ~1e6 here, dynamic NTK raises it a little).
        const double rel = 4e-7 * (1.0 + std::log(s.theta * 4));
        for (size_t i = 0; i < ref.size(); ++i) {
          EXPECT_NEAR(f->inv_freq[i], ref[i], rel * ref[i]) << RopeTypeName(sc) << " dim " << dim << " i " << i;
        }
      }
    }
  }
}

TEST(RopeFrequencies, AttentionFactorOnlyForYarn) {
  RopeSpec y = MakeSpec(RopeScaling::kYarn, RopeStyle::kHalfSplit, 0);
  EXPECT_DOUBLE_EQ(RopeAttentionFactor(y), 0.1 * std::log(4.0) + 1.0);
  y.attention_factor = 1.25;
  EXPECT_DOUBLE_EQ(RopeAttentionFactor(y), 1.25);
  y.attention_factor = 0;
  y.factor = 1.0;
  EXPECT_DOUBLE_EQ(RopeAttentionFactor(y), 1.0);
  EXPECT_DOUBLE_EQ(RopeAttentionFactor(MakeSpec(RopeScaling::kLinear, RopeStyle::kHalfSplit, 0)), 1.0);
}

// Forward rotation over the grid, every dtype, against the double reference; the f16/bf16
// outputs must be exactly the storage-dtype rounding of the f32 computation on the same inputs.
TEST(RopeApply, MatchesReferenceOverGrid) {
  const int heads = 3;
  uint32_t seed = 1;
  for (RopeScaling sc : kAllScalings) {
    for (RopeStyle style : kStyles) {
      for (int dim : kHeadDims) {
        for (int rot : {0, dim / 4 * 2 == dim ? dim - 2 : dim / 4 * 2}) {
          for (int tokens : {1, 7, 33}) {
            RopeSpec s = MakeSpec(sc, style, rot);
            auto f = ComputeRopeFrequencies(s, dim);
            ASSERT_TRUE(f.ok());
            const size_t n = static_cast<size_t>(heads) * tokens * dim;
            std::vector<float> x = RandomValues(n, ++seed);
            std::vector<int64_t> pos = RandomPositions(tokens, seed, 1'000'000);
            for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
              std::vector<float> xin = RoundedThrough(x, dt);
              std::vector<float> y32(n);
              auto in = RopeTensorView::Dense(xin.data(), DType::kF32, heads, tokens, dim);
              auto out = RopeTensorView::Dense(y32.data(), DType::kF32, heads, tokens, dim);
              ASSERT_TRUE(RopeApply(s, dim, in, out, pos, RopeDirection::kForward).ok());
              for (int h = 0; h < heads; ++h) {
                for (int t = 0; t < tokens; ++t) {
                  const size_t off = (static_cast<size_t>(h) * tokens + t) * dim;
                  std::vector<double> row(xin.begin() + off, xin.begin() + off + dim);
                  std::vector<double> ref =
                      ReferenceRotate(row, f->inv_freq, style, pos[t], f->attention_factor, false);
                  const double tol = 1e-6 * RowNorm(&xin[off], dim) * f->attention_factor;
                  for (int j = 0; j < dim; ++j) {
                    ASSERT_NEAR(y32[off + j], ref[j], tol) << RopeTypeName(sc) << " style " << int(style) << " dim "
                                                           << dim << " rot " << rot << " j " << j;
                  }
                }
              }
              if (dt == DType::kF32) continue;
              std::vector<uint16_t> xs = Narrow(x, dt);
              std::vector<uint16_t> ys(n);
              auto in16 = RopeTensorView::Dense(xs.data(), dt, heads, tokens, dim);
              auto out16 = RopeTensorView::Dense(ys.data(), dt, heads, tokens, dim);
              ASSERT_TRUE(RopeApply(s, dim, in16, out16, pos, RopeDirection::kForward).ok());
              std::vector<uint16_t> expect = Narrow(y32, dt);
              ASSERT_EQ(ys, expect) << DTypeName(dt) << " " << RopeTypeName(sc) << " dim " << dim;
            }
          }
        }
      }
    }
  }
}

TEST(RopeApply, RoundTripsAndRepositionEqualsDirectRotation) {
  const int heads = 2;
  uint32_t seed = 100;
  for (RopeScaling sc : kAllScalings) {
    for (RopeStyle style : kStyles) {
      for (int dim : kHeadDims) {
        const int tokens = 31;
        RopeSpec s = MakeSpec(sc, style, sc == RopeScaling::kLinear ? dim / 2 : 0);
        const size_t n = static_cast<size_t>(heads) * tokens * dim;
        std::vector<float> pre = RandomValues(n, ++seed);
        std::vector<int64_t> from = RandomPositions(tokens, seed, 1'000'000);
        std::vector<int64_t> to = RandomPositions(tokens, seed + 7, 1'000'000);
        auto view = [&](std::vector<float>& v) {
          return RopeTensorView::Dense(v.data(), DType::kF32, heads, tokens, dim);
        };
        std::vector<float> post_from(n), post_to(n), moved(n), back(n), again(n);
        ASSERT_TRUE(RopeApply(s, dim, view(pre), view(post_from), from, RopeDirection::kForward).ok());
        ASSERT_TRUE(RopeApply(s, dim, view(pre), view(post_to), to, RopeDirection::kForward).ok());
        ASSERT_TRUE(RopeReposition(s, dim, view(post_from), view(moved), from, to).ok());
        ASSERT_TRUE(RopeApply(s, dim, view(post_from), view(back), from, RopeDirection::kInverse).ok());
        ASSERT_TRUE(RopeApply(s, dim, view(back), view(again), from, RopeDirection::kForward).ok());
        const double a = RopeAttentionFactor(s);
        for (size_t r = 0; r < n / dim; ++r) {
          const double norm = RowNorm(&pre[r * dim], dim);
          for (int j = 0; j < dim; ++j) {
            const size_t i = r * dim + j;
            ASSERT_NEAR(back[i], pre[i], 2e-6 * norm) << "pre->post->pre " << RopeTypeName(sc);
            ASSERT_NEAR(again[i], post_from[i], 3e-6 * norm * a) << "post->pre->post " << RopeTypeName(sc);
            ASSERT_NEAR(moved[i], post_to[i], 3e-6 * norm * a) << "reposition " << RopeTypeName(sc);
          }
        }
      }
    }
  }
}

TEST(RopeApply, YarnAttentionFactorAppliedOnce) {
  RopeSpec s = MakeSpec(RopeScaling::kYarn, RopeStyle::kHalfSplit, 0);
  s.attention_factor = 1.5;
  const int dim = 64, tokens = 5;
  std::vector<float> x = RandomValues(static_cast<size_t>(tokens) * dim, 3), y(x.size()), z(x.size());
  std::vector<int64_t> p = {0, 1, 2, 1000, 999999};
  std::vector<int64_t> q = {5, 5, 5, 5, 5};
  auto v = [&](std::vector<float>& b) { return RopeTensorView::Dense(b.data(), DType::kF32, 1, tokens, dim); };
  ASSERT_TRUE(RopeApply(s, dim, v(x), v(y), p, RopeDirection::kForward).ok());
  ASSERT_TRUE(RopeReposition(s, dim, v(y), v(z), p, q).ok());
  for (int t = 0; t < tokens; ++t) {
    const double nx = RowNorm(&x[static_cast<size_t>(t) * dim], dim);
    EXPECT_NEAR(RowNorm(&y[static_cast<size_t>(t) * dim], dim), 1.5 * nx, 1e-5 * nx);  // forward: factor once
    EXPECT_NEAR(RowNorm(&z[static_cast<size_t>(t) * dim], dim), 1.5 * nx, 1e-5 * nx);  // reposition: unchanged
  }
  // Position 0: forward is exactly the scale.
  for (int j = 0; j < dim; ++j) EXPECT_FLOAT_EQ(y[j], static_cast<float>(x[j] * 1.5));
}

TEST(RopeApply, ExactAtLargePositions) {
  // At p = 1M the angle of the fastest frequency is 1e6 rad: float32 angles would be off by
  // ~0.03 rad; ours match the double reference.
  RopeSpec s = MakeSpec(RopeScaling::kNone, RopeStyle::kHalfSplit, 0);
  const int dim = 128;
  std::vector<float> x(dim, 0.0f), y(dim);
  x[0] = 1.0f;  // picks cos/sin of frequency 0 (inv_freq 1)
  for (int64_t p : {int64_t{1'000'000}, int64_t{999'983}, int64_t{(1 << 29) - 1}}) {
    std::vector<int64_t> pos = {p};
    ASSERT_TRUE(RopeApply(s, dim, RopeTensorView::Dense(x.data(), DType::kF32, 1, 1, dim),
                          RopeTensorView::Dense(y.data(), DType::kF32, 1, 1, dim), pos, RopeDirection::kForward)
                    .ok());
    EXPECT_NEAR(y[0], std::cos(static_cast<double>(p)), 1e-7);
    EXPECT_NEAR(y[dim / 2], std::sin(static_cast<double>(p)), 1e-7);
  }
}

TEST(RopeApply, InPlaceStridedAndThreadedAgreeWithDense) {
  RopeSpec s = MakeSpec(RopeScaling::kLlama3, RopeStyle::kHalfSplit, 0);
  const int heads = 8, tokens = 1537, dim = 128;
  const size_t n = static_cast<size_t>(heads) * tokens * dim;
  std::vector<float> x = RandomValues(n, 9), dense(n), threaded(n);
  std::vector<int64_t> pos = RandomPositions(tokens, 9, 200000);
  auto d = [&](std::vector<float>& b) { return RopeTensorView::Dense(b.data(), DType::kF32, heads, tokens, dim); };
  ASSERT_TRUE(RopeApply(s, dim, d(x), d(dense), pos, RopeDirection::kForward, RopeOptions{1}).ok());
  ASSERT_TRUE(RopeApply(s, dim, d(x), d(threaded), pos, RopeDirection::kForward, RopeOptions{4}).ok());
  EXPECT_EQ(dense, threaded);
  // Token-major storage [tokens][heads][dim] seen as [heads][tokens][dim], rotated in place.
  std::vector<float> tm(n);
  for (int h = 0; h < heads; ++h)
    for (int t = 0; t < tokens; ++t)
      std::memcpy(&tm[(static_cast<size_t>(t) * heads + h) * dim], &x[(static_cast<size_t>(h) * tokens + t) * dim],
                  dim * sizeof(float));
  RopeTensorView v{tm.data(), DType::kF32, heads, tokens, dim, dim, static_cast<int64_t>(heads) * dim};
  ASSERT_TRUE(RopeApply(s, dim, v, v, pos, RopeDirection::kForward, RopeOptions{3}).ok());
  for (int h = 0; h < heads; ++h)
    for (int t = 0; t < tokens; ++t)
      ASSERT_EQ(0, std::memcmp(&tm[(static_cast<size_t>(t) * heads + h) * dim],
                               &dense[(static_cast<size_t>(h) * tokens + t) * dim], dim * sizeof(float)));
}

TEST(RopeApply, DisabledSpecCopies) {
  RopeSpec s;
  s.enabled = false;
  std::vector<float> x = RandomValues(2 * 3 * 64, 4), y(x.size());
  std::vector<int64_t> pos = {1, 2, 3};
  ASSERT_TRUE(RopeApply(s, 64, RopeTensorView::Dense(x.data(), DType::kF32, 2, 3, 64),
                        RopeTensorView::Dense(y.data(), DType::kF32, 2, 3, 64), pos, RopeDirection::kForward)
                  .ok());
  EXPECT_EQ(x, y);
}

TEST(RopeErrors, ClearMessagesAndNothingWritten) {
  const int dim = 64;
  std::vector<float> x = RandomValues(2 * dim, 5), y(x.size(), 7.0f);
  const std::vector<float> y0 = y;
  std::vector<int64_t> pos = {1, 2};
  auto in = RopeTensorView::Dense(x.data(), DType::kF32, 1, 2, dim);
  auto out = RopeTensorView::Dense(y.data(), DType::kF32, 1, 2, dim);

  RopeSpec bad_type;
  bad_type.scaling = static_cast<RopeScaling>(9);
  Status st = RopeApply(bad_type, dim, in, out, pos, RopeDirection::kForward);
  EXPECT_EQ(st.code(), StatusCode::kUnimplemented);
  EXPECT_NE(st.message().find("default, linear, llama3, yarn, dynamic"), std::string::npos) << st.message();

  RopeSpec odd;
  odd.rotary_dim = 31;
  EXPECT_EQ(RopeApply(odd, dim, in, out, pos, RopeDirection::kForward).code(), StatusCode::kInvalidArgument);
  RopeSpec wide;
  wide.rotary_dim = 66;
  EXPECT_EQ(RopeApply(wide, dim, in, out, pos, RopeDirection::kForward).code(), StatusCode::kInvalidArgument);
  RopeSpec llama;
  llama.scaling = RopeScaling::kLlama3;
  llama.factor = 8;
  llama.low_freq_factor = 4;
  llama.high_freq_factor = 1;
  EXPECT_EQ(RopeApply(llama, dim, in, out, pos, RopeDirection::kForward).code(), StatusCode::kInvalidArgument);

  RopeSpec ok;
  std::vector<int64_t> one = {1};
  EXPECT_EQ(RopeApply(ok, dim, in, out, one, RopeDirection::kForward).code(), StatusCode::kInvalidArgument);
  std::vector<int64_t> huge = {1, int64_t{1} << 40};
  EXPECT_EQ(RopeApply(ok, dim, in, out, huge, RopeDirection::kForward).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(RopeApply(ok, 80, in, out, pos, RopeDirection::kForward).code(), StatusCode::kInvalidArgument);
  auto i8 = in;
  i8.dtype = DType::kI8;
  EXPECT_EQ(RopeApply(ok, dim, i8, out, pos, RopeDirection::kForward).code(), StatusCode::kInvalidArgument);
  auto overlap = out;
  overlap.token_stride = dim / 2;
  EXPECT_EQ(RopeApply(ok, dim, in, overlap, pos, RopeDirection::kForward).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(RopeReposition(ok, dim, in, out, pos, one).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(y, y0);
}

TEST(RopeTypes, SupportedList) {
  auto types = SupportedRopeTypes();
  ASSERT_EQ(types.size(), 5u);
  EXPECT_EQ(types[0], "default");
  EXPECT_EQ(RopeTypeName(RopeScaling::kYarn), "yarn");
  EXPECT_EQ(RopeTypeName(RopeScaling::kDynamicNtk), "dynamic");
}

}  // namespace
}  // namespace kvagent

namespace kvagent {
namespace {

// The bf16 store path must round exactly like F32ToBF16 for special values too.
TEST(RopeApply, Bf16SpecialValuesRoundLikeDtypeH) {
  const int dim = 64, tokens = 4;
  std::vector<uint16_t> x(static_cast<size_t>(tokens) * dim);
  std::mt19937 rng(5);
  const uint16_t specials[] = {0x7f80, 0xff80, 0x7fc0, 0x7f81, 0xffc1, 0x7f7f, 0xff7f, 0x0001, 0x8001, 0x0000, 0x8000};
  for (size_t i = 0; i < x.size(); ++i) x[i] = i % 3 == 0 ? specials[rng() % std::size(specials)] : rng() & 0xffff;
  std::vector<float> wide(x.size()), y32(x.size());
  for (size_t i = 0; i < x.size(); ++i) wide[i] = BF16ToF32(x[i]);
  std::vector<uint16_t> y(x.size());
  std::vector<int64_t> pos = {1, 17, 12345, 999999};
  RopeSpec s;
  ASSERT_TRUE(RopeApply(s, dim, RopeTensorView::Dense(wide.data(), DType::kF32, 1, tokens, dim),
                        RopeTensorView::Dense(y32.data(), DType::kF32, 1, tokens, dim), pos, RopeDirection::kForward)
                  .ok());
  ASSERT_TRUE(RopeApply(s, dim, RopeTensorView::Dense(x.data(), DType::kBF16, 1, tokens, dim),
                        RopeTensorView::Dense(y.data(), DType::kBF16, 1, tokens, dim), pos, RopeDirection::kForward)
                  .ok());
  for (size_t i = 0; i < y.size(); ++i) ASSERT_EQ(y[i], F32ToBF16(y32[i])) << i << " " << y32[i];
}

}  // namespace
}  // namespace kvagent

namespace kvagent {
namespace {

// Repeated positions reuse a cos/sin row; results must equal token-by-token rotation.
TEST(RopeApply, RepeatedPositionsMatchSingleTokenCalls) {
  RopeSpec s;
  s.scaling = RopeScaling::kYarn;
  s.factor = 4;
  s.original_max_position = 4096;
  const int dim = 80, tokens = 7;
  std::vector<float> x(static_cast<size_t>(tokens) * dim), y(x.size());
  std::mt19937 rng(8);
  std::normal_distribution<float> d;
  for (float& v : x) v = d(rng);
  const std::vector<int64_t> pos = {7, 7, 7, 9, 9, 123456, 7};
  ASSERT_TRUE(RopeApply(s, dim, RopeTensorView::Dense(x.data(), DType::kF32, 1, tokens, dim),
                        RopeTensorView::Dense(y.data(), DType::kF32, 1, tokens, dim), pos, RopeDirection::kForward)
                  .ok());
  for (int t = 0; t < tokens; ++t) {
    std::vector<float> one(dim);
    std::vector<int64_t> p = {pos[t]};
    ASSERT_TRUE(RopeApply(s, dim, RopeTensorView::Dense(&x[static_cast<size_t>(t) * dim], DType::kF32, 1, 1, dim),
                          RopeTensorView::Dense(one.data(), DType::kF32, 1, 1, dim), p, RopeDirection::kForward)
                    .ok());
    ASSERT_EQ(0, std::memcmp(one.data(), &y[static_cast<size_t>(t) * dim], dim * sizeof(float))) << t;
  }
}

}  // namespace
}  // namespace kvagent
