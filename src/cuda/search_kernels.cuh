// Framework-free kernels of the device index search: raw pointers, a stream, no validation. The
// checking layer (src/cuda/index_search.{h,cc}) guarantees the preconditions listed on each
// launcher. Votes are stored vote-major, votes[u * num_rows + r] with u = block * nq + j, so that
// every kernel reads and writes them coalesced.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace kvagent::cuda::search_kernels {

enum class Norm : int32_t { kNone = 0, kSoftmax = 1, kZScore = 2 };
enum class Agg : int32_t { kMean = 0, kMax = 1 };

inline constexpr int kDotRowTile = 384;   // rows per thread block of the dot-product kernel
inline constexpr int kDotQueryTile = 32;  // query vectors per thread block (gridDim.z tiles nq)
inline constexpr int kTopKChunk = 4096;   // candidates bitonic-sorted per thread block
inline constexpr int kMaxTopK = 1024;     // <= kTopKChunk / 4, so every top-k pass shrinks the candidates

// votes[(b * nq + j) * num_rows + r] = sum_i q[(b * nq + j) * width + i] * rows[(m(r) * blocks + b) * width + i]
// (f32 accumulation in order of i), m(r) = row_ids[r] when row_ids is set (a candidate list into
// a larger matrix), else r. Preconditions: num_rows in [1, 2^31); blocks in [1, 65535];
// width >= 1; nq in [1, 65535 * kDotQueryTile]; vec is 1, 4 (f32) or 8 (f16), divides width, and
// rows is aligned to vec elements (16 bytes for vec > 1); row_ids, if set, holds num_rows valid
// row indices (>= 0).
cudaError_t LaunchScoreVotes(const void* rows, bool f16, size_t num_rows, int blocks, int width, const float* q, int nq,
                             int vec, float* votes, cudaStream_t stream, const int32_t* row_ids = nullptr);

// GQA head reduction of vote-major votes: out[g * num_rows + r] = max or mean over h < group of
// in[(g * group + h) * num_rows + r] (mean: f32 sum in order of h, then / group, as LatentIndex's
// CPU path). Preconditions: num_rows in [1, 2^31); groups >= 1; group >= 1.
cudaError_t LaunchReduceHeads(const float* in, size_t num_rows, int groups, int group, bool max, float* out,
                              cudaStream_t stream);

// Rows of interest, row-major: out_scores[k] = scores[ids[k]] and out_votes[k * num_votes + u] =
// votes[u * num_rows + ids[k]] for k < count (out_votes may be null: scores only).
// Preconditions: count >= 1, every ids[k] in [0, num_rows).
cudaError_t LaunchGatherRows(const float* votes, const float* scores, size_t num_rows, int num_votes,
                             const int32_t* ids, int count, float* out_scores, float* out_votes, cudaStream_t stream);

// Per vote u < num_votes, over votes[u * num_rows + r] for r < num_rows:
//   kSoftmax: stats[2u] = max_r v, stats[2u + 1] = log(sum_r exp(v - max)) (sum in double);
//   kZScore:  stats[2u] = mean, stats[2u + 1] = 1 / sd, or 0 when sd <= 1e-12 * max(1, |mean|)
//             (population sd from double sums: var = max(0, E[v^2] - mean^2), as LatentIndex).
// Preconditions: norm != kNone; num_rows >= 1; num_votes in [1, 2^31).
cudaError_t LaunchVoteStats(const float* votes, size_t num_rows, int num_votes, Norm norm, float* stats,
                            cudaStream_t stream);

// scores[r] = aggregation over u of the normalised vote n(v): kNone v; kSoftmax exp(v - max - log Z);
// kZScore (v - mean) * inv_sd. kMax takes the largest (for softmax: exp of the largest log
// probability), kMean the mean (sum in double). `stats` is unused for kNone.
cudaError_t LaunchAggregate(const float* votes, size_t num_rows, int num_votes, Norm norm, Agg agg, const float* stats,
                            float* scores, cudaStream_t stream);

// Keys per candidate buffer of LaunchTopK: ceil(n / kTopKChunk) * k.
size_t TopKCandidates(size_t n, int k);

// The min(k, n) largest scores, best first (on equal scores the lower row first; NaN ranks
// lowest, -0 equals +0): out_scores[i], out_rows[i]. cand_a and cand_b each hold
// TopKCandidates(n, k) keys. Preconditions: n in [1, 2^31); k in [1, kMaxTopK].
cudaError_t LaunchTopK(const float* scores, size_t n, int k, uint64_t* cand_a, uint64_t* cand_b, float* out_scores,
                       int32_t* out_rows, cudaStream_t stream);

}  // namespace kvagent::cuda::search_kernels
