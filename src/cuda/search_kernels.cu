#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "cuda/search_kernels.cuh"

namespace kvagent::cuda::search_kernels {
namespace {

// ---- dot products ----------------------------------------------------------------------------
// A thread block scores kDotRowTile rows of one block b against kDotQueryTile query vectors.
// Each thread owns kDotRowsPerThread (3) rows and all the tile's queries (96 accumulators): it
// reads its rows straight from global memory (every element is used by exactly one thread) and
// the query tile from shared memory, where a warp's reads of one (k, 4 queries) are a broadcast:
// 3 * 32 FMAs per 8 shared-memory loads, no shared memory for the rows. On an H200 this runs at
// about 28 TFLOP/s (f32 FMA), far from HBM-bound, likely limited by the broadcast loads (not
// profiled): 2 rows per thread were 12% slower, 4 (222 registers) no faster, and prefetching the
// next row vector made no difference.
constexpr int kDotThreads = 128;
constexpr int kDotRowsPerThread = kDotRowTile / kDotThreads;
constexpr int kDotKTile = 64;  // query elements staged per pass over the width
static_assert(kDotQueryTile % 4 == 0 && kDotRowTile % kDotThreads == 0);

__device__ __forceinline__ float HalfBits(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}

// x[i] = rows[off + i] as f32 for i < kVec. kVec > 1 requires 16-byte alignment.
template <bool kF16, int kVec>
__device__ __forceinline__ void LoadRow(const void* __restrict__ rows, size_t off, float (&x)[kVec]) {
  if constexpr (kF16) {
    const uint16_t* p = static_cast<const uint16_t*>(rows) + off;
    if constexpr (kVec == 8) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
      const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        x[2 * i] = HalfBits(w[i] & 0xFFFFu);  // little-endian: element 2i is the low half
        x[2 * i + 1] = HalfBits(w[i] >> 16);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) x[i] = HalfBits(__ldg(p + i));
    }
  } else {
    const float* p = static_cast<const float*>(rows) + off;
    if constexpr (kVec == 4) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(p));
      x[0] = v.x;
      x[1] = v.y;
      x[2] = v.z;
      x[3] = v.w;
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) x[i] = __ldg(p + i);
    }
  }
}

