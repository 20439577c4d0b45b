#include "kvagent/dtype.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>

namespace kvagent {
namespace {

TEST(DType, Names) {
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  EXPECT_EQ(*DTypeFromName("bfloat16"), DType::kBF16);
  EXPECT_FALSE(DTypeFromName("f64").ok());
}

TEST(DType, HalfRoundTripsEveryF16Value) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    float f = F16ToF32(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(F16ToF32(F32ToF16(f))));
      continue;
    }
    EXPECT_EQ(F32ToF16(f), static_cast<uint16_t>(h)) << h;
  }
}

TEST(DType, BF16RoundTripsEveryValue) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    float f = BF16ToF32(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    EXPECT_EQ(F32ToBF16(f), static_cast<uint16_t>(h)) << h;
  }
}

TEST(DType, RoundToNearestEven) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-1000.f, 1000.f);
  for (int i = 0; i < 100000; ++i) {
    float f = dist(rng);
    float h = F16ToF32(F32ToF16(f));
    float b = BF16ToF32(F32ToBF16(f));
    EXPECT_LE(std::fabs(h - f), std::fabs(f) * (1.0f / 2048) + 1e-7f);
    EXPECT_LE(std::fabs(b - f), std::fabs(f) * (1.0f / 256));
  }
  EXPECT_EQ(F16ToF32(F32ToF16(1e6f)), std::numeric_limits<float>::infinity());
  EXPECT_EQ(F16ToF32(F32ToF16(65504.f)), 65504.f);
}

}  // namespace
}  // namespace kvagent
