// Mean and deviation of a column from per-thread partial sums (internal to src/index).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

namespace kvagent::index_internal {

struct Standardiser {
  float mean = 0;
  float inv_sd = 0;  // 0 when the deviation is below rel_eps * max(1, |mean|): no spread
};

// Column `col` of sum[t][col] (sums of x) and sq[t][col] (sums of x^2) over threads t, for a total
// weight `n` > 0.
inline Standardiser MergeMoments(const std::vector<std::vector<double>>& sum,
                                 const std::vector<std::vector<double>>& sq, size_t col, double n, double rel_eps) {
  double s = 0, s2 = 0;
  for (size_t t = 0; t < sum.size(); ++t) {
    s += sum[t][col];
    s2 += sq[t][col];
  }
  const double mean = s / n;
  const double sd = std::sqrt(std::max(0.0, s2 / n - mean * mean));
  return {static_cast<float>(mean),
          sd > rel_eps * std::max(1.0, std::fabs(mean)) ? static_cast<float>(1.0 / sd) : 0.0f};
}

}  // namespace kvagent::index_internal