template <bool kF16, int kVec>
__global__ void __launch_bounds__(kDotThreads)
    ScoreVotesKernel(const void* __restrict__ rows, size_t num_rows, int blocks, int width, const float* __restrict__ q,
                     int nq, float* __restrict__ votes, const int32_t* __restrict__ row_ids) {
  static_assert(kDotKTile % kVec == 0);
  __shared__ __align__(16) float qs[kDotKTile][kDotQueryTile];
  const int b = blockIdx.y;
  const int j0 = blockIdx.z * kDotQueryTile;
  const int nj = min(kDotQueryTile, nq - j0);
  const size_t r0 = static_cast<size_t>(blockIdx.x) * kDotRowTile + threadIdx.x;
  size_t off[kDotRowsPerThread];
#pragma unroll
  for (int i = 0; i < kDotRowsPerThread; ++i) {
    // Rows past the end are clamped to the last row: computed like the others, never stored.
    size_t r = min(r0 + static_cast<size_t>(i) * kDotThreads, num_rows - 1);
    if (row_ids != nullptr) r = static_cast<size_t>(__ldg(row_ids + r));
    off[i] = (r * blocks + b) * static_cast<size_t>(width);
  }
  float acc[kDotRowsPerThread][kDotQueryTile];
#pragma unroll
  for (int i = 0; i < kDotRowsPerThread; ++i) {
#pragma unroll
    for (int j = 0; j < kDotQueryTile; ++j) acc[i][j] = 0.0f;
  }
  const float* qb = q + (static_cast<size_t>(b) * nq + j0) * width;

  for (int k0 = 0; k0 < width; k0 += kDotKTile) {
    const int kn = min(kDotKTile, width - k0);
    __syncthreads();  // the previous tile has been consumed
    // qs[kk][j] = q[j][k0 + kk]; zero past nq and past the width. Consecutive threads take
    // consecutive j, so the shared-memory stores do not conflict (the q reads hit L1/L2).
    for (int e = threadIdx.x; e < kDotKTile * kDotQueryTile; e += kDotThreads) {
      const int j = e % kDotQueryTile;
      const int kk = e / kDotQueryTile;
      qs[kk][j] = (j < nj && kk < kn) ? qb[static_cast<size_t>(j) * width + k0 + kk] : 0.0f;
    }
    __syncthreads();
    for (int kk = 0; kk < kn; kk += kVec) {
      float x[kDotRowsPerThread][kVec];
#pragma unroll
      for (int i = 0; i < kDotRowsPerThread; ++i) LoadRow<kF16, kVec>(rows, off[i] + k0 + kk, x[i]);
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        const float4* qv = reinterpret_cast<const float4*>(qs[kk + v]);
#pragma unroll
        for (int j4 = 0; j4 < kDotQueryTile / 4; ++j4) {
          const float4 w = qv[j4];
#pragma unroll
          for (int i = 0; i < kDotRowsPerThread; ++i) {
            acc[i][4 * j4 + 0] = fmaf(w.x, x[i][v], acc[i][4 * j4 + 0]);
            acc[i][4 * j4 + 1] = fmaf(w.y, x[i][v], acc[i][4 * j4 + 1]);
            acc[i][4 * j4 + 2] = fmaf(w.z, x[i][v], acc[i][4 * j4 + 2]);
            acc[i][4 * j4 + 3] = fmaf(w.w, x[i][v], acc[i][4 * j4 + 3]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < kDotRowsPerThread; ++i) {
    const size_t r = r0 + static_cast<size_t>(i) * kDotThreads;
    if (r >= num_rows) continue;
#pragma unroll
    for (int j = 0; j < kDotQueryTile; ++j) {
      if (j < nj) votes[(static_cast<size_t>(b) * nq + j0 + j) * num_rows + r] = acc[i][j];
    }
  }
}

// ---- normalisation statistics ----------------------------------------------------------------
// One thread block per vote u reduces votes[u][0..num_rows) in a fixed order (deterministic).
constexpr int kStatsThreads = 256;
constexpr int kStatsBatch = 4;

// add(v[r]) for this thread's r = threadIdx.x + i * kStatsThreads, in order of r; kStatsBatch
// loads are issued before they are folded in.
template <typename Add>
__device__ __forceinline__ void ForThreadVotes(const float* __restrict__ v, size_t num_rows, Add& add) {
  size_t r = threadIdx.x;
  for (; r + (kStatsBatch - 1) * kStatsThreads < num_rows; r += kStatsBatch * kStatsThreads) {
    float x[kStatsBatch];
#pragma unroll
    for (int i = 0; i < kStatsBatch; ++i) x[i] = v[r + i * kStatsThreads];
#pragma unroll
    for (int i = 0; i < kStatsBatch; ++i) add(x[i]);
  }
  for (; r < num_rows; r += kStatsThreads) add(v[r]);
}

struct MaxSum {
  float m;   // running maximum
  double z;  // sum of exp(v - m)
};

__device__ __forceinline__ MaxSum Merge(MaxSum a, MaxSum b) {
  if (a.m < b.m) {
    const MaxSum t = a;
    a = b;
    b = t;
  }
  if (b.z == 0.0) return a;  // empty side (also covers both maxima at -inf)
  a.z += b.z * exp(static_cast<double>(b.m) - static_cast<double>(a.m));
  return a;
}

template <Norm kNorm>
__global__ void __launch_bounds__(kStatsThreads)
    VoteStatsKernel(const float* __restrict__ votes, size_t num_rows, float* __restrict__ stats) {
  __shared__ double sh_a[kStatsThreads / 32];
  __shared__ double sh_b[kStatsThreads / 32];
  __shared__ float sh_m[kStatsThreads / 32];
  const size_t u = blockIdx.x;
  const float* v = votes + u * num_rows;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if constexpr (kNorm == Norm::kSoftmax) {
    // Online softmax: rescale the running sum when the maximum grows.
    MaxSum s{-INFINITY, 0.0};
    auto add = [&s](float x) {
      if (x > s.m) {
        s.z = s.z * exp(static_cast<double>(s.m) - static_cast<double>(x)) + 1.0;
        s.m = x;
      } else {
        s.z += static_cast<double>(expf(x - s.m));
      }
    };
    ForThreadVotes(v, num_rows, add);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const MaxSum other{__shfl_down_sync(0xffffffffu, s.m, o), __shfl_down_sync(0xffffffffu, s.z, o)};
      s = Merge(s, other);
    }
    if (lane == 0) {
      sh_m[warp] = s.m;
      sh_a[warp] = s.z;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      MaxSum t{sh_m[0], sh_a[0]};
      for (int w = 1; w < kStatsThreads / 32; ++w) t = Merge(t, MaxSum{sh_m[w], sh_a[w]});
      stats[2 * u] = t.m;
      stats[2 * u + 1] = static_cast<float>(log(t.z));
    }
  } else {
    double s = 0.0, s2 = 0.0;
    auto add = [&s, &s2](double x) {
      s += x;
      s2 += x * x;
    };
    ForThreadVotes(v, num_rows, add);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      s += __shfl_down_sync(0xffffffffu, s, o);
      s2 += __shfl_down_sync(0xffffffffu, s2, o);
    }
    if (lane == 0) {
      sh_a[warp] = s;
      sh_b[warp] = s2;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      double ts = 0.0, ts2 = 0.0;
      for (int w = 0; w < kStatsThreads / 32; ++w) {
        ts += sh_a[w];
        ts2 += sh_b[w];
      }
      const double n = static_cast<double>(num_rows);
      const double mean = ts / n;
      const double sd = sqrt(fmax(0.0, ts2 / n - mean * mean));
      stats[2 * u] = static_cast<float>(mean);
      stats[2 * u + 1] = sd > 1e-12 * fmax(1.0, fabs(mean)) ? static_cast<float>(1.0 / sd) : 0.0f;
    }
  }
}

// ---- aggregation -----------------------------------------------------------------------------
// A thread block takes kAggRows consecutive rows; each of its kAggSlices warps folds every
// kAggSlices-th vote of those rows (a warp reads 32 consecutive rows of one vote: coalesced; the
// vote's two statistics are a broadcast), then warp 0 combines the slices in a fixed order. The
// slices keep enough loads in flight when there are few rows (1k rows x 1920 votes).
constexpr int kAggRows = 32;
constexpr int kAggSlices = 8;
constexpr int kAggThreads = kAggRows * kAggSlices;

template <Norm kNorm, Agg kAgg>
__global__ void __launch_bounds__(kAggThreads)
    AggregateKernel(const float* __restrict__ votes, size_t num_rows, int num_votes, const float* __restrict__ stats,
                    float* __restrict__ scores) {
  __shared__ float sh_best[kAggSlices][kAggRows];
  __shared__ double sh_sum[kAggSlices][kAggRows];
  const int lane = threadIdx.x % kAggRows, slice = threadIdx.x / kAggRows;
  const size_t r = static_cast<size_t>(blockIdx.x) * kAggRows + lane;
  float best = -INFINITY;
  double sum = 0.0;
  if (r < num_rows) {
    for (int u = slice; u < num_votes; u += kAggSlices) {
      const float x = votes[static_cast<size_t>(u) * num_rows + r];
      float n;
      if constexpr (kNorm == Norm::kNone) {
        n = x;
      } else if constexpr (kNorm == Norm::kSoftmax) {
        n = (x - __ldg(stats + 2 * u)) - __ldg(stats + 2 * u + 1);  // log probability
      } else {
        n = (x - __ldg(stats + 2 * u)) * __ldg(stats + 2 * u + 1);
      }
      if constexpr (kAgg == Agg::kMax) {
        best = fmaxf(best, n);
      } else if constexpr (kNorm == Norm::kSoftmax) {
        sum += static_cast<double>(expf(n));
      } else {
        sum += static_cast<double>(n);
      }
    }
  }
  sh_best[slice][lane] = best;
  sh_sum[slice][lane] = sum;
  __syncthreads();
  if (slice != 0 || r >= num_rows) return;
  for (int i = 1; i < kAggSlices; ++i) {
    best = fmaxf(best, sh_best[i][lane]);
    sum += sh_sum[i][lane];
  }
  if constexpr (kAgg == Agg::kMax) {
    scores[r] = kNorm == Norm::kSoftmax ? expf(best) : best;  // exp is monotonic: max of probabilities
  } else {
    scores[r] = static_cast<float>(sum / num_votes);
  }
}

// ---- top-k -----------------------------------------------------------------------------------
// Keys order (score, row) as unsigned integers: the high word is the score's bits made monotonic
// (NaN lowest, -0 folded onto +0), the low word ~row so the lower row wins on equal scores.
// Key 0 pads partial chunks and sorts below every real key (~row >= 2^31 for row < 2^31).
constexpr int kTopKThreads = 1024;

__device__ __forceinline__ uint64_t MakeKey(float v, uint32_t row) {
  const uint32_t bits = __float_as_uint(v == 0.0f ? 0.0f : v);
  uint32_t ord = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  if (v != v) ord = 0;
  return (static_cast<uint64_t>(ord) << 32) | static_cast<uint64_t>(~row);
}

// Thread block c sorts candidates [c * kTopKChunk, (c + 1) * kTopKChunk) of n descending (a
// bitonic network in shared memory) and writes its k best to out[c * k, (c + 1) * k).
// Candidates are scores (keys made here, row = index) when `scores` is set, else keys.
__global__ void __launch_bounds__(kTopKThreads)
    TopKPassKernel(const float* __restrict__ scores, const uint64_t* __restrict__ keys, size_t n, int k,
                   uint64_t* __restrict__ out) {
  __shared__ uint64_t s[kTopKChunk];
  const size_t base = static_cast<size_t>(blockIdx.x) * kTopKChunk;
  for (int i = threadIdx.x; i < kTopKChunk; i += kTopKThreads) {
    const size_t g = base + i;
    uint64_t key = 0;
    if (g < n) key = scores != nullptr ? MakeKey(scores[g], static_cast<uint32_t>(g)) : keys[g];
    s[i] = key;
  }
  __syncthreads();
  for (int size = 2; size <= kTopKChunk; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < kTopKChunk / 2; t += kTopKThreads) {
        const int lo = 2 * t - (t & (stride - 1));
        const int hi = lo + stride;
        const bool desc = (lo & size) == 0;  // the final merge (size == kTopKChunk) is all descending
        const uint64_t a = s[lo], c = s[hi];
        if ((a < c) == desc) {
          s[lo] = c;
          s[hi] = a;
        }
      }
      __syncthreads();
    }
  }
  for (int i = threadIdx.x; i < k; i += kTopKThreads) out[static_cast<size_t>(blockIdx.x) * k + i] = s[i];
}

