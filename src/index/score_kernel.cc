#include "index/score_kernel.h"

#include <cmath>
#include <cstdint>

#include "kvagent/dtype.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KVAGENT_INDEX_X86 1
#endif

namespace kvagent::index_internal {

void DotRowsScalar(const void* row, bool f16, const float* q, int nq, int w, float* out) {
  for (int j = 0; j < nq; ++j) {
    const float* qj = q + static_cast<size_t>(j) * w;
    float acc = 0;
    if (f16) {
      const uint16_t* r = static_cast<const uint16_t*>(row);
      for (int i = 0; i < w; ++i) acc += qj[i] * F16ToF32(r[i]);
    } else {
      const float* r = static_cast<const float*>(row);
      for (int i = 0; i < w; ++i) acc += qj[i] * r[i];
    }
    out[j] = acc;
  }
}

#ifdef KVAGENT_INDEX_X86
namespace {

// The build targets baseline x86-64; these functions are compiled for AVX+FMA+F16C and only
// called after a CPUID check, so one binary runs everywhere.
#define KVAGENT_AVX __attribute__((target("avx,fma,f16c")))

KVAGENT_AVX inline __m256 LoadRow(const void* row, bool f16, int i) {
  if (f16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + i)));
  }
  return _mm256_loadu_ps(static_cast<const float*>(row) + i);
}

KVAGENT_AVX inline float HSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Four query vectors share each converted row vector (one row load per four FMAs); two
// accumulators per query hide the FMA latency (eight independent chains).
template <bool kF16>
KVAGENT_AVX void DotRows4(const void* row, const float* q, int w, float* out) {
  const float* q0 = q;
  const float* q1 = q0 + w;
  const float* q2 = q1 + w;
  const float* q3 = q2 + w;
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(), b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
  int i = 0;
  for (; i + 16 <= w; i += 16) {
    __m256 x = LoadRow(row, kF16, i);
    __m256 y = LoadRow(row, kF16, i + 8);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + i), x, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q1 + i), x, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q2 + i), x, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q3 + i), x, a3);
    b0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + i + 8), y, b0);
    b1 = _mm256_fmadd_ps(_mm256_loadu_ps(q1 + i + 8), y, b1);
    b2 = _mm256_fmadd_ps(_mm256_loadu_ps(q2 + i + 8), y, b2);
    b3 = _mm256_fmadd_ps(_mm256_loadu_ps(q3 + i + 8), y, b3);
  }
  for (; i < w; i += 8) {
    __m256 x = LoadRow(row, kF16, i);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + i), x, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q1 + i), x, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q2 + i), x, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q3 + i), x, a3);
  }
  out[0] = HSum(_mm256_add_ps(a0, b0));
  out[1] = HSum(_mm256_add_ps(a1, b1));
  out[2] = HSum(_mm256_add_ps(a2, b2));
  out[3] = HSum(_mm256_add_ps(a3, b3));
}

KVAGENT_AVX void DotRowsAvx(const void* row, bool f16, const float* q, int nq, int w, float* out) {
  int j = 0;
  for (; j + 4 <= nq; j += 4) {
    if (f16) {
      DotRows4<true>(row, q + static_cast<size_t>(j) * w, w, out + j);
    } else {
      DotRows4<false>(row, q + static_cast<size_t>(j) * w, w, out + j);
    }
  }
  for (; j < nq; ++j) {
    const float* qj = q + static_cast<size_t>(j) * w;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= w; i += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qj + i), LoadRow(row, f16, i), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qj + i + 8), LoadRow(row, f16, i + 8), a1);
    }
    for (; i < w; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qj + i), LoadRow(row, f16, i), a0);
    out[j] = HSum(_mm256_add_ps(a0, a1));
  }
}

// Reduces eight accumulators to one vector of their eight sums, in order.
KVAGENT_AVX inline __m256 HSum8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// Two rows x kN queries: each converted row vector feeds kN FMAs and each query vector two, so
// there are 3 loads per 4 FMAs (DotRows4: 5 per 4) and 2 * kN independent chains.
template <bool kF16, int kN>
KVAGENT_AVX void DotRows2xN(const void* row0, const void* row1, const float* q, int w, float* out0, float* out1) {
  // Fully unrolled so the accumulators stay in registers.
  __m256 a[2 * kN];
#pragma GCC unroll 8
  for (int k = 0; k < 2 * kN; ++k) a[k] = _mm256_setzero_ps();
  for (int i = 0; i < w; i += 8) {
    const __m256 x0 = LoadRow(row0, kF16, i);
    const __m256 x1 = LoadRow(row1, kF16, i);
#pragma GCC unroll 4
    for (int k = 0; k < kN; ++k) {
      __m256 v = _mm256_loadu_ps(q + static_cast<size_t>(k) * w + i);
      __asm__("" : "+x"(v));  // one load for both FMAs (compilers otherwise fold it into each)
      a[k] = _mm256_fmadd_ps(v, x0, a[k]);
      a[kN + k] = _mm256_fmadd_ps(v, x1, a[kN + k]);
    }
  }
  if constexpr (kN == 4) {
    const __m256 s = HSum8(a);
    _mm_storeu_ps(out0, _mm256_castps256_ps128(s));
    _mm_storeu_ps(out1, _mm256_extractf128_ps(s, 1));
  } else {
#pragma GCC unroll 4
    for (int k = 0; k < kN; ++k) {
      out0[k] = HSum(a[k]);
      out1[k] = HSum(a[kN + k]);
    }
  }
}

