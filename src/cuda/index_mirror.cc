#include "cuda/index_mirror.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/index_search.h"

namespace kvagent::cuda {
namespace {

constexpr size_t kAlign = 256;
size_t AlignUp(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// Makes `device` current for the scope and restores the caller's device after (the index must
// not change the calling thread's CUDA state).
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    if (cudaGetDevice(&prev_) != cudaSuccess) prev_ = -1;
    if (prev_ != device) status_ = CudaStatus(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() {
    int cur = -1;
    if (prev_ >= 0 && cudaGetDevice(&cur) == cudaSuccess && cur != prev_) (void)cudaSetDevice(prev_);
  }
  const Status& status() const { return status_; }

 private:
  int prev_ = -1;
  Status status_;
};

cudaStream_t S(void* s) { return static_cast<cudaStream_t>(s); }

}  // namespace

IndexMirror::IndexMirror(int device, const index_internal::RowBlocks* rows, bool f16)
    : device_(device), rows_(rows), f16_(f16), row_bytes_(rows->row_bytes()) {}

IndexMirror::~IndexMirror() {
  DeviceScope scope(device_);
  if (stream_ != nullptr) {
    (void)cudaStreamSynchronize(S(stream_));
    (void)cudaStreamDestroy(S(stream_));
  }
  if (d_rows_ != nullptr) (void)cudaFree(d_rows_);
  if (d_ws_ != nullptr) (void)cudaFree(d_ws_);
  if (d_gather_ != nullptr) (void)cudaFree(d_gather_);
  if (h_stage_ != nullptr) (void)cudaFreeHost(h_stage_);
}

StatusOr<std::unique_ptr<IndexMirror>> IndexMirror::Create(int device, const index_internal::RowBlocks* rows,
                                                           bool f16) {
  KVAGENT_RETURN_IF_ERROR(CheckDevice());
  int count = 0;
  KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaGetDeviceCount(&count), "cudaGetDeviceCount"));
  if (device < 0 || device >= count) {
    return UnavailableError("CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(count) +
                            " visible)");
  }
  std::unique_ptr<IndexMirror> m(new IndexMirror(device, rows, f16));
  DeviceScope scope(device);
  KVAGENT_RETURN_IF_ERROR(scope.status());
  cudaStream_t s = nullptr;
  KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"));
  m->stream_ = s;
  return m;
}

size_t IndexMirror::PendingBytes(size_t n) const {
  return ((n > synced_ ? n - synced_ : 0) + dirty_.size()) * row_bytes_;
}

Status IndexMirror::Reserve(size_t rows) {
  if (rows <= capacity_) return Status::Ok();
  const size_t cap = std::max({rows, 2 * capacity_, size_t{1024}});
  void* p = nullptr;
  KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaMalloc(&p, cap * row_bytes_), "index mirror rows"));
  if (synced_ > 0) {
    const cudaError_t e = cudaMemcpyAsync(p, d_rows_, synced_ * row_bytes_, cudaMemcpyDeviceToDevice, S(stream_));
    if (e != cudaSuccess) {
      (void)cudaFree(p);
      return CudaStatus(e, "index mirror growth");
    }
  }
  KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(S(stream_)), "index mirror growth"));
  if (d_rows_ != nullptr) (void)cudaFree(d_rows_);
  d_rows_ = p;
  capacity_ = cap;
  return Status::Ok();
}

Status IndexMirror::Workspace(size_t bytes) {
  if (bytes <= ws_bytes_) return Status::Ok();
  KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(S(stream_)), "index workspace"));
  const size_t want = std::max(bytes, ws_bytes_ + ws_bytes_ / 4);
  if (d_ws_ != nullptr) (void)cudaFree(d_ws_);
  d_ws_ = nullptr;
  ws_bytes_ = 0;
  KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaMalloc(&d_ws_, want), "index search workspace"));
  ws_bytes_ = want;
  return Status::Ok();
}

Status IndexMirror::Staging(size_t bytes) {
  if (bytes <= stage_bytes_) return Status::Ok();
  KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(S(stream_)), "index staging"));
  if (h_stage_ != nullptr) (void)cudaFreeHost(h_stage_);
  h_stage_ = nullptr;
  stage_bytes_ = 0;
  const size_t want = std::max<size_t>(bytes, 1 << 20);
  KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaHostAlloc(&h_stage_, want, cudaHostAllocDefault), "index staging"));
  stage_bytes_ = want;
  return Status::Ok();
}