__global__ void DecodeTopKKernel(const uint64_t* __restrict__ keys, int count, float* __restrict__ out_scores,
                                 int32_t* __restrict__ out_rows) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const uint64_t key = keys[i];
  const uint32_t ord = static_cast<uint32_t>(key >> 32);
  const uint32_t bits = (ord & 0x80000000u) ? (ord & 0x7FFFFFFFu) : ~ord;
  out_scores[i] = __uint_as_float(bits);
  out_rows[i] = static_cast<int32_t>(~static_cast<uint32_t>(key));
}

// ---- GQA head reduction and gathers -------------------------------------------------------------
__global__ void ReduceHeadsKernel(const float* __restrict__ in, size_t num_rows, int groups, int group, bool max,
                                  float* __restrict__ out) {
  const size_t n = static_cast<size_t>(groups) * num_rows;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t g = i / num_rows, r = i % num_rows;
    const float* x = in + g * group * num_rows + r;
    float acc = x[0];
    for (int h = 1; h < group; ++h) acc = max ? fmaxf(acc, x[h * num_rows]) : acc + x[h * num_rows];
    out[i] = max ? acc : acc / group;
  }
}

__global__ void GatherRowsKernel(const float* __restrict__ votes, const float* __restrict__ scores, size_t num_rows,
                                 int num_votes, const int32_t* __restrict__ ids, int count,
                                 float* __restrict__ out_scores, float* __restrict__ out_votes) {
  const int k = blockIdx.x;
  if (k >= count) return;
  const size_t r = static_cast<size_t>(ids[k]);
  if (threadIdx.x == 0) out_scores[k] = scores[r];
  if (out_votes == nullptr) return;
  for (int u = threadIdx.x; u < num_votes; u += blockDim.x) {
    out_votes[static_cast<size_t>(k) * num_votes + u] = votes[static_cast<size_t>(u) * num_rows + r];
  }
}