template <bool kF16>
KVAGENT_AVX void DotRows2AvxT(const void* row0, const void* row1, const float* q, int nq, int w, float* out0,
                              float* out1) {
  int j = 0;
  for (; j + 4 <= nq; j += 4) {
    DotRows2xN<kF16, 4>(row0, row1, q + static_cast<size_t>(j) * w, w, out0 + j, out1 + j);
  }
  for (; j + 2 <= nq; j += 2) {
    DotRows2xN<kF16, 2>(row0, row1, q + static_cast<size_t>(j) * w, w, out0 + j, out1 + j);
  }
  for (; j < nq; ++j) DotRows2xN<kF16, 1>(row0, row1, q + static_cast<size_t>(j) * w, w, out0 + j, out1 + j);
}

KVAGENT_AVX void DotRows2Avx(const void* row0, const void* row1, bool f16, const float* q, int nq, int w, float* out0,
                             float* out1) {
  if (f16) {
    DotRows2AvxT<true>(row0, row1, q, nq, w, out0, out1);
  } else {
    DotRows2AvxT<false>(row0, row1, q, nq, w, out0, out1);
  }
}

// exp(x) = 2^n * exp(r), r = x - n ln2 in [-ln2/2, ln2/2], degree-6 Taylor polynomial for exp(r).
// 2^n is built in two 128-bit halves because AVX1 has no 256-bit integer shifts.
KVAGENT_AVX void ExpShiftedAvx(float* x, const float* shift, size_t n) {
  const __m256 lo = _mm256_set1_ps(-87.0f), log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 ln2_hi = _mm256_set1_ps(0.693359375f), ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
  const __m256 c1 = _mm256_set1_ps(1.0f), c2 = _mm256_set1_ps(0.5f), c3 = _mm256_set1_ps(1.0f / 6),
               c4 = _mm256_set1_ps(1.0f / 24), c5 = _mm256_set1_ps(1.0f / 120), c6 = _mm256_set1_ps(1.0f / 720);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(shift + i));
    __m256 under = _mm256_cmp_ps(v, lo, _CMP_LT_OQ);
    v = _mm256_max_ps(v, lo);
    __m256 k = _mm256_round_ps(_mm256_mul_ps(v, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, ln2_hi, v);
    r = _mm256_fnmadd_ps(k, ln2_lo, r);
    __m256 p = _mm256_fmadd_ps(c6, r, c5);
    p = _mm256_fmadd_ps(p, r, c4);
    p = _mm256_fmadd_ps(p, r, c3);
    p = _mm256_fmadd_ps(p, r, c2);
    p = _mm256_fmadd_ps(p, r, c1);
    p = _mm256_fmadd_ps(p, r, c1);
    __m256i ki = _mm256_cvtps_epi32(k);
    __m128i bias = _mm_set1_epi32(127);
    __m128i e0 = _mm_slli_epi32(_mm_add_epi32(_mm256_castsi256_si128(ki), bias), 23);
    __m128i e1 = _mm_slli_epi32(_mm_add_epi32(_mm256_extractf128_si256(ki, 1), bias), 23);
    __m256 scale = _mm256_castsi256_ps(_mm256_insertf128_si256(_mm256_castsi128_si256(e0), e1, 1));
    __m256 e = _mm256_mul_ps(p, scale);
    _mm256_storeu_ps(x + i, _mm256_andnot_ps(under, e));
  }
  for (; i < n; ++i) x[i] = std::exp(x[i] - shift[i]);
}

template <int kMode>
KVAGENT_AVX void ToF16Avx(const float* src, uint16_t* dst, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), kMode));
  }
  for (; i < n; ++i) {
    dst[i] = static_cast<uint16_t>(_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(src[i]), kMode), 0));
  }
}

bool HaveAvx() {
  static const bool have = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return have;
}

}  // namespace
#endif

DotRowsFn SelectDotRows(int w) {
#ifdef KVAGENT_INDEX_X86
  if (w % 8 == 0 && HaveAvx()) return &DotRowsAvx;
#endif
  return &DotRowsScalar;
}

namespace {
void DotRows2Scalar(const void* row0, const void* row1, bool f16, const float* q, int nq, int w, float* out0,
                    float* out1) {
  DotRowsScalar(row0, f16, q, nq, w, out0);
  DotRowsScalar(row1, f16, q, nq, w, out1);
}
}  // namespace

DotRows2Fn SelectDotRows2(int w) {
#ifdef KVAGENT_INDEX_X86
  if (w % 8 == 0 && HaveAvx()) return &DotRows2Avx;
#endif
  return &DotRows2Scalar;
}

void ToF16(const float* src, uint16_t* dst, size_t n, int direction) {
#ifdef KVAGENT_INDEX_X86
  if (HaveAvx()) {
    if (direction < 0) {
      ToF16Avx<_MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC>(src, dst, n);
    } else if (direction > 0) {
      ToF16Avx<_MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC>(src, dst, n);
    } else {
      ToF16Avx<_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC>(src, dst, n);
    }
    return;
  }
#endif
  for (size_t i = 0; i < n; ++i) {
    uint16_t h = F32ToF16(src[i]);
    const float back = F16ToF32(h);
    if (direction < 0 && back > src[i]) h = (h == 0) ? 0x8001 : ((h & 0x8000) ? h + 1 : h - 1);
    if (direction > 0 && back < src[i]) h = (h == 0x8000) ? 0x0001 : ((h & 0x8000) ? h - 1 : h + 1);
    dst[i] = h;
  }
}

void ExpShifted(float* x, const float* shift, size_t n) {
#ifdef KVAGENT_INDEX_X86
  if (HaveAvx()) {
    ExpShiftedAvx(x, shift, n);
    return;
  }
#endif
  for (size_t i = 0; i < n; ++i) x[i] = std::exp(x[i] - shift[i]);
}

}  // namespace kvagent::index_internal
