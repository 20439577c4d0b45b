// Inverse frequencies per HF rope_type. Each formula follows the operation order of HF
// transformers' fp32 computation (modeling_rope_utils.py), rounding to float where HF's tensor
// ops do, so that our frequencies equal the model's `inv_freq` buffer: a key rotated here and a
// query rotated by the engine then differ only by the relative position. pow() is evaluated in
// double and rounded once (torch's float pow is within 1 ulp of that).
#include <cmath>
#include <numbers>
#include <string>

#include "kvagent/rope.h"

namespace kvagent {
namespace {

constexpr std::string_view kRopeTypes[] = {"default", "linear", "llama3", "yarn", "dynamic"};

std::string SupportedList() {
  std::string s;
  for (std::string_view t : kRopeTypes) {
    if (!s.empty()) s += ", ";
    s += t;
  }
  return s;
}

float PowF(float base, float exponent) {
  return static_cast<float>(std::pow(static_cast<double>(base), static_cast<double>(exponent)));
}

// HF: base ** (arange(0, dim, 2).float() / dim), in float32.
float PosFreq(float base, int i, int dim) {
  float e = static_cast<float>(2 * i) / static_cast<float>(dim);
  return PowF(base, e);
}

void DefaultInvFreq(float base, int dim, std::vector<float>* out) {
  for (int i = 0; i < dim / 2; ++i) (*out)[i] = 1.0f / PosFreq(base, i, dim);
}

void Llama3InvFreq(const RopeSpec& s, int dim, std::vector<float>* out) {
  DefaultInvFreq(static_cast<float>(s.theta), dim, out);
  const float factor = static_cast<float>(s.factor);
  const double old_ctx = static_cast<double>(s.original_max_position);
  const float low_wl = static_cast<float>(old_ctx / s.low_freq_factor);
  const float high_wl = static_cast<float>(old_ctx / s.high_freq_factor);
  const float two_pi = static_cast<float>(2.0 * std::numbers::pi);
  const float lff = static_cast<float>(s.low_freq_factor);
  const float span = static_cast<float>(s.high_freq_factor - s.low_freq_factor);
  const float old_ctx_f = static_cast<float>(old_ctx);
  for (float& f : *out) {
    // torch evaluates `scalar / tensor` as reciprocal(tensor) * scalar.
    const float wavelen = (1.0f / f) * two_pi;
    float v = wavelen > low_wl ? f / factor : f;
    const bool medium = !(wavelen < high_wl) && !(wavelen > low_wl);
    if (medium) {
      const float smooth = ((1.0f / wavelen) * old_ctx_f - lff) / span;
      v = (1.0f - smooth) * v / factor + smooth * v;
    }
    f = v;
  }
}

void YarnInvFreq(const RopeSpec& s, int dim, std::vector<float>* out) {
  const double base = s.theta;
  const double orig = static_cast<double>(s.original_max_position);
  auto correction_dim = [&](double rotations) {
    return (dim * std::log(orig / (rotations * 2.0 * std::numbers::pi))) / (2.0 * std::log(base));
  };
  double low = std::floor(correction_dim(s.beta_fast));
  double high = std::ceil(correction_dim(s.beta_slow));
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;
  const float lowf = static_cast<float>(low);
  const float range = static_cast<float>(high - low);
  const float factor = static_cast<float>(s.factor);
  const float basef = static_cast<float>(base);
  for (int i = 0; i < dim / 2; ++i) {
    const float pos = PosFreq(basef, i, dim);
    const float extrapolation = 1.0f / pos;
    const float interpolation = 1.0f / (factor * pos);
    float ramp = (static_cast<float>(i) - lowf) / range;
    ramp = std::min(std::max(ramp, 0.0f), 1.0f);
    const float extra_factor = 1.0f - ramp;
    (*out)[i] = interpolation * (1.0f - extra_factor) + extrapolation * extra_factor;
  }
}

// HF computes the dynamic base from a tensor sequence length, i.e. in float32.
void DynamicInvFreq(const RopeSpec& s, int dim, std::vector<float>* out) {
  const int64_t orig = s.original_max_position;
  const int64_t seq = std::max(s.dynamic_max_position, orig);
  const float factor = static_cast<float>(s.factor);
  float ratio = factor * static_cast<float>(seq) / static_cast<float>(orig) - static_cast<float>(s.factor - 1.0);
  // torch keeps the Python-float exponent in double for `tensor ** scalar`.
  float scale = static_cast<float>(std::pow(static_cast<double>(ratio), static_cast<double>(dim) / (dim - 2)));
  float base = static_cast<float>(s.theta) * scale;
  DefaultInvFreq(base, dim, out);
}

}  // namespace

std::span<const std::string_view> SupportedRopeTypes() { return kRopeTypes; }

std::string_view RopeTypeName(RopeScaling scaling) {
  const auto i = static_cast<size_t>(scaling);
  return i < std::size(kRopeTypes) ? kRopeTypes[i] : std::string_view("unknown");
}

double RopeAttentionFactor(const RopeSpec& spec) {
  if (spec.scaling != RopeScaling::kYarn) return 1.0;
  if (spec.attention_factor > 0) return spec.attention_factor;
  return spec.factor > 1.0 ? 0.1 * std::log(spec.factor) + 1.0 : 1.0;
}

Status ValidateRopeSpec(const RopeSpec& s, int head_dim) {
  if (head_dim <= 0) return InvalidArgumentError("rope: head_dim must be positive, got " + std::to_string(head_dim));
  if (!s.enabled) return Status::Ok();
  const auto code = static_cast<size_t>(s.scaling);
  if (code >= std::size(kRopeTypes)) {
    return UnimplementedError("rope: scaling code " + std::to_string(code) +
                              " is not supported; supported HF rope_types: " + SupportedList());
  }
  if (s.style != RopeStyle::kHalfSplit && s.style != RopeStyle::kInterleaved) {
    return UnimplementedError("rope: unknown style; supported: half-split (NeoX/Llama), interleaved (GPT-J)");
  }
  const int rot = s.rotary_dim == 0 ? head_dim : s.rotary_dim;
  if (rot < 2 || rot % 2 != 0 || rot > head_dim) {
    return InvalidArgumentError("rope: rotary_dim must be even, >= 2 and <= head_dim (" + std::to_string(head_dim) +
                                "), got " + std::to_string(s.rotary_dim));
  }
  if (!(s.theta > 0) || !std::isfinite(s.theta)) return InvalidArgumentError("rope: theta must be positive and finite");
  const bool needs_factor = s.scaling != RopeScaling::kNone;
  if (needs_factor && (!(s.factor > 0) || !std::isfinite(s.factor))) {
    return InvalidArgumentError("rope: " + std::string(RopeTypeName(s.scaling)) + " needs factor > 0");
  }
  const bool needs_orig =
      s.scaling == RopeScaling::kLlama3 || s.scaling == RopeScaling::kYarn || s.scaling == RopeScaling::kDynamicNtk;
  if (needs_orig && s.original_max_position <= 0) {
    return InvalidArgumentError("rope: " + std::string(RopeTypeName(s.scaling)) + " needs original_max_position > 0");
  }
  if (s.scaling == RopeScaling::kLlama3 &&
      !(s.low_freq_factor > 0 && s.high_freq_factor > s.low_freq_factor && std::isfinite(s.high_freq_factor))) {
    return InvalidArgumentError("rope: llama3 needs 0 < low_freq_factor < high_freq_factor");
  }
  if (s.scaling == RopeScaling::kYarn) {
    if (!(s.beta_fast > 0) || !(s.beta_slow > 0))
      return InvalidArgumentError("rope: yarn needs beta_fast, beta_slow > 0");
    if (s.attention_factor < 0 || !std::isfinite(s.attention_factor)) {
      return InvalidArgumentError("rope: yarn attention_factor must be >= 0 (0 = derived from factor)");
    }
  }
  if (s.scaling == RopeScaling::kDynamicNtk) {
    if (s.dynamic_max_position < 0) return InvalidArgumentError("rope: dynamic_max_position must be >= 0");
    if (rot <= 2) return InvalidArgumentError("rope: dynamic NTK needs rotary_dim > 2");
  }
  return Status::Ok();
}

StatusOr<RopeFrequencies> ComputeRopeFrequencies(const RopeSpec& spec, int head_dim) {
  if (Status st = ValidateRopeSpec(spec, head_dim); !st.ok()) return st;
  if (!spec.enabled) return InvalidArgumentError("rope: the spec is disabled (no rotary embedding)");
  RopeFrequencies f;
  f.head_dim = head_dim;
  f.rotary_dim = spec.rotary_dim == 0 ? head_dim : spec.rotary_dim;
  f.style = spec.style;
  f.inv_freq.assign(static_cast<size_t>(f.rotary_dim / 2), 0.0f);
  f.attention_factor = RopeAttentionFactor(spec);
  const int dim = f.rotary_dim;
  switch (spec.scaling) {
    case RopeScaling::kNone:
      DefaultInvFreq(static_cast<float>(spec.theta), dim, &f.inv_freq);
      break;
    case RopeScaling::kLinear:
      DefaultInvFreq(static_cast<float>(spec.theta), dim, &f.inv_freq);
      for (float& v : f.inv_freq) v /= static_cast<float>(spec.factor);
      break;
    case RopeScaling::kLlama3:
      Llama3InvFreq(spec, dim, &f.inv_freq);
      break;
    case RopeScaling::kYarn:
      YarnInvFreq(spec, dim, &f.inv_freq);
      break;
    case RopeScaling::kDynamicNtk:
      DynamicInvFreq(spec, dim, &f.inv_freq);
      break;
  }
  return f;
}

}  // namespace kvagent