Status IndexMirror::Sync(size_t n) {
  if (n <= synced_ && dirty_.empty()) return Status::Ok();
  DeviceScope scope(device_);
  KVAGENT_RETURN_IF_ERROR(scope.status());
  KVAGENT_RETURN_IF_ERROR(Reserve(n));
  auto* dst = static_cast<std::byte*>(d_rows_);
  const size_t per_block = rows_->per_block();
  // Uploads host slots [lo, hi) (split where the host blocks end).
  auto upload = [&](size_t lo, size_t hi) -> Status {
    while (lo < hi) {
      const size_t end = std::min(hi, (lo / per_block + 1) * per_block);
      KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(dst + lo * row_bytes_, rows_->Row(lo), (end - lo) * row_bytes_,
                                                         cudaMemcpyHostToDevice, S(stream_)),
                                         "index mirror upload"));
      lo = end;
    }
    return Status::Ok();
  };
  size_t keep = std::min(synced_, n);  // device rows [0, keep) are current except the dirty ones
  std::sort(dirty_.begin(), dirty_.end());
  dirty_.erase(std::unique(dirty_.begin(), dirty_.end()), dirty_.end());
  dirty_.erase(std::lower_bound(dirty_.begin(), dirty_.end(), keep), dirty_.end());
  if (dirty_.size() > keep / 8 + 64) keep = 0;  // many scattered rows: one pass over everything is cheaper
  if (keep > 0) {
    for (size_t i = 0; i < dirty_.size();) {
      size_t j = i + 1;
      while (j < dirty_.size() && dirty_[j] == dirty_[j - 1] + 1) ++j;
      KVAGENT_RETURN_IF_ERROR(upload(dirty_[i], dirty_[j - 1] + 1));
      i = j;
    }
  }
  KVAGENT_RETURN_IF_ERROR(upload(keep, n));
  // The host rows may change once the index lock is released: finish reading them now.
  KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(S(stream_)), "index mirror upload"));
  dirty_.clear();
  synced_ = n;
  return Status::Ok();
}

