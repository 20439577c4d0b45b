// CPU rotation: one cos/sin table per call (shared by all heads and layers of a spec), rows
// widened to f32 in small stack buffers so the rotation loop has no aliasing and vectorises,
// work split over (plane, head, token block) units across the shared thread pool.
#include "rope/rope_kernel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <thread>

#include "core/thread_pool.h"

namespace kvagent::rope_detail {
namespace {

constexpr int64_t kMaxAbsPosition = int64_t{1} << 31;
constexpr int64_t kTokenBlock = 512;
constexpr size_t kElementsPerThread = size_t{1} << 16;  // below this, threads cost more than they save
constexpr int kMaxHeadDim = 4096;
constexpr int64_t kPrefetchRows = 16;  // bf16 rows prefetched ahead (for write: rotated in place)

// `threads` contiguous ranges of [0, n) on the shared persistent pool (the caller works too).
void ParallelFor(int64_t n, int threads, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  ThreadPool::Shared().ParallelFor(static_cast<size_t>(n), threads, [&](size_t b, size_t e, int) {
    fn(static_cast<int64_t>(b), static_cast<int64_t>(e));
  });
}

// The build's -O2 leaves these loops scalar on older GCC; the kernel needs the vectoriser.
// No fast-math and no FMA contraction: results stay bit-identical across clones.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("O3", "fp-contract=off")
#endif

// F32ToBF16 of kvagent/dtype.h (round to nearest even, NaN kept quiet) written without a
// branch so the row loop vectorises; rope_test checks the two agree on every bit pattern class.
inline uint16_t Bf16RoundBranchless(float f) {
  const uint32_t b = std::bit_cast<uint32_t>(f);
  const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (b >> 16) | 0x40u;
  return static_cast<uint16_t>((b & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// Row conversions. bf16 widening is a shift; narrowing uses dtype.h's round-to-nearest-even.
inline void LoadRow(const void* src, DType t, int n, float* __restrict dst) {
  switch (t) {
    case DType::kF32:
      std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(n));
      break;
    case DType::kBF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int j = 0; j < n; ++j) dst[j] = std::bit_cast<float>(static_cast<uint32_t>(s[j]) << 16);
      break;
    }
    case DType::kF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int j = 0; j < n; ++j) dst[j] = F16ToF32(s[j]);
      break;
    }
    default:
      break;
  }
}

inline void StoreRow(const float* __restrict src, int n, DType t, void* dst) {
  switch (t) {
    case DType::kF32:
      std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(n));
      break;
    case DType::kBF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int j = 0; j < n; ++j) d[j] = Bf16RoundBranchless(src[j]);
      break;
    }
    case DType::kF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int j = 0; j < n; ++j) d[j] = F32ToF16(src[j]);
      break;
    }
    default:
      break;
  }
}

inline void RotateHalfSplit(const float* __restrict a, float* __restrict b, const float* __restrict c,
                            const float* __restrict s, int half) {
  for (int i = 0; i < half; ++i) {
    const float x0 = a[i];
    const float x1 = a[i + half];
    b[i] = x0 * c[i] - x1 * s[i];
    b[i + half] = x1 * c[i] + x0 * s[i];
  }
}

inline void RotateInterleaved(const float* __restrict a, float* __restrict b, const float* __restrict c,
                              const float* __restrict s, int half) {
  for (int i = 0; i < half; ++i) {
    const float x0 = a[2 * i];
    const float x1 = a[2 * i + 1];
    b[2 * i] = x0 * c[i] - x1 * s[i];
    b[2 * i + 1] = x1 * c[i] + x0 * s[i];
  }
}

inline float WidenBf16(uint16_t v) { return std::bit_cast<float>(static_cast<uint32_t>(v) << 16); }

// bf16 -> bf16 in one pass (no staging rows). Iteration i reads and writes only elements i and
// i + half (or 2i, 2i + 1), so in-place use has no cross-iteration dependence: ivdep is sound.
inline void RotateHalfSplitBf16(const uint16_t* x, uint16_t* y, const float* __restrict c, const float* __restrict s,
                                int half) {
#pragma GCC ivdep
  for (int i = 0; i < half; ++i) {
    const float x0 = WidenBf16(x[i]);
    const float x1 = WidenBf16(x[i + half]);
    y[i] = Bf16RoundBranchless(x0 * c[i] - x1 * s[i]);
    y[i + half] = Bf16RoundBranchless(x1 * c[i] + x0 * s[i]);
  }
}

