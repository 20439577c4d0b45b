#include "cuda/index_search.h"

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/search_kernels.cuh"

namespace kvagent::cuda {

namespace sk = ::kvagent::cuda::search_kernels;

namespace {

constexpr size_t kMaxRows = size_t{1} << 31;   // exclusive: rows are returned as int32
constexpr size_t kMaxVotes = size_t{1} << 56;  // num_rows * U: keeps every byte count far from overflow
constexpr size_t kRegionAlign = 256;           // workspace regions start on 256-byte boundaries
constexpr size_t kWorkspaceAlign = 16;         // required of caller workspaces
constexpr int kMaxBlocks = 65535;              // gridDim.y of the dot-product kernel

size_t AlignUp(size_t x) { return (x + kRegionAlign - 1) / kRegionAlign * kRegionAlign; }
bool Aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

Status CheckVotesShape(size_t num_rows, int blocks, int width, int nq, const char* what) {
  const std::string w = what;
  if (num_rows >= kMaxRows) return InvalidArgumentError(w + ": num_rows must be < 2^31");
  if (blocks < 1 || blocks > kMaxBlocks) return InvalidArgumentError(w + ": blocks must be in [1, 65535]");
  if (width < 1) return InvalidArgumentError(w + ": width must be >= 1");
  if (nq < 1 || nq > kMaxBlocks * sk::kDotQueryTile) return InvalidArgumentError(w + ": nq must be in [1, 2097120]");
  const int64_t votes = int64_t{blocks} * nq;
  if (votes > INT32_MAX) return InvalidArgumentError(w + ": blocks * nq must be < 2^31");
  if (num_rows > kMaxVotes / static_cast<size_t>(votes)) {
    return InvalidArgumentError(w + ": num_rows * blocks * nq must be <= 2^56");
  }
  return Status::Ok();
}

Status CheckNorm(TokenNorm norm, const char* what) {
  if (static_cast<int>(norm) > static_cast<int>(TokenNorm::kZScore)) {
    return InvalidArgumentError(std::string(what) + ": unknown norm");
  }
  return Status::Ok();
}

Status CheckAgg(Aggregation agg, const char* what) {
  if (agg == Aggregation::kTopP)
    return UnimplementedError(std::string(what) + ": top_p aggregation is not implemented");
  if (agg != Aggregation::kMean && agg != Aggregation::kMax) {
    return InvalidArgumentError(std::string(what) + ": unknown aggregation");
  }
  return Status::Ok();
}

Status CheckTopK(size_t n, int k, const char* what) {
  if (n >= kMaxRows) return InvalidArgumentError(std::string(what) + ": n must be < 2^31");
  if (k < 1 || k > kMaxSearchTopK) return InvalidArgumentError(std::string(what) + ": top_k must be in [1, 1024]");
  return Status::Ok();
}

Status CheckWorkspace(const void* ws, size_t have, size_t need, const char* what) {
  if (ws == nullptr) return InvalidArgumentError(std::string(what) + ": null workspace");
  if (!Aligned(ws, kWorkspaceAlign)) return InvalidArgumentError(std::string(what) + ": workspace not 16-byte aligned");
  if (have < need) {
    return InvalidArgumentError(std::string(what) + ": workspace of " + std::to_string(have) + " bytes, needs " +
                                std::to_string(need));
  }
  return Status::Ok();
}

sk::Norm ToKernel(TokenNorm n) { return static_cast<sk::Norm>(static_cast<int>(n)); }
sk::Agg ToKernel(Aggregation a) { return a == Aggregation::kMax ? sk::Agg::kMax : sk::Agg::kMean; }

// Byte offsets of SearchRows' workspace regions.
struct Layout {
  size_t stats = 0;
  size_t scores = 0;
  size_t topk = 0;
  size_t total = 0;
};

Layout MakeLayout(size_t num_rows, size_t votes, int top_k) {
  Layout l;
  l.stats = AlignUp(num_rows * votes * sizeof(float));
  l.scores = l.stats + AlignUp(votes * 2 * sizeof(float));
  l.topk = l.scores + AlignUp(num_rows * sizeof(float));
  l.total = l.topk + TopKWorkspaceBytes(num_rows, top_k);
  return l;
}

Status CheckSearch(const RowSearch& s) {
  KVAGENT_RETURN_IF_ERROR(CheckVotesShape(s.num_rows, s.blocks, s.width, s.nq, "SearchRows"));
  KVAGENT_RETURN_IF_ERROR(CheckNorm(s.norm, "SearchRows"));
  KVAGENT_RETURN_IF_ERROR(CheckAgg(s.agg, "SearchRows"));
  return CheckTopK(s.num_rows, s.top_k, "SearchRows");
}

}  // namespace

Status ScoreVotes(const void* rows, bool f16, size_t num_rows, int blocks, int width, const float* q, int nq,
                  float* votes, Stream stream, const int32_t* row_ids) {
  KVAGENT_RETURN_IF_ERROR(CheckVotesShape(num_rows, blocks, width, nq, "ScoreVotes"));
  if (num_rows == 0) return Status::Ok();
  if (rows == nullptr || q == nullptr || votes == nullptr) return InvalidArgumentError("ScoreVotes: null pointer");
  if (!Aligned(rows, f16 ? 2 : 4) || !Aligned(q, 4) || !Aligned(votes, 4) || !Aligned(row_ids, 4)) {
    return InvalidArgumentError("ScoreVotes: pointer not aligned to its element size");
  }
  KVAGENT_RETURN_IF_ERROR(CheckDevice());
  const int vec = f16 ? 8 : 4;
  const int use_vec = width % vec == 0 && Aligned(rows, 16) ? vec : 1;
  return CudaStatus(sk::LaunchScoreVotes(rows, f16, num_rows, blocks, width, q, nq, use_vec, votes, stream, row_ids),
                    "ScoreVotes");
}

Status ReduceHeadVotes(const float* in, size_t num_rows, int groups, int group, HeadReduce reduce, float* out,
                       Stream stream) {
  if (num_rows >= kMaxRows || groups < 1 || group < 1 || int64_t{groups} * group > INT32_MAX) {
    return InvalidArgumentError("ReduceHeadVotes: num_rows must be < 2^31, groups and group >= 1");
  }
  if (reduce != HeadReduce::kMeanScore && reduce != HeadReduce::kMaxScore) {
    return InvalidArgumentError("ReduceHeadVotes: reduce must be kMeanScore or kMaxScore");
  }
  if (num_rows == 0) return Status::Ok();
  if (in == nullptr || out == nullptr) return InvalidArgumentError("ReduceHeadVotes: null pointer");
  if (!Aligned(in, 4) || !Aligned(out, 4)) return InvalidArgumentError("ReduceHeadVotes: misaligned pointer");
  KVAGENT_RETURN_IF_ERROR(CheckDevice());
  return CudaStatus(sk::LaunchReduceHeads(in, num_rows, groups, group, reduce == HeadReduce::kMaxScore, out, stream),
                    "ReduceHeadVotes");
}

Status GatherRows(const float* votes, const float* scores, size_t num_rows, int num_votes, const int32_t* ids,
                  int count, float* out_scores, float* out_votes, Stream stream) {
  if (num_rows >= kMaxRows || num_votes < 1 || count < 0) {
    return InvalidArgumentError("GatherRows: num_rows must be < 2^31, num_votes >= 1, count >= 0");
  }
  if (count == 0) return Status::Ok();
  if (scores == nullptr || ids == nullptr || out_scores == nullptr || (out_votes != nullptr && votes == nullptr)) {
    return InvalidArgumentError("GatherRows: null pointer");
  }
  if (!Aligned(votes, 4) || !Aligned(scores, 4) || !Aligned(ids, 4) || !Aligned(out_scores, 4) ||
      !Aligned(out_votes, 4)) {
    return InvalidArgumentError("GatherRows: misaligned pointer");
  }
  KVAGENT_RETURN_IF_ERROR(CheckDevice());
  return CudaStatus(sk::LaunchGatherRows(votes, scores, num_rows, num_votes, ids, count, out_scores, out_votes, stream),
                    "GatherRows");
}

Status VoteStats(const float* votes, size_t num_rows, int num_votes, TokenNorm norm, float* stats, Stream stream) {
  KVAGENT_RETURN_IF_ERROR(CheckNorm(norm, "VoteStats"));
  if (num_rows >= kMaxRows || num_votes < 1) {
    return InvalidArgumentError("VoteStats: num_rows must be < 2^31 and num_votes >= 1");
  }
  if (norm == TokenNorm::kNone || num_rows == 0) return Status::Ok();
  if (votes == nullptr || stats == nullptr) return InvalidArgumentError("VoteStats: null pointer");
  if (!Aligned(votes, 4) || !Aligned(stats, 4)) return InvalidArgumentError("VoteStats: misaligned pointer");
  KVAGENT_RETURN_IF_ERROR(CheckDevice());
  return CudaStatus(sk::LaunchVoteStats(votes, num_rows, num_votes, ToKernel(norm), stats, stream), "VoteStats");
}

Status AggregateVotes(const float* votes, size_t num_rows, int num_votes, TokenNorm norm, Aggregation agg,
                      const float* stats, float* scores, Stream stream) {
  KVAGENT_RETURN_IF_ERROR(CheckNorm(norm, "AggregateVotes"));
  KVAGENT_RETURN_IF_ERROR(CheckAgg(agg, "AggregateVotes"));
  if (num_rows >= kMaxRows || num_votes < 1) {
    return InvalidArgumentError("AggregateVotes: num_rows must be < 2^31 and num_votes >= 1");
  }
  if (num_rows == 0) return Status::Ok();
  if (votes == nullptr || scores == nullptr || (norm != TokenNorm::kNone && stats == nullptr)) {
    return InvalidArgumentError("AggregateVotes: null pointer");
  }
  if (!Aligned(votes, 4) || !Aligned(scores, 4) || !Aligned(stats, 4)) {
    return InvalidArgumentError("AggregateVotes: misaligned pointer");
  }
  KVAGENT_RETURN_IF_ERROR(CheckDevice());
  return CudaStatus(
      sk::LaunchAggregate(votes, num_rows, num_votes, ToKernel(norm), ToKernel(agg), stats, scores, stream),
      "AggregateVotes");
}

size_t TopKWorkspaceBytes(size_t n, int k) {
  if (n == 0 || k < 1) return 0;
  return 2 * AlignUp(sk::TopKCandidates(n, k) * sizeof(uint64_t));
}

Status TopKRows(const float* scores, size_t n, int k, void* workspace, size_t workspace_bytes, float* out_scores,
                int32_t* out_rows, Stream stream) {
  KVAGENT_RETURN_IF_ERROR(CheckTopK(n, k, "TopKRows"));
  if (n == 0) return Status::Ok();
  if (scores == nullptr || out_scores == nullptr || out_rows == nullptr) {
    return InvalidArgumentError("TopKRows: null pointer");
  }
  if (!Aligned(scores, 4) || !Aligned(out_scores, 4) || !Aligned(out_rows, 4)) {
    return InvalidArgumentError("TopKRows: misaligned pointer");
  }
  KVAGENT_RETURN_IF_ERROR(CheckWorkspace(workspace, workspace_bytes, TopKWorkspaceBytes(n, k), "TopKRows"));
  KVAGENT_RETURN_IF_ERROR(CheckDevice());
  auto* cand_a = static_cast<uint64_t*>(workspace);
  auto* cand_b =
      reinterpret_cast<uint64_t*>(static_cast<char*>(workspace) + AlignUp(sk::TopKCandidates(n, k) * sizeof(uint64_t)));
  return CudaStatus(sk::LaunchTopK(scores, n, k, cand_a, cand_b, out_scores, out_rows, stream), "TopKRows");
}

StatusOr<size_t> SearchRowsWorkspaceBytes(const RowSearch& s) {
  KVAGENT_RETURN_IF_ERROR(CheckSearch(s));
  if (s.num_rows == 0) return size_t{0};
  return MakeLayout(s.num_rows, static_cast<size_t>(s.blocks) * s.nq, s.top_k).total;
}

Status SearchRows(const RowSearch& s, void* workspace, size_t workspace_bytes, float* out_scores, int32_t* out_rows,
                  Stream stream) {
  KVAGENT_RETURN_IF_ERROR(CheckSearch(s));
  if (s.num_rows == 0) return Status::Ok();
  if (s.rows == nullptr || s.q == nullptr || out_scores == nullptr || out_rows == nullptr) {
    return InvalidArgumentError("SearchRows: null pointer");
  }
  if (!Aligned(s.rows, s.f16 ? 2 : 4) || !Aligned(s.q, 4) || !Aligned(out_scores, 4) || !Aligned(out_rows, 4)) {
    return InvalidArgumentError("SearchRows: pointer not aligned to its element size");
  }
  const int votes = s.blocks * s.nq;
  const Layout l = MakeLayout(s.num_rows, static_cast<size_t>(votes), s.top_k);
  KVAGENT_RETURN_IF_ERROR(CheckWorkspace(workspace, workspace_bytes, l.total, "SearchRows"));
  KVAGENT_RETURN_IF_ERROR(CheckDevice());
  char* ws = static_cast<char*>(workspace);
  auto* r = reinterpret_cast<float*>(ws);
  auto* stats = reinterpret_cast<float*>(ws + l.stats);
  auto* scores = reinterpret_cast<float*>(ws + l.scores);
  KVAGENT_RETURN_IF_ERROR(ScoreVotes(s.rows, s.f16, s.num_rows, s.blocks, s.width, s.q, s.nq, r, stream));
  KVAGENT_RETURN_IF_ERROR(VoteStats(r, s.num_rows, votes, s.norm, stats, stream));
  KVAGENT_RETURN_IF_ERROR(AggregateVotes(r, s.num_rows, votes, s.norm, s.agg, stats, scores, stream));
  return TopKRows(scores, s.num_rows, s.top_k, ws + l.topk, l.total - l.topk, out_scores, out_rows, stream);
}

}  // namespace kvagent::cuda
