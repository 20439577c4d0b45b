// Device mirror of LatentIndex's scoring rows and the device search over them (internal: used by
// src/index/latent_index.cc in builds with CUDA; the public contract is IndexOptions::device in
// kvagent/index.h).
//
// The mirror is one contiguous device matrix of the host rows (index_internal::RowBlocks), kept
// up to date incrementally: the index reports every slot it writes (append, or the last row moved
// into a removed slot) and every truncation; Sync uploads only those rows, in runs that are
// contiguous on the host, growing the device matrix by doubling (a device-to-device copy of the
// valid rows). A search then scores a candidate list (slot ids uploaded with the query) or every
// row, through the kernels of src/cuda/index_search.h, and leaves the per-candidate scores and
// votes on the device for Top / AllScores / Gather.
//
// Thread-safety: none. LatentIndex calls RowChanged/Truncate under its exclusive lock and the rest
// under its shared lock plus a mutex that serialises device searches.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include "index/row_blocks.h"
#include "kvagent/index.h"
#include "kvagent/status.h"

namespace kvagent::cuda {

struct MirrorQuery {
  const float* q = nullptr;  // host [blocks][nq][width] f32: pooled, scaled (LatentIndex's qp)
  int blocks = 0;
  int width = 0;
  int nq = 0;     // query vectors per block; with per-head scoring nq = chunks * group
  int group = 1;  // > 1: each `group` consecutive vectors' votes are reduced by `reduce`
  HeadReduce reduce = HeadReduce::kMeanQuery;
  TokenNorm norm = TokenNorm::kSoftmax;
  Aggregation agg = Aggregation::kMax;  // kMean or kMax
  // Candidate slots (each < the rows synced); nullptr = every slot [0, num_candidates).
  const size_t* slots = nullptr;
  size_t num_candidates = 0;  // < 2^31
};

class IndexMirror {
 public:
  // Unavailable without a usable device `device`; ResourceExhausted/Internal on CUDA errors.
  // `rows` must outlive the mirror.
  static StatusOr<std::unique_ptr<IndexMirror>> Create(int device, const index_internal::RowBlocks* rows, bool f16);
  ~IndexMirror();
  IndexMirror(const IndexMirror&) = delete;
  IndexMirror& operator=(const IndexMirror&) = delete;

  int device() const { return device_; }
  // Slot `slot` of the host rows was (re)written.
  void RowChanged(size_t slot) { dirty_.push_back(slot); }
  // The host now has `n` rows (slots >= n are gone).
  void Truncate(size_t n) { synced_ = std::min(synced_, n); }
  // Host bytes Sync(n) would upload at most.
  size_t PendingBytes(size_t n) const;
  // Makes device rows [0, n) equal to the host rows.
  Status Sync(size_t n);
  // Device bytes held (matrix capacity, workspace).
  size_t DeviceBytes() const { return capacity_ * row_bytes_ + ws_bytes_ + gather_bytes_; }

  // Scores the candidates (votes, GQA reduction, normalisation, aggregation); the scores stay on
  // the device for the calls below. Needs Sync to have covered every candidate.
  Status Score(const MirrorQuery& q);
  // The best min(k, num_candidates) candidates of the last Score, best first (equal scores: lower
  // candidate index first): (candidate index, score). k in [1, kMaxSearchTopK].
  Status Top(int k, std::vector<std::pair<size_t, float>>* out);
  // Every candidate's score.
  Status AllScores(std::vector<float>* out);
  // Scores of the candidates `which` and, when `votes` is set, their votes [which.size()][U]
  // (U = blocks * nq / group, u = block * (nq / group) + chunk) before normalisation, plus the
  // normalisation statistics per vote into `stats` [U][2] (softmax: max, log Z; z-score: mean,
  // 1 / sd or 0; none: zeros).
  Status Gather(std::span<const size_t> which, std::vector<float>* scores, std::vector<float>* votes,
                std::vector<float>* stats);

 private:
  IndexMirror(int device, const index_internal::RowBlocks* rows, bool f16);
  Status Reserve(size_t rows);
  Status Workspace(size_t bytes);
  Status Staging(size_t bytes);

  int device_;
  const index_internal::RowBlocks* rows_;
  bool f16_;
  size_t row_bytes_;
  void* stream_ = nullptr;  // cudaStream_t
  void* d_rows_ = nullptr;
  size_t capacity_ = 0;  // rows
  size_t synced_ = 0;    // device rows [0, synced_) are current except dirty_ ones
  std::vector<size_t> dirty_;
  void* d_ws_ = nullptr;
  size_t ws_bytes_ = 0;
  void* d_gather_ = nullptr;
  size_t gather_bytes_ = 0;
  void* h_stage_ = nullptr;  // pinned
  size_t stage_bytes_ = 0;
  // The last Score: candidates, votes per candidate, and workspace offsets.
  size_t num_ = 0;
  int votes_ = 0;
  TokenNorm norm_ = TokenNorm::kNone;
  size_t off_votes_ = 0, off_stats_ = 0, off_scores_ = 0, off_topk_ = 0, off_out_ = 0;
};

}  // namespace kvagent::cuda