inline void RotateInterleavedBf16(const uint16_t* x, uint16_t* y, const float* __restrict c, const float* __restrict s,
                                  int half) {
#pragma GCC ivdep
  for (int i = 0; i < half; ++i) {
    const float x0 = WidenBf16(x[2 * i]);
    const float x1 = WidenBf16(x[2 * i + 1]);
    y[2 * i] = Bf16RoundBranchless(x0 * c[i] - x1 * s[i]);
    y[2 * i + 1] = Bf16RoundBranchless(x1 * c[i] + x0 * s[i]);
  }
}

struct Unit {
  int32_t plane;
  int32_t head;
  int64_t t0;
  int64_t t1;
};

// One (plane, head, token block). Compiled for AVX2 and baseline x86-64 where the compiler
// supports function multi-versioning; the loader picks the variant for this CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#endif
void RotateUnit(const RopeFrequencies& freqs, const CosSinTable& table, const PlanePair& p, int64_t head, int64_t t0,
                int64_t t1) {
  const int dim = freqs.head_dim;
  const int rot = freqs.rotary_dim;
  const int half = rot / 2;
  const size_t in_es = DTypeSize(p.in.dtype);
  const size_t out_es = DTypeSize(p.out.dtype);
  alignas(64) float a[kMaxHeadDim];
  alignas(64) float b[kMaxHeadDim];
  const auto* in_base = static_cast<const std::byte*>(p.in.data);
  auto* out_base = static_cast<std::byte*>(p.out.data);
  for (int64_t t = t0; t < t1; ++t) {
    const std::byte* x = in_base + static_cast<size_t>(head * p.in.head_stride + t * p.in.token_stride) * in_es;
    std::byte* y = out_base + static_cast<size_t>(head * p.out.head_stride + t * p.out.token_stride) * out_es;
    const float* c = table.CosRow(t);
    const float* s = table.SinRow(t);
    if (p.in.dtype == DType::kBF16 && p.out.dtype == DType::kBF16) {
      if (t + kPrefetchRows < t1) {
        const std::byte* ahead = x + static_cast<size_t>(kPrefetchRows * p.in.token_stride) * in_es;
        for (int64_t off = 0; off < dim * 2; off += 64) __builtin_prefetch(ahead + off, 1);
      }
      const auto* xs = reinterpret_cast<const uint16_t*>(x);
      auto* ys = reinterpret_cast<uint16_t*>(y);
      if (freqs.style == RopeStyle::kHalfSplit) {
        RotateHalfSplitBf16(xs, ys, c, s, half);
      } else {
        RotateInterleavedBf16(xs, ys, c, s, half);
      }
      for (int j = rot; j < dim; ++j) ys[j] = Bf16RoundBranchless(WidenBf16(xs[j]));
      continue;
    }
    LoadRow(x, p.in.dtype, dim, a);
    // f32 rotates straight into the output row (a is a private copy, so no aliasing even in
    // place); narrower dtypes go through b and one rounding store.
    const bool direct = p.out.dtype == DType::kF32;
    float* dst = direct ? reinterpret_cast<float*>(y) : b;
    if (freqs.style == RopeStyle::kHalfSplit) {
      RotateHalfSplit(a, dst, c, s, half);
    } else {
      RotateInterleaved(a, dst, c, s, half);
    }
    for (int j = rot; j < dim; ++j) dst[j] = a[j];
    if (!direct) StoreRow(b, dim, p.out.dtype, y);
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

}  // namespace

int ThreadsFor(const RopeOptions& options, size_t elements) {
  int hw = static_cast<int>(std::thread::hardware_concurrency());
  int limit = options.max_threads > 0 ? options.max_threads : std::max(hw, 1);
  size_t by_work = std::max<size_t>(1, elements / kElementsPerThread);
  return static_cast<int>(std::min<size_t>(static_cast<size_t>(limit), by_work));
}

CosSinTable BuildTable(const RopeFrequencies& freqs, std::span<const int64_t> positions, double scale, bool negate_sin,
                       int threads) {
  CosSinTable t;
  t.half = freqs.rotary_dim / 2;
  t.tokens = static_cast<int64_t>(positions.size());
  t.uniform = !positions.empty() &&
              std::all_of(positions.begin(), positions.end(), [&](int64_t p) { return p == positions.front(); });
  const int64_t rows = t.uniform ? 1 : t.tokens;
  const size_t n = static_cast<size_t>(rows) * static_cast<size_t>(t.half);
  t.cos.resize(n);
  t.sin.resize(n);
  const double sin_scale = negate_sin ? -scale : scale;
  const int work_threads = std::min(threads, std::max(1, static_cast<int>(n / 4096)));
  ParallelFor(rows, work_threads, [&](int64_t b, int64_t e) {
    for (int64_t tok = b; tok < e; ++tok) {
      const double p = static_cast<double>(positions[static_cast<size_t>(tok)]);
      float* c = t.cos.data() + static_cast<size_t>(tok) * t.half;
      float* s = t.sin.data() + static_cast<size_t>(tok) * t.half;
      // Runs of equal positions (a segment moved as a block has one delta) reuse the row.
      if (tok > b && positions[static_cast<size_t>(tok)] == positions[static_cast<size_t>(tok - 1)]) {
        std::memcpy(c, c - t.half, sizeof(float) * static_cast<size_t>(t.half));
        std::memcpy(s, s - t.half, sizeof(float) * static_cast<size_t>(t.half));
        continue;
      }
      for (int i = 0; i < t.half; ++i) {
        const double angle = p * static_cast<double>(freqs.inv_freq[static_cast<size_t>(i)]);
        c[i] = static_cast<float>(std::cos(angle) * scale);
        s[i] = static_cast<float>(std::sin(angle) * sin_scale);
      }
    }
  });
  return t;
}

void RotatePlanes(const RopeFrequencies& freqs, const CosSinTable& table, std::span<const PlanePair> planes,
                  int threads) {
  std::vector<Unit> units;
  for (size_t pi = 0; pi < planes.size(); ++pi) {
    for (int64_t h = 0; h < planes[pi].in.num_heads; ++h) {
      for (int64_t t = 0; t < table.tokens; t += kTokenBlock) {
        units.push_back(
            Unit{static_cast<int32_t>(pi), static_cast<int32_t>(h), t, std::min(table.tokens, t + kTokenBlock)});
      }
    }
  }
  ParallelFor(static_cast<int64_t>(units.size()), threads, [&](int64_t b, int64_t e) {
    for (int64_t u = b; u < e; ++u) {
      const Unit& w = units[static_cast<size_t>(u)];
      RotateUnit(freqs, table, planes[static_cast<size_t>(w.plane)], w.head, w.t0, w.t1);
    }
  });
}

Status CheckView(const RopeTensorView& v, int64_t head_dim, const char* what) {
  const std::string name(what);
  if (v.dtype != DType::kF32 && v.dtype != DType::kF16 && v.dtype != DType::kBF16) {
    return InvalidArgumentError("rope: " + name + " dtype must be f32, f16 or bf16, got " +
                                std::string(DTypeName(v.dtype)));
  }
  if (v.num_heads < 0 || v.num_tokens < 0) return InvalidArgumentError("rope: " + name + " has a negative extent");
  if (v.head_dim != head_dim) {
    return InvalidArgumentError("rope: " + name + " last dimension is " + std::to_string(v.head_dim) +
                                ", expected head_dim " + std::to_string(head_dim));
  }
  if (head_dim > kMaxHeadDim) return InvalidArgumentError("rope: head_dim above " + std::to_string(kMaxHeadDim));
  if (v.num_heads == 0 || v.num_tokens == 0) return Status::Ok();
  if (v.data == nullptr) return InvalidArgumentError("rope: " + name + " has no data");
  if (v.head_stride < 0 || v.token_stride < 0) return InvalidArgumentError("rope: " + name + " has negative strides");
  // Rows must not overlap: order the two outer strides and require each to clear the extent inside it.
  struct Axis {
    int64_t stride, count;
  };
  Axis inner{v.token_stride, v.num_tokens}, outer{v.head_stride, v.num_heads};
  if (inner.count == 1 || (outer.count > 1 && outer.stride < inner.stride)) std::swap(inner, outer);
  const bool ok = (inner.count == 1 || inner.stride >= head_dim) &&
                  (outer.count == 1 || outer.stride >= std::max(inner.stride * inner.count, head_dim));
  if (!ok) return InvalidArgumentError("rope: " + name + " rows overlap (strides too small for the shape)");
  return Status::Ok();
}

Status CheckPositions(std::span<const int64_t> positions, const char* what) {
  for (int64_t p : positions) {
    if (p >= kMaxAbsPosition || p <= -kMaxAbsPosition) {
      return InvalidArgumentError("rope: " + std::string(what) + " position " + std::to_string(p) +
                                  " outside (-2^31, 2^31)");
    }
  }
  return Status::Ok();
}

}  // namespace kvagent::rope_detail
