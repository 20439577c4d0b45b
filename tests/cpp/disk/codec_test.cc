// Codec: raw is bit-exact; int8 reconstructs every element within scale/2 (plus the rounding
// of the segment dtype) on random data over a grid of dtypes and awkward shapes; sizes.
#include "kvagent/codec.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

namespace kvagent {
namespace {

std::vector<std::byte> RandomPayload(const SegmentLayout& l, uint64_t seed) {
  std::vector<std::byte> raw(l.NumBytes());
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_real_distribution<float> scale(0.01f, 50.0f);
  const size_t planes = static_cast<size_t>(l.num_layers) * 2 * l.num_kv_heads;
  for (size_t p = 0; p < planes; ++p) {
    std::vector<float> col_scale(l.head_dim);
    for (auto& c : col_scale) c = scale(rng);
    col_scale[0] = 0.0f;  // an all-zero channel (scale 0)
    for (int t = 0; t < l.num_tokens; ++t)
      for (int d = 0; d < l.head_dim; ++d)
        StoreFromF32(raw.data(), l.dtype, p * l.PlaneElements() + static_cast<size_t>(t) * l.head_dim + d,
                     nd(rng) * col_scale[d]);
  }
  return raw;
}

// Half an ulp of `v` in dtype t (the rounding of storing a decoded value).
double HalfUlp(double v, DType t) {
  int mant = t == DType::kF32 ? 23 : (t == DType::kF16 ? 10 : 7);
  if (v == 0) return 0;
  int e;
  std::frexp(v, &e);
  double ulp = std::ldexp(1.0, e - 1 - mant);
  if (t == DType::kF16) ulp = std::max(ulp, std::ldexp(1.0, -24));
  return ulp / 2;
}

TEST(CodecTest, Names) {
  EXPECT_EQ(CodecName(CodecKind::kRaw), "raw");
  EXPECT_EQ(CodecName(CodecKind::kInt8), "int8");
  EXPECT_EQ(*CodecFromName("int8"), CodecKind::kInt8);
  EXPECT_EQ(*CodecFromName("raw"), CodecKind::kRaw);
  EXPECT_EQ(CodecFromName("zstd").status().code(), StatusCode::kInvalidArgument);
}

TEST(CodecTest, GridRawExactInt8Bounded) {
  const DType dtypes[] = {DType::kF32, DType::kF16, DType::kBF16};
  const int dims[] = {64, 80, 128, 256};
  const int tokens[] = {1, 3, 17};
  const int heads[] = {1, 3};
  uint64_t seed = 1;
  for (DType dt : dtypes)
    for (int dim : dims)
      for (int tok : tokens)
        for (int h : heads) {
          SegmentLayout l{2, h, dim, tok, dt};
          SCOPED_TRACE(std::string(DTypeName(dt)) + " dim " + std::to_string(dim) + " tokens " + std::to_string(tok) +
                       " heads " + std::to_string(h));
          auto raw = RandomPayload(l, seed++);
          // raw: bit-exact, sizes
          ASSERT_EQ(EncodedSize(l, CodecKind::kRaw), l.NumBytes());
          std::vector<std::byte> enc(EncodedSize(l, CodecKind::kRaw)), dec(l.NumBytes());
          ASSERT_TRUE(EncodePayload(l, CodecKind::kRaw, raw, enc).ok());
          ASSERT_TRUE(DecodePayload(l, CodecKind::kRaw, enc, dec).ok());
          ASSERT_EQ(std::memcmp(dec.data(), raw.data(), raw.size()), 0);
          // int8: size, per-element bound against an independently computed scale
          const size_t n_scales = static_cast<size_t>(l.num_layers) * 2 * h * dim;
          ASSERT_EQ(EncodedSize(l, CodecKind::kInt8), n_scales * 4 + l.NumElements());
          enc.assign(EncodedSize(l, CodecKind::kInt8), std::byte{0});
          ASSERT_TRUE(EncodePayload(l, CodecKind::kInt8, raw, enc).ok());
          ASSERT_TRUE(DecodePayload(l, CodecKind::kInt8, enc, dec).ok());
          double max_err = 0;
          for (size_t p = 0; p < n_scales / dim; ++p)
            for (int d = 0; d < dim; ++d) {
              double amax = 0;
              for (int t = 0; t < tok; ++t)
                amax =
                    std::max<double>(amax, std::fabs(LoadAsF32(raw.data(), dt, p * l.PlaneElements() + t * dim + d)));
              const double scale = amax / 127.0;
              for (int t = 0; t < tok; ++t) {
                size_t i = p * l.PlaneElements() + static_cast<size_t>(t) * dim + d;
                double a = LoadAsF32(raw.data(), dt, i), b = LoadAsF32(dec.data(), dt, i);
                double bound = scale / 2 * (1 + 1e-5) + HalfUlp(std::fabs(b) + scale, dt) + 1e-30;
                ASSERT_LE(std::fabs(a - b), bound) << "element " << i;
                if (amax == 0) {
                  ASSERT_EQ(b, 0.0);
                }
                max_err = std::max(max_err, std::fabs(a - b));
              }
            }
          auto rep = MeasureCodec(l, CodecKind::kInt8, raw);
          ASSERT_TRUE(rep.ok());
          EXPECT_EQ(rep->raw_bytes, l.NumBytes());
          EXPECT_EQ(rep->encoded_bytes, EncodedSize(l, CodecKind::kInt8));
          EXPECT_DOUBLE_EQ(rep->max_abs_error, max_err);
          if (tok > 1) {  // with one token per column the quantisation is exact
            EXPECT_GT(rep->rel_rms_error, 0.0);
          }
          EXPECT_LT(rep->rel_rms_error, 0.05);
          auto rep_raw = MeasureCodec(l, CodecKind::kRaw, raw);
          ASSERT_TRUE(rep_raw.ok());
          EXPECT_EQ(rep_raw->max_abs_error, 0.0);
        }
}

TEST(CodecTest, BadSizesAndValues) {
  SegmentLayout l{1, 1, 64, 3, DType::kF32};
  std::vector<std::byte> raw(l.NumBytes()), enc(EncodedSize(l, CodecKind::kInt8)), dec(l.NumBytes());
  EXPECT_EQ(EncodePayload(l, CodecKind::kInt8, std::span(raw).first(raw.size() - 1), enc).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(EncodePayload(l, CodecKind::kInt8, raw, std::span(enc).first(enc.size() - 1)).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(DecodePayload(l, CodecKind::kInt8, std::span(enc).first(enc.size() - 1), dec).code(),
            StatusCode::kDataLoss);
  float nan = std::nanf("");
  std::memcpy(raw.data(), &nan, 4);
  EXPECT_EQ(EncodePayload(l, CodecKind::kInt8, raw, enc).code(), StatusCode::kInvalidArgument);
  SegmentLayout empty{1, 1, 64, 0, DType::kF32};
  EXPECT_EQ(MeasureCodec(empty, CodecKind::kRaw, {}).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvagent
