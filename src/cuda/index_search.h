// Device search over LatentIndex scoring rows (checking layer over src/cuda/search_kernels.cuh).
//
// Inputs are LatentIndex's dense scoring matrix and pooled query vectors, already on the device:
//   rows: [num_rows][blocks][width], f16 bit patterns when `f16` else f32 (as cuda::ScoreRows);
//         block = layer slot * kv_heads + kv_head, width = head_dim (mean keys) or 2 * head_dim
//         (bounding boxes, queries split into positive and negative parts as LatentIndex does);
//   q:    [blocks][nq][width] f32, pooled and scaled (nq = query chunks per (layer, kv_head)).
// SearchRows then does what LatentIndex::Search does after pooling, for HeadReduce::kMeanQuery:
//   1. votes R[r][u] = q[u] . rows[r][block(u)] for u = block * nq + j (U = blocks * nq votes);
//   2. normalisation of every vote u across the rows: none; softmax exp(R - max_u) / Z_u;
//      z-score (R - mean_u) / sd_u, 0 where sd_u <= 1e-12 * max(1, |mean_u|) (double sums);
//   3. aggregation of a row's U normalised votes: mean or max (kTopP is Unimplemented);
//   4. the top_k rows by score, best first; on equal scores the lower row first (LatentIndex
//      breaks ties by segment key instead). NaN scores rank lowest.
// Candidate filters, pinned segments and token budgets stay with the caller (pass the candidate
// rows only, or select from more than top_k). All inputs must be finite.
//
// Memory: the votes are materialised (num_rows * U * 4 bytes, vote-major) in a caller-provided
// device workspace of SearchRowsWorkspaceBytes(); nothing is allocated. Pointers are device
// pointers; functions check null pointers, alignment and sizes but cannot check that a pointer
// addresses enough memory.
// Streams: all work is enqueued on `stream` (nullptr = legacy default stream); functions return
// after enqueueing. Inputs and the workspace must stay valid until the stream reaches that point.
// Errors: InvalidArgument on bad sizes, null or misaligned pointers (checked before any device
// work); Unimplemented for kTopP; Unavailable without a usable device; Internal (or
// ResourceExhausted) on CUDA errors, with the CUDA error string.
// Thread-safety: reentrant; concurrent calls need separate workspaces and outputs.
// Only built when KVAGENT_CUDA is on.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kvagent/cuda_kv.h"
#include "kvagent/index.h"
#include "kvagent/status.h"

namespace kvagent::cuda {

inline constexpr int kMaxSearchTopK = 1024;

struct RowSearch {
  const void* rows = nullptr;
  bool f16 = true;
  size_t num_rows = 0;  // [0, 2^31); 0 = nothing to do, nothing written
  int blocks = 0;       // [1, 65535]
  int width = 0;        // >= 1; multiples of 8 (f16) / 4 (f32) with 16-byte aligned rows load vectors
  const float* q = nullptr;
  int nq = 0;  // >= 1; blocks * nq < 2^31
  TokenNorm norm = TokenNorm::kSoftmax;
  Aggregation agg = Aggregation::kMax;
  int top_k = 5;  // [1, kMaxSearchTopK]
};

// Device workspace bytes SearchRows needs for `s` (votes, per-vote statistics, per-row scores,
// top-k candidates); InvalidArgument as SearchRows for bad sizes (pointers are not checked).
StatusOr<size_t> SearchRowsWorkspaceBytes(const RowSearch& s);

// Runs steps 1-4. Writes min(top_k, num_rows) results: out_scores[i] (device f32) and
// out_rows[i] (device int32 row index), best first. `workspace`: device, 16-byte aligned, at
// least SearchRowsWorkspaceBytes(s) bytes.
Status SearchRows(const RowSearch& s, void* workspace, size_t workspace_bytes, float* out_scores, int32_t* out_rows,
                  Stream stream);

// ---- the steps of SearchRows, for timing and tests (same checks and errors) ----

// Step 1: votes[u * num_rows + r] = R[r][u] (vote-major), device f32, num_rows * blocks * nq.
// row_ids (optional, device int32, num_rows entries, 4-byte aligned): vote row r scores matrix row
// row_ids[r] (a candidate list into a larger matrix; the caller keeps every id in range).
Status ScoreVotes(const void* rows, bool f16, size_t num_rows, int blocks, int width, const float* q, int nq,
                  float* votes, Stream stream, const int32_t* row_ids = nullptr);
// GQA reduction of per-query-head votes (HeadReduce::kMeanScore / kMaxScore): out[g * num_rows +
// r] = mean (f32 sum, then / group, as the CPU) or max of in[(g * group + h) * num_rows + r], h <
// group; device f32, in: num_rows * groups * group, out: num_rows * groups.
Status ReduceHeadVotes(const float* in, size_t num_rows, int groups, int group, HeadReduce reduce, float* out,
                       Stream stream);
// The scores (and, when out_votes is set, the U votes, row-major) of `count` rows:
// out_scores[k] = scores[ids[k]], out_votes[k * num_votes + u] = votes[u * num_rows + ids[k]].
// ids: device int32, each in [0, num_rows) (not checked: the caller's candidates).
Status GatherRows(const float* votes, const float* scores, size_t num_rows, int num_votes, const int32_t* ids,
                  int count, float* out_scores, float* out_votes, Stream stream);
// Step 2 statistics per vote: stats[2u], stats[2u + 1] = softmax {max, log Z}, z-score {mean,
// 1 / sd or 0}; device f32, 2 * num_votes. A no-op for kNone or num_rows 0.
Status VoteStats(const float* votes, size_t num_rows, int num_votes, TokenNorm norm, float* stats, Stream stream);
// Steps 2-3: scores[r] (device f32, num_rows) from the votes and the statistics of VoteStats
// (unused, may be null, for kNone). Softmax + max takes exp(max_u (R - max_u - log Z_u)).
Status AggregateVotes(const float* votes, size_t num_rows, int num_votes, TokenNorm norm, Aggregation agg,
                      const float* stats, float* scores, Stream stream);
// Step 4: the min(k, n) best of scores[0, n), as SearchRows. n < 2^31, k in [1, kMaxSearchTopK];
// workspace: device, 16-byte aligned, TopKWorkspaceBytes(n, k) bytes.
size_t TopKWorkspaceBytes(size_t n, int k);
Status TopKRows(const float* scores, size_t n, int k, void* workspace, size_t workspace_bytes, float* out_scores,
                int32_t* out_rows, Stream stream);

}  // namespace kvagent::cuda