Status IndexMirror::Score(const MirrorQuery& q) {
  if (q.num_candidates == 0 || q.num_candidates >= (size_t{1} << 31)) {
    return InvalidArgumentError("device search: candidates must be in [1, 2^31)");
  }
  if (q.group < 1 || q.nq % q.group != 0) return InvalidArgumentError("device search: nq must be a multiple of group");
  if (q.agg != Aggregation::kMean && q.agg != Aggregation::kMax) {
    return UnimplementedError("device search: only mean and max aggregation run on the device");
  }
  DeviceScope scope(device_);
  KVAGENT_RETURN_IF_ERROR(scope.status());
  const size_t n = q.num_candidates;
  const size_t q_elems = static_cast<size_t>(q.blocks) * q.nq * q.width;
  const int scored = q.blocks * q.nq;  // votes before the GQA reduction
  const int votes = scored / q.group;
  // Workspace: q | ids | per-head votes (group > 1) | votes | stats | scores | top-k | top-k out.
  const size_t off_q = 0;
  const size_t off_ids = AlignUp(q_elems * sizeof(float));
  const size_t off_full = off_ids + AlignUp(q.slots != nullptr ? n * sizeof(int32_t) : 0);
  const size_t off_votes = off_full + AlignUp(q.group > 1 ? n * scored * sizeof(float) : 0);
  const size_t off_stats = off_votes + AlignUp(n * votes * sizeof(float));
  const size_t off_scores = off_stats + AlignUp(2 * static_cast<size_t>(votes) * sizeof(float));
  const size_t off_topk = off_scores + AlignUp(n * sizeof(float));
  const size_t off_out = off_topk + AlignUp(TopKWorkspaceBytes(n, kMaxSearchTopK));
  const size_t total = off_out + AlignUp(kMaxSearchTopK * (sizeof(float) + sizeof(int32_t)));
  KVAGENT_RETURN_IF_ERROR(Workspace(total));
  const size_t up = q_elems * sizeof(float) + (q.slots != nullptr ? n * sizeof(int32_t) : 0);
  KVAGENT_RETURN_IF_ERROR(Staging(up));
  auto* ws = static_cast<char*>(d_ws_);
  auto* stage = static_cast<char*>(h_stage_);
  std::memcpy(stage, q.q, q_elems * sizeof(float));
  if (q.slots != nullptr) {
    auto* ids = reinterpret_cast<int32_t*>(stage + q_elems * sizeof(float));
    for (size_t i = 0; i < n; ++i) ids[i] = static_cast<int32_t>(q.slots[i]);
  }
  KVAGENT_RETURN_IF_ERROR(
      CudaStatus(cudaMemcpyAsync(ws + off_q, stage, q_elems * sizeof(float), cudaMemcpyHostToDevice, S(stream_)),
                 "device search upload"));
  if (q.slots != nullptr) {
    KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(ws + off_ids, stage + q_elems * sizeof(float),
                                                       n * sizeof(int32_t), cudaMemcpyHostToDevice, S(stream_)),
                                       "device search upload"));
  }
  const auto* d_ids = q.slots != nullptr ? reinterpret_cast<const int32_t*>(ws + off_ids) : nullptr;
  auto* d_votes = reinterpret_cast<float*>(ws + off_votes);
  auto* d_scored = q.group > 1 ? reinterpret_cast<float*>(ws + off_full) : d_votes;
  KVAGENT_RETURN_IF_ERROR(ScoreVotes(d_rows_, f16_, n, q.blocks, q.width, reinterpret_cast<const float*>(ws + off_q),
                                     q.nq, d_scored, S(stream_), d_ids));
  if (q.group > 1) {
    KVAGENT_RETURN_IF_ERROR(ReduceHeadVotes(d_scored, n, votes, q.group, q.reduce, d_votes, S(stream_)));
  }
  auto* d_stats = reinterpret_cast<float*>(ws + off_stats);
  if (q.norm == TokenNorm::kNone) {
    KVAGENT_RETURN_IF_ERROR(
        CudaStatus(cudaMemsetAsync(d_stats, 0, 2 * static_cast<size_t>(votes) * sizeof(float), S(stream_)), "stats"));
  }
  KVAGENT_RETURN_IF_ERROR(VoteStats(d_votes, n, votes, q.norm, d_stats, S(stream_)));
  KVAGENT_RETURN_IF_ERROR(
      AggregateVotes(d_votes, n, votes, q.norm, q.agg, d_stats, reinterpret_cast<float*>(ws + off_scores), S(stream_)));
  num_ = n;
  votes_ = votes;
  norm_ = q.norm;
  off_votes_ = off_votes;
  off_stats_ = off_stats;
  off_scores_ = off_scores;
  off_topk_ = off_topk;
  off_out_ = off_out;
  return Status::Ok();
}

Status IndexMirror::Top(int k, std::vector<std::pair<size_t, float>>* out) {
  if (num_ == 0) return FailedPreconditionError("device search: Top before Score");
  DeviceScope scope(device_);
  KVAGENT_RETURN_IF_ERROR(scope.status());
  auto* ws = static_cast<char*>(d_ws_);
  auto* out_s = reinterpret_cast<float*>(ws + off_out_);
  auto* out_r = reinterpret_cast<int32_t*>(out_s + kMaxSearchTopK);
  KVAGENT_RETURN_IF_ERROR(TopKRows(reinterpret_cast<const float*>(ws + off_scores_), num_, k, ws + off_topk_,
                                   off_out_ - off_topk_, out_s, out_r, S(stream_)));
  const size_t count = std::min<size_t>(k, num_);
  KVAGENT_RETURN_IF_ERROR(Staging(count * (sizeof(float) + sizeof(int32_t))));
  auto* hs = static_cast<float*>(h_stage_);
  auto* hr = reinterpret_cast<int32_t*>(hs + count);
  KVAGENT_RETURN_IF_ERROR(CudaStatus(
      cudaMemcpyAsync(hs, out_s, count * sizeof(float), cudaMemcpyDeviceToHost, S(stream_)), "device top-k"));
  KVAGENT_RETURN_IF_ERROR(CudaStatus(
      cudaMemcpyAsync(hr, out_r, count * sizeof(int32_t), cudaMemcpyDeviceToHost, S(stream_)), "device top-k"));
  KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(S(stream_)), "device search"));
  out->resize(count);
  for (size_t i = 0; i < count; ++i) (*out)[i] = {static_cast<size_t>(hr[i]), hs[i]};
  return Status::Ok();
}

