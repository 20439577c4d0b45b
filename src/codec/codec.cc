#include "kvagent/codec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace kvagent {

namespace {

size_t NumScales(const SegmentLayout& l) { return static_cast<size_t>(l.num_layers) * 2 * l.num_kv_heads * l.head_dim; }

Status CheckLayout(const SegmentLayout& l) {
  if (l.num_layers <= 0 || l.num_kv_heads <= 0 || l.head_dim <= 0 || l.num_tokens <= 0)
    return InvalidArgumentError("codec: layout must have positive layers, kv_heads, head_dim and tokens");
  if (l.dtype != DType::kF32 && l.dtype != DType::kF16 && l.dtype != DType::kBF16)
    return InvalidArgumentError("codec: payload dtype must be f32, f16 or bf16");
  return Status::Ok();
}

}  // namespace

std::string_view CodecName(CodecKind c) {
  switch (c) {
    case CodecKind::kRaw:
      return "raw";
    case CodecKind::kInt8:
      return "int8";
  }
  return "unknown";
}

StatusOr<CodecKind> CodecFromName(std::string_view name) {
  if (name == "raw") return CodecKind::kRaw;
  if (name == "int8") return CodecKind::kInt8;
  return InvalidArgumentError("unknown codec '" + std::string(name) + "' (expected raw or int8)");
}

size_t EncodedSize(const SegmentLayout& layout, CodecKind c) {
  switch (c) {
    case CodecKind::kRaw:
      return layout.NumBytes();
    case CodecKind::kInt8:
      return NumScales(layout) * sizeof(float) + layout.NumElements();
  }
  return 0;
}

Status EncodePayload(const SegmentLayout& layout, CodecKind c, std::span<const std::byte> raw,
                     std::span<std::byte> out) {
  KVAGENT_RETURN_IF_ERROR(CheckLayout(layout));
  if (c != CodecKind::kRaw && c != CodecKind::kInt8) return InvalidArgumentError("codec: unknown codec kind");
  if (raw.size() != layout.NumBytes())
    return InvalidArgumentError("codec: raw payload has " + std::to_string(raw.size()) + " bytes, layout needs " +
                                std::to_string(layout.NumBytes()));
  if (out.size() != EncodedSize(layout, c))
    return InvalidArgumentError("codec: output has " + std::to_string(out.size()) + " bytes, encoding needs " +
                                std::to_string(EncodedSize(layout, c)));
  if (c == CodecKind::kRaw) {
    std::memcpy(out.data(), raw.data(), raw.size());
    return Status::Ok();
  }
  const int dim = layout.head_dim, tokens = layout.num_tokens;
  const size_t planes = static_cast<size_t>(layout.num_layers) * 2 * layout.num_kv_heads;
  std::byte* scale_out = out.data();
  auto* q_out = reinterpret_cast<int8_t*>(out.data() + NumScales(layout) * sizeof(float));
  std::vector<float> amax(dim), scale(dim), inv(dim);
  for (size_t p = 0; p < planes; ++p) {
    const size_t base = p * layout.PlaneElements();
    std::fill(amax.begin(), amax.end(), 0.0f);
    for (int t = 0; t < tokens; ++t)
      for (int d = 0; d < dim; ++d) {
        float v = LoadAsF32(raw.data(), layout.dtype, base + static_cast<size_t>(t) * dim + d);
        if (!std::isfinite(v)) return InvalidArgumentError("codec int8: payload holds a non-finite value");
        amax[d] = std::max(amax[d], std::fabs(v));
      }
    for (int d = 0; d < dim; ++d) {
      scale[d] = amax[d] / 127.0f;
      inv[d] = scale[d] > 0 ? 1.0f / scale[d] : 0.0f;
    }
    std::memcpy(scale_out + p * dim * sizeof(float), scale.data(), dim * sizeof(float));
    for (int t = 0; t < tokens; ++t)
      for (int d = 0; d < dim; ++d) {
        size_t i = base + static_cast<size_t>(t) * dim + d;
        float v = LoadAsF32(raw.data(), layout.dtype, i);
        // Dividing by the scale (not multiplying by its inverse) keeps |q*scale - v| <= scale/2
        // up to one rounding of the division.
        float r = scale[d] > 0 ? std::nearbyint(v / scale[d]) : 0.0f;
        q_out[i] = static_cast<int8_t>(std::clamp(r, -127.0f, 127.0f));
      }
  }
  return Status::Ok();
}

Status DecodePayload(const SegmentLayout& layout, CodecKind c, std::span<const std::byte> encoded,
                     std::span<std::byte> out) {
  KVAGENT_RETURN_IF_ERROR(CheckLayout(layout));
  if (c != CodecKind::kRaw && c != CodecKind::kInt8) return DataLossError("codec: unknown codec kind");
  if (encoded.size() != EncodedSize(layout, c))
    return DataLossError("codec " + std::string(CodecName(c)) + ": encoded payload has " +
                         std::to_string(encoded.size()) + " bytes, layout needs " +
                         std::to_string(EncodedSize(layout, c)));
  if (out.size() != layout.NumBytes())
    return InvalidArgumentError("codec: output has " + std::to_string(out.size()) + " bytes, layout needs " +
                                std::to_string(layout.NumBytes()));
  if (c == CodecKind::kRaw) {
    if (out.data() != encoded.data()) std::memmove(out.data(), encoded.data(), out.size());
    return Status::Ok();
  }
  const int dim = layout.head_dim;
  const size_t planes = static_cast<size_t>(layout.num_layers) * 2 * layout.num_kv_heads;
  const auto* q = reinterpret_cast<const int8_t*>(encoded.data() + NumScales(layout) * sizeof(float));
  std::vector<float> scale(dim);
  for (size_t p = 0; p < planes; ++p) {
    std::memcpy(scale.data(), encoded.data() + p * dim * sizeof(float), dim * sizeof(float));
    const size_t base = p * layout.PlaneElements();
    for (size_t e = 0; e < layout.PlaneElements(); ++e) {
      size_t i = base + e;
      StoreFromF32(out.data(), layout.dtype, i, static_cast<float>(q[i]) * scale[e % dim]);
    }
  }
  return Status::Ok();
}

StatusOr<CodecReport> MeasureCodec(const SegmentLayout& layout, CodecKind c, std::span<const std::byte> raw) {
  KVAGENT_RETURN_IF_ERROR(CheckLayout(layout));
  CodecReport r;
  r.raw_bytes = layout.NumBytes();
  r.encoded_bytes = EncodedSize(layout, c);
  std::vector<std::byte> enc(r.encoded_bytes), dec(r.raw_bytes);
  KVAGENT_RETURN_IF_ERROR(EncodePayload(layout, c, raw, enc));
  KVAGENT_RETURN_IF_ERROR(DecodePayload(layout, c, enc, dec));
  double sq = 0, data_sq = 0;
  const size_t n = layout.NumElements();
  for (size_t i = 0; i < n; ++i) {
    double a = LoadAsF32(raw.data(), layout.dtype, i), b = LoadAsF32(dec.data(), layout.dtype, i);
    double e = std::fabs(a - b);
    r.max_abs_error = std::max(r.max_abs_error, e);
    sq += e * e;
    data_sq += a * a;
  }
  r.rms_error = std::sqrt(sq / static_cast<double>(n));
  double data_rms = std::sqrt(data_sq / static_cast<double>(n));
  r.rel_rms_error = data_rms > 0 ? r.rms_error / data_rms : 0.0;
  return r;
}

}  // namespace kvagent
