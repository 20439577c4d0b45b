#include "index/prefilter.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>

#include "index/moments.h"
#include "index/parallel_for.h"
#include "index/score_kernel.h"

namespace kvagent::index_internal {

std::vector<float> ProxyScores(std::span<const std::byte* const> rows, int nblocks, bool f16, const float* q, int w,
                               int threads) {
  const size_t S = rows.size();
  const size_t B = nblocks;
  std::unique_ptr<float[]> p(new float[S * B]);  // every element is written below
  std::vector<std::vector<double>> t_sum(threads, std::vector<double>(B, 0.0));
  std::vector<std::vector<double>> t_sq(threads, std::vector<double>(B, 0.0));
  const auto dot = SelectDotRows(w);
  // One row at a time, blocks in order: the sweep is bound by memory bandwidth, and a sequential
  // read keeps the hardware prefetcher streaming (interleaving two rows' blocks halved the rate).
  ParallelFor(S, threads, [&](size_t lo, size_t hi, int t) {
    double* sm = t_sum[t].data();
    double* sq = t_sq[t].data();
    const size_t block_bytes = static_cast<size_t>(w) * (f16 ? 2 : 4);
    for (size_t i = lo; i < hi; ++i) {
      float* out = p.get() + i * B;
      for (size_t b = 0; b < B; ++b) {
        dot(rows[i] + b * block_bytes, f16, q + b * w, 1, w, out + b);
        sm[b] += out[b];
        sq[b] += static_cast<double>(out[b]) * out[b];
      }
    }
  });
  // Summing z-scores = summing p_ib / sd_b (the means shift every candidate alike, but are kept so
  // the proxy stays centred).
  std::vector<Standardiser> z(B);
  for (size_t b = 0; b < B; ++b) z[b] = MergeMoments(t_sum, t_sq, b, static_cast<double>(S), 1e-6);
  std::vector<float> proxy(S);
  ParallelFor(S, threads, [&](size_t lo, size_t hi, int) {
    for (size_t i = lo; i < hi; ++i) {
      const float* x = p.get() + i * B;
      float acc = 0;
      for (size_t b = 0; b < B; ++b) acc += (x[b] - z[b].mean) * z[b].inv_sd;
      proxy[i] = acc;
    }
  });
  return proxy;
}

RescoreRows ChooseRows(std::span<const float> proxy, std::span<const char> pinned, size_t keep, size_t sample) {
  const size_t S = proxy.size();
  std::vector<size_t> others;
  others.reserve(S);
  for (size_t i = 0; i < S; ++i) {
    if (!pinned[i]) others.push_back(i);
  }
  keep = std::min(keep, others.size());
  auto better = [&](size_t a, size_t b) { return proxy[a] != proxy[b] ? proxy[a] > proxy[b] : a < b; };
  std::nth_element(others.begin(), others.begin() + keep, others.end(), better);
  std::vector<char> role(pinned.begin(), pinned.end());  // 1 = scored with weight 1, 2 = sample
  for (size_t k = 0; k < keep; ++k) role[others[k]] = 1;
  const size_t rest = others.size() - keep;
  sample = std::min(sample, rest);
  const double rest_weight = sample ? static_cast<double>(rest) / sample : 0.0;
  // The j-th sample is the ((2j + 1) * rest / (2 * sample))-th remaining candidate by index.
  size_t seen = 0, j = 0;
  for (size_t i = 0; i < S && j < sample; ++i) {
    if (role[i] != 0) continue;
    if (seen++ == (2 * j + 1) * rest / (2 * sample)) {
      role[i] = 2;
      ++j;
    }
  }
  RescoreRows out;
  for (size_t i = 0; i < S; ++i) {
    if (role[i] == 0) continue;
    out.rows.push_back(i);
    out.weight.push_back(role[i] == 1 ? 1.0 : rest_weight);
  }
  return out;
}

}  // namespace kvagent::index_internal