Status IndexMirror::AllScores(std::vector<float>* out) {
  if (num_ == 0) return FailedPreconditionError("device search: AllScores before Score");
  DeviceScope scope(device_);
  KVAGENT_RETURN_IF_ERROR(scope.status());
  KVAGENT_RETURN_IF_ERROR(Staging(num_ * sizeof(float)));
  KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(h_stage_, static_cast<char*>(d_ws_) + off_scores_,
                                                     num_ * sizeof(float), cudaMemcpyDeviceToHost, S(stream_)),
                                     "device scores"));
  KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(S(stream_)), "device search"));
  const auto* hs = static_cast<const float*>(h_stage_);
  out->assign(hs, hs + num_);
  return Status::Ok();
}

Status IndexMirror::Gather(std::span<const size_t> which, std::vector<float>* scores, std::vector<float>* votes,
                           std::vector<float>* stats) {
  if (num_ == 0) return FailedPreconditionError("device search: Gather before Score");
  scores->clear();
  if (votes != nullptr) votes->clear();
  if (which.empty()) return Status::Ok();
  DeviceScope scope(device_);
  KVAGENT_RETURN_IF_ERROR(scope.status());
  const size_t count = which.size();
  const size_t U = static_cast<size_t>(votes_);
  const size_t vote_elems = votes != nullptr ? count * U : 0;
  // Device: ids | scores | votes; host staging: ids, then scores | votes | stats.
  const size_t off_s = AlignUp(count * sizeof(int32_t));
  const size_t off_v = off_s + AlignUp(count * sizeof(float));
  const size_t need = off_v + AlignUp(vote_elems * sizeof(float));
  if (need > gather_bytes_) {
    KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(S(stream_)), "gather"));
    if (d_gather_ != nullptr) (void)cudaFree(d_gather_);
    d_gather_ = nullptr;
    gather_bytes_ = 0;
    KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaMalloc(&d_gather_, need), "device search gather"));
    gather_bytes_ = need;
  }
  const size_t down = (count + vote_elems + 2 * U) * sizeof(float);
  KVAGENT_RETURN_IF_ERROR(Staging(std::max(down, count * sizeof(int32_t))));
  auto* hid = static_cast<int32_t*>(h_stage_);
  for (size_t k = 0; k < count; ++k) hid[k] = static_cast<int32_t>(which[k]);
  auto* g = static_cast<char*>(d_gather_);
  KVAGENT_RETURN_IF_ERROR(CudaStatus(
      cudaMemcpyAsync(g, hid, count * sizeof(int32_t), cudaMemcpyHostToDevice, S(stream_)), "gather upload"));
  auto* ws = static_cast<char*>(d_ws_);
  KVAGENT_RETURN_IF_ERROR(GatherRows(
      reinterpret_cast<const float*>(ws + off_votes_), reinterpret_cast<const float*>(ws + off_scores_), num_, votes_,
      reinterpret_cast<const int32_t*>(g), static_cast<int>(count), reinterpret_cast<float*>(g + off_s),
      votes != nullptr ? reinterpret_cast<float*>(g + off_v) : nullptr, S(stream_)));
  // The ids in the staging buffer must reach the device before the results overwrite them.
  KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(S(stream_)), "gather"));
  auto* hs = static_cast<float*>(h_stage_);
  KVAGENT_RETURN_IF_ERROR(
      CudaStatus(cudaMemcpyAsync(hs, g + off_s, count * sizeof(float), cudaMemcpyDeviceToHost, S(stream_)), "gather"));
  if (votes != nullptr) {
    KVAGENT_RETURN_IF_ERROR(CudaStatus(
        cudaMemcpyAsync(hs + count, g + off_v, vote_elems * sizeof(float), cudaMemcpyDeviceToHost, S(stream_)),
        "gather"));
  }
  KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(hs + count + vote_elems, ws + off_stats_, 2 * U * sizeof(float),
                                                     cudaMemcpyDeviceToHost, S(stream_)),
                                     "gather"));
  KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(S(stream_)), "device search"));
  scores->assign(hs, hs + count);
  if (votes != nullptr) votes->assign(hs + count, hs + count + vote_elems);
  if (stats != nullptr) stats->assign(hs + count + vote_elems, hs + count + vote_elems + 2 * U);
  return Status::Ok();
}

}  // namespace kvagent::cuda
