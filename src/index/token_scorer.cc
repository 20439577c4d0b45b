#include "index/token_scorer.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "index/parallel_for.h"
#include "index/score_kernel.h"
#include "kvagent/dtype.h"

namespace kvagent::index_internal {
namespace {

// Attention mass per block of one head, averaged over its queries (added to `acc`, weighted).
void ScoreHead(std::span<const TokenBlock> blocks, std::span<const double> row_weight, int D, const TokenHead& h,
               DotRows2Fn dot2, std::vector<float>& logits, std::vector<double>& block_sum, double* acc) {
  const int nq = h.num_queries;
  size_t total_tokens = 0;
  for (const TokenBlock& b : blocks) total_tokens += b.num_tokens;
  logits.resize(total_tokens * nq);
  // logits[n][t] = q_t . k_n, two key rows at a time (each query vector loaded once for both).
  size_t n = 0;
  std::vector<float> spare(nq);
  for (const TokenBlock& b : blocks) {
    const uint16_t* k = b.keys + static_cast<size_t>(h.pair) * b.num_tokens * D;
    for (int t = 0; t < b.num_tokens; t += 2, n += 2) {
      const bool pair = t + 1 < b.num_tokens;
      dot2(k + static_cast<size_t>(t) * D, pair ? k + static_cast<size_t>(t + 1) * D : k + static_cast<size_t>(t) * D,
           true, h.q, nq, D, logits.data() + n * nq, pair ? logits.data() + (n + 1) * nq : spare.data());
      if (!pair) --n;
    }
  }
  std::vector<float> shift(nq, -std::numeric_limits<float>::infinity());
  for (size_t i = 0; i < total_tokens; ++i) {
    const float* x = logits.data() + i * nq;
    for (int t = 0; t < nq; ++t) shift[t] = std::max(shift[t], x[t]);
  }
  // exp in place, per-block sums per query, then the weighted denominators.
  block_sum.assign(blocks.size() * nq, 0.0);
  std::vector<double> denom(nq, 0.0);
  n = 0;
  for (size_t bi = 0; bi < blocks.size(); ++bi) {
    double* bs = block_sum.data() + bi * nq;
    for (int t = 0; t < blocks[bi].num_tokens; ++t, ++n) {
      float* x = logits.data() + n * nq;
      ExpShifted(x, shift.data(), nq);
      for (int j = 0; j < nq; ++j) bs[j] += x[j];
    }
    const double w = row_weight.empty() ? 1.0 : row_weight[bi];
    for (int j = 0; j < nq; ++j) denom[j] += w * bs[j];
  }
  const double scale = static_cast<double>(h.weight) / nq;
  for (size_t bi = 0; bi < blocks.size(); ++bi) {
    const double* bs = block_sum.data() + bi * nq;
    double m = 0;
    for (int j = 0; j < nq; ++j) m += bs[j] / denom[j];  // denom >= 1: the maximum contributes exp(0)
    acc[bi] += scale * m;
  }
}

}  // namespace

std::vector<float> TokenAttentionScores(std::span<const TokenBlock> blocks, std::span<const double> row_weight,
                                        int head_dim, std::span<const TokenHead> heads, int threads) {
  const size_t S = blocks.size();
  const DotRows2Fn dot2 = SelectDotRows2(head_dim);
  // Per-head partial sums, reduced in head order so the result is independent of `threads`.
  std::vector<std::vector<double>> per_head(heads.size(), std::vector<double>(S, 0.0));
  ParallelFor(heads.size(), std::max(1, std::min<int>(threads, static_cast<int>(heads.size()))),
              [&](size_t lo, size_t hi, int) {
                std::vector<float> logits;
                std::vector<double> block_sum;
                for (size_t h = lo; h < hi; ++h) {
                  ScoreHead(blocks, row_weight, head_dim, heads[h], dot2, logits, block_sum, per_head[h].data());
                }
              });
  std::vector<float> out(S, 0.0f);
  for (size_t i = 0; i < S; ++i) {
    double s = 0;
    for (const auto& ph : per_head) s += ph[i];
    out[i] = static_cast<float>(s);
  }
  return out;
}

std::vector<float> TokenAttentionScoresReference(std::span<const TokenBlock> blocks,
                                                 std::span<const double> row_weight, int head_dim,
                                                 std::span<const TokenHead> heads) {
  std::vector<double> score(blocks.size(), 0.0);
  for (const TokenHead& h : heads) {
    for (int t = 0; t < h.num_queries; ++t) {
      const float* q = h.q + static_cast<size_t>(t) * head_dim;
      std::vector<std::vector<double>> logit(blocks.size());
      double mx = -std::numeric_limits<double>::infinity();
      for (size_t i = 0; i < blocks.size(); ++i) {
        const uint16_t* k = blocks[i].keys + static_cast<size_t>(h.pair) * blocks[i].num_tokens * head_dim;
        for (int n = 0; n < blocks[i].num_tokens; ++n) {
          double d = 0;
          for (int j = 0; j < head_dim; ++j) d += double{q[j]} * F16ToF32(k[static_cast<size_t>(n) * head_dim + j]);
          logit[i].push_back(d);
          mx = std::max(mx, d);
        }
      }
      std::vector<double> mass(blocks.size(), 0.0);
      double z = 0;
      for (size_t i = 0; i < blocks.size(); ++i) {
        for (double d : logit[i]) mass[i] += std::exp(d - mx);
        z += (row_weight.empty() ? 1.0 : row_weight[i]) * mass[i];
      }
      for (size_t i = 0; i < blocks.size(); ++i) score[i] += h.weight * mass[i] / z / h.num_queries;
    }
  }
  return std::vector<float>(score.begin(), score.end());
}

}  // namespace kvagent::index_internal
