#include "segment_glue.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

namespace kvagent::py {
namespace {

// A source array of `shape` stored with dimension order `perm` (outermost first), each
// dimension padded by `pad` elements; returns the strides (elements) and fills `mem`.
std::vector<int64_t> StridesFor(const std::vector<int64_t>& shape, const std::vector<int>& perm, int pad) {
  std::vector<int64_t> strides(shape.size());
  int64_t acc = 1;
  for (size_t i = perm.size(); i-- > 0;) {
    strides[perm[i]] = acc;
    acc *= shape[perm[i]] + pad;
  }
  return strides;
}

int64_t Extent(const std::vector<int64_t>& shape, const std::vector<int64_t>& strides) {
  int64_t e = 1;
  for (size_t i = 0; i < shape.size(); ++i) e += (shape[i] - 1) * strides[i];
  return e;
}

// Reference: element (l, kv, h, t, d) of the canonical payload read through the strides.
float At(const std::vector<float>& mem, const std::vector<int64_t>& st, std::initializer_list<int64_t> idx) {
  int64_t off = 0;
  size_t i = 0;
  for (int64_t x : idx) off += x * st[i++];
  return mem[off];
}

TEST(SegmentGlue, KvCopyMatchesReferenceOverStridesAndSizes) {
  std::mt19937 rng(1);
  for (int L : {1, 3}) {
    for (int H : {1, 2}) {
      for (int T : {1, 5}) {
        for (int D : {1, 7}) {
          std::vector<int64_t> shape = {L, 2, H, T, D};
          std::vector<int> perm = {0, 1, 2, 3, 4};
          for (int trial = 0; trial < 6; ++trial) {
            int pad = trial % 2;
            std::vector<int64_t> st = StridesFor(shape, perm, pad);
            std::vector<float> mem(static_cast<size_t>(Extent(shape, st)));
            for (float& x : mem) x = static_cast<float>(rng() % 1000);
            ArrayRef a{reinterpret_cast<const std::byte*>(mem.data()), shape, st, DType::kF32};
            auto layout = LayoutOfKv(a);
            ASSERT_TRUE(layout.ok());
            std::vector<float> out(layout->NumElements());
            CopyKvToCanonical(a, *layout, reinterpret_cast<std::byte*>(out.data()));
            bool dense = true;  // every element sits at its canonical index
            for (int l = 0; l < L; ++l)
              for (int kv = 0; kv < 2; ++kv)
                for (int h = 0; h < H; ++h)
                  for (int t = 0; t < T; ++t)
                    for (int d = 0; d < D; ++d) {
                      size_t i = layout->Offset(l, kv, h, t) + d;
                      ASSERT_EQ(out[i], At(mem, st, {l, kv, h, t, d}));
                      int64_t off = l * st[0] + kv * st[1] + h * st[2] + t * st[3] + d * st[4];
                      dense = dense && off == static_cast<int64_t>(i);
                    }
            EXPECT_EQ(CanonicalBaseOfKv(a, *layout) != nullptr, dense) << L << H << T << D << trial;
            std::shuffle(perm.begin(), perm.end(), rng);
          }
        }
      }
    }
  }
}

TEST(SegmentGlue, KAndVCopyAndHalvesOfOneBlock) {
  const int L = 2, H = 3, T = 4, D = 5;
  std::vector<uint16_t> kv(static_cast<size_t>(L) * 2 * H * T * D);
  std::iota(kv.begin(), kv.end(), 0);
  // k = kv[:, 0], v = kv[:, 1] of a contiguous block.
  std::vector<int64_t> shape = {L, H, T, D}, st = {2 * H * T * D, T * D, D, 1};
  auto* base = reinterpret_cast<const std::byte*>(kv.data());
  ArrayRef k{base, shape, st, DType::kBF16};
  ArrayRef v{base + H * T * D * 2, shape, st, DType::kBF16};
  auto layout = LayoutOfKAndV(k, v);
  ASSERT_TRUE(layout.ok());
  EXPECT_EQ(CanonicalBaseOfKAndV(k, v, *layout), base);
  std::vector<uint16_t> out(kv.size());
  CopyKAndVToCanonical(k, v, *layout, reinterpret_cast<std::byte*>(out.data()));
  EXPECT_EQ(out, kv);
  // Swapped halves are not canonical (and copy in the swapped order).
  EXPECT_EQ(CanonicalBaseOfKAndV(v, k, *layout), nullptr);
  CopyKAndVToCanonical(v, k, *layout, reinterpret_cast<std::byte*>(out.data()));
  EXPECT_EQ(out[layout->Offset(0, 0, 0, 0)], kv[layout->Offset(0, 1, 0, 0)]);
}

TEST(SegmentGlue, ErrorsNameTheProblem) {
  EXPECT_EQ(PayloadDTypeOf({0, 32, 1}, "kv").status().message(),
            "kv has dtype int32; KV payloads must be float32, float16 or bfloat16");
  EXPECT_FALSE(PayloadDTypeOf({2, 64, 1}, "kv").ok());
  EXPECT_FALSE(PayloadDTypeOf({2, 32, 4}, "kv").ok());
  EXPECT_EQ(*PayloadDTypeOf({4, 16, 1}, "kv"), DType::kBF16);
  EXPECT_EQ(*PayloadDTypeOf({2, 16, 1}, "kv"), DType::kF16);
  float x = 0;
  auto* p = reinterpret_cast<const std::byte*>(&x);
  EXPECT_EQ(LayoutOfKv({p, {1, 3, 1, 1, 1}, {3, 1, 1, 1, 1}, DType::kF32}).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(LayoutOfKv({p, {1, 2, 0, 1, 1}, {2, 1, 1, 1, 1}, DType::kF32}).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_FALSE(
      LayoutOfKAndV({p, {1, 1, 1, 1}, {1, 1, 1, 1}, DType::kF32}, {p, {1, 1, 1, 1}, {1, 1, 1, 1}, DType::kF16}).ok());
  EXPECT_FALSE(
      LayoutOfKAndV({p, {1, 1, 1, 1}, {1, 1, 1, 1}, DType::kF32}, {p, {1, 1, 2, 1}, {2, 2, 1, 1}, DType::kF32}).ok());
}

TEST(SegmentGlue, MakeSegmentDefaultsAndValidation) {
  SegmentLayout l{1, 1, 2, 3, DType::kF32};
  SegmentFields f;
  f.tokens = {1, 2, 3};
  f.model = HashString("m");
  f.meta.ns = "a";
  f.meta.session = "s";
  f.meta.turn = 4;
  auto buf = Buffer::Allocate(l.NumBytes());
  ASSERT_TRUE(buf.ok());
  auto seg = MakeSegment(f, l, *buf);
  ASSERT_TRUE(seg.ok()) << seg.status().message();
  EXPECT_EQ((*seg)->key, MemoryKey("a", "s", 4, 0));
  EXPECT_EQ((*seg)->positions, (std::vector<int64_t>{0, 1, 2}));
  f.positions = std::vector<int64_t>{0};
  EXPECT_EQ(MakeSegment(f, l, *buf).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvagent::py
