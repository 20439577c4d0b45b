// Stage 1 of LatentIndex's two-stage search (internal to src/index): a cheap proxy score per
// candidate and the choice of the rows the exact stage scores.
#pragma once

#include <cstddef>
#include <span>
#include <vector>

namespace kvagent::index_internal {

// proxy[i] = sum_b (p_ib - mean_b) / sd_b with p_ib = dot(block b of rows[i], q + b * w), a row
// being `nblocks` contiguous blocks of w elements (f16 bits when `f16`, else f32); mean_b and sd_b
// over all i. A b whose sd is ~0 (relative to its mean) adds nothing. Runs on up to `threads`
// threads.
std::vector<float> ProxyScores(std::span<const std::byte* const> rows, int nblocks, bool f16, const float* q, int w,
                               int threads);

struct RescoreRows {
  std::vector<size_t> rows;    // ascending indices into the candidates
  std::vector<double> weight;  // candidates each row stands for in the normalisation (>= 1)
};

// Every pinned candidate, the best `keep` others by proxy (ties: lower index) with weight 1, and
// up to `sample` of the remaining ones, evenly spaced by index, each with weight remaining / sample
// (so the weights sum to proxy.size() unless sample is 0 and some remain).
RescoreRows ChooseRows(std::span<const float> proxy, std::span<const char> pinned, size_t keep, size_t sample);

}  // namespace kvagent::index_internal