template <typename T>
unsigned GridFor(size_t n, T per_block) {
  return static_cast<unsigned>((n + static_cast<size_t>(per_block) - 1) / static_cast<size_t>(per_block));
}

}  // namespace

cudaError_t LaunchScoreVotes(const void* rows, bool f16, size_t num_rows, int blocks, int width, const float* q, int nq,
                             int vec, float* votes, cudaStream_t stream, const int32_t* row_ids) {
  const dim3 grid(GridFor(num_rows, kDotRowTile), static_cast<unsigned>(blocks), GridFor(nq, kDotQueryTile));
  if (f16 && vec == 8) {
    ScoreVotesKernel<true, 8><<<grid, kDotThreads, 0, stream>>>(rows, num_rows, blocks, width, q, nq, votes, row_ids);
  } else if (f16 && vec == 1) {
    ScoreVotesKernel<true, 1><<<grid, kDotThreads, 0, stream>>>(rows, num_rows, blocks, width, q, nq, votes, row_ids);
  } else if (!f16 && vec == 4) {
    ScoreVotesKernel<false, 4><<<grid, kDotThreads, 0, stream>>>(rows, num_rows, blocks, width, q, nq, votes, row_ids);
  } else if (!f16 && vec == 1) {
    ScoreVotesKernel<false, 1><<<grid, kDotThreads, 0, stream>>>(rows, num_rows, blocks, width, q, nq, votes, row_ids);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t LaunchVoteStats(const float* votes, size_t num_rows, int num_votes, Norm norm, float* stats,
                            cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(num_votes);
  if (norm == Norm::kSoftmax) {
    VoteStatsKernel<Norm::kSoftmax><<<grid, kStatsThreads, 0, stream>>>(votes, num_rows, stats);
  } else if (norm == Norm::kZScore) {
    VoteStatsKernel<Norm::kZScore><<<grid, kStatsThreads, 0, stream>>>(votes, num_rows, stats);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t LaunchAggregate(const float* votes, size_t num_rows, int num_votes, Norm norm, Agg agg, const float* stats,
                            float* scores, cudaStream_t stream) {
  const unsigned grid = GridFor(num_rows, kAggRows);
#define KVAGENT_AGG_CASE(N, A)                                                                                     \
  if (norm == Norm::N && agg == Agg::A) {                                                                          \
    AggregateKernel<Norm::N, Agg::A><<<grid, kAggThreads, 0, stream>>>(votes, num_rows, num_votes, stats, scores); \
    return cudaGetLastError();                                                                                     \
  }
  KVAGENT_AGG_CASE(kNone, kMean)
  KVAGENT_AGG_CASE(kNone, kMax)
  KVAGENT_AGG_CASE(kSoftmax, kMean)
  KVAGENT_AGG_CASE(kSoftmax, kMax)
  KVAGENT_AGG_CASE(kZScore, kMean)
  KVAGENT_AGG_CASE(kZScore, kMax)
#undef KVAGENT_AGG_CASE
  return cudaErrorInvalidValue;
}

cudaError_t LaunchReduceHeads(const float* in, size_t num_rows, int groups, int group, bool max, float* out,
                              cudaStream_t stream) {
  const size_t n = static_cast<size_t>(groups) * num_rows;
  const unsigned grid = static_cast<unsigned>(std::min<size_t>(GridFor(n, 256), 65535));
  ReduceHeadsKernel<<<grid, 256, 0, stream>>>(in, num_rows, groups, group, max, out);
  return cudaGetLastError();
}

cudaError_t LaunchGatherRows(const float* votes, const float* scores, size_t num_rows, int num_votes,
                             const int32_t* ids, int count, float* out_scores, float* out_votes, cudaStream_t stream) {
  GatherRowsKernel<<<static_cast<unsigned>(count), 256, 0, stream>>>(votes, scores, num_rows, num_votes, ids, count,
                                                                     out_scores, out_votes);
  return cudaGetLastError();
}

size_t TopKCandidates(size_t n, int k) { return (n + kTopKChunk - 1) / kTopKChunk * static_cast<size_t>(k); }

cudaError_t LaunchTopK(const float* scores, size_t n, int k, uint64_t* cand_a, uint64_t* cand_b, float* out_scores,
                       int32_t* out_rows, cudaStream_t stream) {
  // Each pass keeps the k best of every chunk: n -> ceil(n / kTopKChunk) * k <= n / 4 + k, until
  // one chunk holds all candidates.
  uint64_t* bufs[2] = {cand_a, cand_b};
  const uint64_t* in = nullptr;
  size_t m = n;
  for (int pass = 0;; ++pass) {
    const unsigned grid = GridFor(m, kTopKChunk);
    uint64_t* out = bufs[pass & 1];
    TopKPassKernel<<<grid, kTopKThreads, 0, stream>>>(pass == 0 ? scores : nullptr, in, m, k, out);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    in = out;
    m = static_cast<size_t>(grid) * k;
    if (grid == 1) break;
  }
  const int count = static_cast<int>(n < static_cast<size_t>(k) ? n : static_cast<size_t>(k));
  DecodeTopKKernel<<<GridFor(count, 256), 256, 0, stream>>>(in, count, out_scores, out_rows);
  return cudaGetLastError();
}

}  // namespace kvagent::cuda::search_kernels
