// Naive double-precision RoPE reference for the tests: HF's formulas evaluated in double, and a
// rotation of one [dim] row at one angle set, written for clarity rather than speed.
#pragma once

#include <algorithm>
#include <cmath>
#include <numbers>
#include <vector>

#include "kvagent/rope.h"

namespace kvagent::testing {

inline std::vector<double> ReferenceInvFreq(const RopeSpec& s, int head_dim) {
  const int dim = s.rotary_dim == 0 ? head_dim : s.rotary_dim;
  const int half = dim / 2;
  double base = s.theta;
  if (s.scaling == RopeScaling::kDynamicNtk) {
    const double seq = static_cast<double>(std::max(s.dynamic_max_position, s.original_max_position));
    const double orig = static_cast<double>(s.original_max_position);
    base *= std::pow(s.factor * seq / orig - (s.factor - 1), static_cast<double>(dim) / (dim - 2));
  }
  std::vector<double> f(half);
  for (int i = 0; i < half; ++i) f[i] = 1.0 / std::pow(base, 2.0 * i / dim);
  switch (s.scaling) {
    case RopeScaling::kLinear:
      for (double& v : f) v /= s.factor;
      break;
    case RopeScaling::kLlama3: {
      const double old_ctx = static_cast<double>(s.original_max_position);
      for (double& v : f) {
        const double wavelen = 2 * std::numbers::pi / v;
        if (wavelen > old_ctx / s.low_freq_factor) {
          v /= s.factor;
        } else if (wavelen >= old_ctx / s.high_freq_factor) {
          const double smooth = (old_ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
          v = (1 - smooth) * v / s.factor + smooth * v;
        }
      }
      break;
    }
    case RopeScaling::kYarn: {
      auto corr = [&](double rot) {
        return dim * std::log(s.original_max_position / (rot * 2 * std::numbers::pi)) / (2 * std::log(s.theta));
      };
      double low = std::max(std::floor(corr(s.beta_fast)), 0.0);
      double high = std::min(std::ceil(corr(s.beta_slow)), static_cast<double>(dim - 1));
      if (low == high) high += 0.001;
      for (int i = 0; i < half; ++i) {
        const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
        const double extra = 1 - ramp;  // share of the unscaled (extrapolated) frequency
        f[i] = f[i] / s.factor * (1 - extra) + f[i] * extra;
      }
      break;
    }
    default:
      break;
  }
  return f;
}

// Rotates `x` (one row of head_dim values) by angles positions*inv_freq, times `scale`;
// `inverse` rotates the other way.
inline std::vector<double> ReferenceRotate(const std::vector<double>& x, const std::vector<float>& inv_freq,
                                           RopeStyle style, double position, double scale, bool inverse) {
  std::vector<double> y = x;
  const int half = static_cast<int>(inv_freq.size());
  for (int i = 0; i < half; ++i) {
    const double a = position * static_cast<double>(inv_freq[i]);
    const double c = std::cos(a) * scale;
    const double s = std::sin(a) * scale * (inverse ? -1 : 1);
    const int i0 = style == RopeStyle::kHalfSplit ? i : 2 * i;
    const int i1 = style == RopeStyle::kHalfSplit ? i + half : 2 * i + 1;
    y[i0] = x[i0] * c - x[i1] * s;
    y[i1] = x[i1] * c + x[i0] * s;
  }
  return y;
}

}  // namespace kvagent::testing
