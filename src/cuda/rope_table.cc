#include <algorithm>
#include <cmath>
#include <string>

#include "kvagent/cuda_kv.h"

namespace kvagent::cuda {

namespace {

constexpr double kPi = 3.14159265358979323846;

// HF's yarn helpers (find_correction_dim / find_correction_range / linear_ramp_factor), in double.
double CorrectionDim(double num_rotations, int dim, double base, double max_pos) {
  return (dim * std::log(max_pos / (num_rotations * 2 * kPi))) / (2 * std::log(base));
}

}  // namespace

StatusOr<RopeTable> ComputeRopeTable(const RopeSpec& spec, int head_dim) {
  RopeTable t;
  t.style = spec.style;
  if (!spec.enabled) return t;
  if (head_dim <= 0) return InvalidArgumentError("head_dim must be positive");
  const int rd = spec.rotary_dim == 0 ? head_dim : spec.rotary_dim;
  if (rd <= 0 || rd % 2 != 0 || rd > head_dim)
    return InvalidArgumentError("rotary_dim " + std::to_string(rd) +
                                " must be even and in [2, head_dim=" + std::to_string(head_dim) + "]");
  if (!(spec.theta > 1.0)) return InvalidArgumentError("rope theta must be > 1");
  const bool needs_factor = spec.scaling != RopeScaling::kNone;
  if (needs_factor && !(spec.factor > 0.0 && std::isfinite(spec.factor)))
    return InvalidArgumentError("rope scaling factor must be positive, got " + std::to_string(spec.factor));
  t.rotary_dim = rd;
  const int n = rd / 2;
  double base = spec.theta;
  if (spec.scaling == RopeScaling::kDynamicNtk) {
    // HF uses max(seq_len, original_max_position); a fixed sequence length keeps keys stable.
    const double orig = static_cast<double>(spec.original_max_position);
    const double seq = std::max<double>(static_cast<double>(spec.dynamic_max_position), orig);
    if (orig <= 0) return InvalidArgumentError("dynamic rope needs original_max_position > 0");
    base = base * std::pow(spec.factor * seq / orig - (spec.factor - 1.0), static_cast<double>(rd) / (rd - 2));
  }
  t.inv_freq.resize(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) t.inv_freq[static_cast<size_t>(i)] = 1.0 / std::pow(base, (2.0 * i) / rd);

  switch (spec.scaling) {
    case RopeScaling::kNone:
    case RopeScaling::kDynamicNtk:
      break;
    case RopeScaling::kLinear:
      for (double& f : t.inv_freq) f /= spec.factor;
      break;
    case RopeScaling::kLlama3: {
      if (!(spec.high_freq_factor > spec.low_freq_factor))
        return InvalidArgumentError("llama3 rope needs high_freq_factor > low_freq_factor");
      const double old_len = static_cast<double>(spec.original_max_position);
      const double low_wavelen = old_len / spec.low_freq_factor;
      const double high_wavelen = old_len / spec.high_freq_factor;
      for (double& f : t.inv_freq) {
        const double wavelen = 2 * kPi / f;
        if (wavelen > low_wavelen) {
          f = f / spec.factor;
        } else if (wavelen >= high_wavelen) {
          const double smooth =
              (old_len / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor);
          f = (1 - smooth) * f / spec.factor + smooth * f;
        }
      }
      break;
    }
    case RopeScaling::kYarn: {
      const double max_pos = static_cast<double>(spec.original_max_position);
      if (max_pos <= 0) return InvalidArgumentError("yarn rope needs original_max_position > 0");
      double low = std::floor(CorrectionDim(spec.beta_fast, rd, base, max_pos));
      double high = std::ceil(CorrectionDim(spec.beta_slow, rd, base, max_pos));
      low = std::max(low, 0.0);
      high = std::min(high, static_cast<double>(rd - 1));
      if (low == high) high += 0.001;
      for (int i = 0; i < n; ++i) {
        const double pos_freq = std::pow(base, (2.0 * i) / rd);
        const double extrapolation = 1.0 / pos_freq;
        const double interpolation = 1.0 / (spec.factor * pos_freq);
        const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
        const double extrapolation_factor = 1.0 - ramp;
        t.inv_freq[static_cast<size_t>(i)] =
            interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor;
      }
      t.attention_factor = spec.attention_factor > 0 ? spec.attention_factor
                                                     : (spec.factor <= 1.0 ? 1.0 : 0.1 * std::log(spec.factor) + 1.0);
      break;
    }
  }
  // HF keeps inv_freq as an fp32 buffer and engines rotate queries with those values: keys must
  // use the same frequencies, so the table holds the fp32 values (widened back to double, in
  // which the angles are then evaluated).
  for (double& f : t.inv_freq) f = static_cast<double>(static_cast<float>(f));
  return t;
}

}  // namespace kvagent::cuda
