#include "index/score_kernel.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kvagent/dtype.h"

namespace kvagent::index_internal {
namespace {

TEST(ScoreKernel, VectorisedMatchesScalar) {
  std::mt19937 rng(5);
  std::normal_distribution<float> n;
  for (int w : {8, 16, 24, 128, 256, 512}) {
    for (int nq : {1, 3, 4, 5, 8, 13}) {
      std::vector<float> q(static_cast<size_t>(nq) * w), row(w), a(nq), b(nq);
      std::vector<uint16_t> row16(w);
      for (auto& v : q) v = n(rng);
      for (int i = 0; i < w; ++i) {
        row[i] = n(rng);
        row16[i] = F32ToF16(row[i]);
      }
      for (bool f16 : {false, true}) {
        const void* r = f16 ? static_cast<const void*>(row16.data()) : row.data();
        SelectDotRows(w)(r, f16, q.data(), nq, w, a.data());
        DotRowsScalar(r, f16, q.data(), nq, w, b.data());
        for (int j = 0; j < nq; ++j) EXPECT_NEAR(a[j], b[j], 1e-4 * std::sqrt(w)) << w << " " << nq << " " << f16;
      }
    }
  }
}

TEST(ScoreKernel, TwoRowsMatchScalarAndEachOther) {
  std::mt19937 rng(7);
  std::normal_distribution<float> n;
  for (int w : {8, 16, 24, 128, 256, 12}) {
    for (int nq : {1, 2, 3, 4, 5, 8, 13, 30}) {
      std::vector<float> q(static_cast<size_t>(nq) * w), a(w), b(w);
      std::vector<uint16_t> a16(w), b16(w);
      for (auto& v : q) v = n(rng);
      for (int i = 0; i < w; ++i) {
        a[i] = n(rng);
        b[i] = n(rng);
        a16[i] = F32ToF16(a[i]);
        b16[i] = F32ToF16(b[i]);
      }
      for (bool f16 : {false, true}) {
        const void* ra = f16 ? static_cast<const void*>(a16.data()) : a.data();
        const void* rb = f16 ? static_cast<const void*>(b16.data()) : b.data();
        std::vector<float> oa(nq), ob(nq), sa(nq), sb(nq), ba(nq), aa(nq), aa2(nq);
        SelectDotRows2(w)(ra, rb, f16, q.data(), nq, w, oa.data(), ob.data());
        DotRowsScalar(ra, f16, q.data(), nq, w, sa.data());
        DotRowsScalar(rb, f16, q.data(), nq, w, sb.data());
        for (int j = 0; j < nq; ++j) {
          EXPECT_NEAR(oa[j], sa[j], 1e-4 * std::sqrt(w)) << w << " " << nq << " " << f16;
          EXPECT_NEAR(ob[j], sb[j], 1e-4 * std::sqrt(w)) << w << " " << nq << " " << f16;
        }
        // A row's result does not depend on its partner or its position (bit for bit).
        SelectDotRows2(w)(rb, ra, f16, q.data(), nq, w, ba.data(), aa.data());
        SelectDotRows2(w)(ra, ra, f16, q.data(), nq, w, aa2.data(), ba.data());
        EXPECT_EQ(aa, oa);
        EXPECT_EQ(aa2, oa);
      }
    }
  }
}

TEST(ScoreKernel, ExpShifted) {
  std::vector<float> x, shift;
  for (int i = 0; i < 2003; ++i) {
    x.push_back(-100.0f + 0.05f * i);
    shift.push_back(0.001f * (i % 7));
  }
  std::vector<float> y = x;
  ExpShifted(y.data(), shift.data(), y.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double want = std::exp(static_cast<double>(x[i] - shift[i]));
    if (x[i] - shift[i] < -86.9) {
      EXPECT_LE(y[i], 2e-38);
    } else {
      EXPECT_NEAR(y[i], want, 1e-6 * want + 1e-38) << x[i];
    }
  }
}

}  // namespace
}  // namespace kvagent::index_internal

namespace kvagent::index_internal {
namespace {

TEST(ScoreKernel, ToF16DirectedRounding) {
  std::mt19937 rng(6);
  std::normal_distribution<float> n(0.0f, 30.0f);
  std::vector<float> src;
  for (int i = 0; i < 1001; ++i) src.push_back(i % 50 == 0 ? 0.0f : n(rng) * (i % 3 ? 1.0f : 1e-6f));
  src.push_back(65504.0f);
  src.push_back(-65504.0f);
  std::vector<uint16_t> lo(src.size()), hi(src.size()), nearest(src.size());
  ToF16(src.data(), lo.data(), src.size(), -1);
  ToF16(src.data(), hi.data(), src.size(), +1);
  ToF16(src.data(), nearest.data(), src.size(), 0);
  for (size_t i = 0; i < src.size(); ++i) {
    EXPECT_LE(F16ToF32(lo[i]), src[i]);
    EXPECT_GE(F16ToF32(hi[i]), src[i]);
    EXPECT_EQ(nearest[i], F32ToF16(src[i])) << src[i];
    // Adjacent or equal representable values.
    EXPECT_LE(F16ToF32(hi[i]) - F16ToF32(lo[i]), std::fabs(src[i]) * 1e-3f + 6e-8f) << src[i];
  }
}

}  // namespace
}  // namespace kvagent::index_internal
