#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kvagent/index.h"
#include "kvagent/wire.h"

namespace kvagent {
namespace {

constexpr uint32_t kMagic = 0x4d53564b;  // "KVSM"
constexpr uint8_t kVersion = 1;          // no token keys
constexpr uint8_t kVersionTokens = 2;    // token keys appended
constexpr float kF16Max = 65504.0f;
// Upper bounds keep a corrupt header from asking for absurd allocations before the size check.
constexpr uint32_t kMaxDim = 1u << 16;
constexpr uint32_t kMaxHeads = 1u << 12;
constexpr uint32_t kMaxLayers = 1u << 12;

// Next f16 value toward -inf / +inf (bit patterns), for outward rounding of the box.
uint16_t F16Down(uint16_t h) {
  if (h == 0x0000) return 0x8001;
  return (h & 0x8000) ? static_cast<uint16_t>(h + 1) : static_cast<uint16_t>(h - 1);
}
uint16_t F16Up(uint16_t h) {
  if (h == 0x8000) return 0x0001;
  return (h & 0x8000) ? static_cast<uint16_t>(h - 1) : static_cast<uint16_t>(h + 1);
}

Status ResolveLayers(std::span<const int> layers, int num_layers, std::vector<int>* out) {
  out->clear();
  if (layers.empty()) {
    for (int l = 0; l < num_layers; ++l) out->push_back(l);
    return Status::Ok();
  }
  out->assign(layers.begin(), layers.end());
  std::sort(out->begin(), out->end());
  for (size_t i = 0; i < out->size(); ++i) {
    if ((*out)[i] < 0 || (*out)[i] >= num_layers) {
      return InvalidArgumentError("layer " + std::to_string((*out)[i]) + " out of range [0, " +
                                  std::to_string(num_layers) + ")");
    }
    if (i > 0 && (*out)[i] == (*out)[i - 1]) return InvalidArgumentError("layer listed twice");
  }
  return Status::Ok();
}

// keys(layer, head, token, d) = base[layer * layer_stride + head * head_stride + token * dim + d].
StatusOr<KeySummary> Summarize(const void* base, DType dtype, int num_layers, int num_kv_heads, int num_tokens,
                               int head_dim, size_t layer_stride, size_t head_stride, std::span<const int> layers,
                               std::span<const int> token_layers, std::span<const uint8_t> token_mask) {
  if (base == nullptr) return InvalidArgumentError("keys: null data");
  if (dtype != DType::kF32 && dtype != DType::kF16 && dtype != DType::kBF16) {
    return InvalidArgumentError("keys: dtype must be f32, f16 or bf16");
  }
  if (num_layers < 1 || num_kv_heads < 1 || num_tokens < 1 || head_dim < 1) {
    return InvalidArgumentError("keys: every dimension must be >= 1 (got L=" + std::to_string(num_layers) +
                                " H=" + std::to_string(num_kv_heads) + " T=" + std::to_string(num_tokens) +
                                " D=" + std::to_string(head_dim) + ")");
  }
  KeySummary s;
  s.num_kv_heads = num_kv_heads;
  s.head_dim = head_dim;
  s.num_tokens = num_tokens;
  KVAGENT_RETURN_IF_ERROR(ResolveLayers(layers, num_layers, &s.layers));
  const size_t n = s.layers.size() * num_kv_heads * static_cast<size_t>(head_dim);
  s.min.assign(n, std::numeric_limits<float>::infinity());
  s.max.assign(n, -std::numeric_limits<float>::infinity());
  s.mean.assign(n, 0.0f);
  std::vector<double> sum(head_dim);
  for (size_t li = 0; li < s.layers.size(); ++li) {
    for (int h = 0; h < num_kv_heads; ++h) {
      const size_t out = s.Offset(static_cast<int>(li), h);
      const size_t in = s.layers[li] * layer_stride + h * head_stride;
      std::fill(sum.begin(), sum.end(), 0.0);
      for (int t = 0; t < num_tokens; ++t) {
        for (int d = 0; d < head_dim; ++d) {
          float v = LoadAsF32(base, dtype, in + static_cast<size_t>(t) * head_dim + d);
          if (!std::isfinite(v)) return InvalidArgumentError("keys: non-finite value");
          s.min[out + d] = std::min(s.min[out + d], v);
          s.max[out + d] = std::max(s.max[out + d], v);
          sum[d] += v;
        }
      }
      for (int d = 0; d < head_dim; ++d) s.mean[out + d] = static_cast<float>(sum[d] / num_tokens);
    }
  }
  if (token_layers.empty()) {
    if (!token_mask.empty()) return InvalidArgumentError("token_mask given without token_layers");
    return s;
  }
  KVAGENT_RETURN_IF_ERROR(ResolveLayers(token_layers, num_layers, &s.token_layers));
  if (!token_mask.empty() && token_mask.size() != static_cast<size_t>(num_tokens)) {
    return InvalidArgumentError("token_mask has " + std::to_string(token_mask.size()) + " entries for " +
                                std::to_string(num_tokens) + " tokens");
  }
  std::vector<int> kept;
  for (int t = 0; t < num_tokens; ++t) {
    if (token_mask.empty() || token_mask[t] != 0) kept.push_back(t);
  }
  if (kept.empty()) return InvalidArgumentError("token_mask keeps no token");
  s.num_token_keys = static_cast<int>(kept.size());
  s.token_keys.resize(s.token_layers.size() * num_kv_heads * kept.size() * static_cast<size_t>(head_dim));
  float* dst = s.token_keys.data();
  for (int l : s.token_layers) {
    for (int h = 0; h < num_kv_heads; ++h) {
      const size_t in = l * layer_stride + h * head_stride;
      for (int t : kept) {
        for (int d = 0; d < head_dim; ++d) {
          const float v = LoadAsF32(base, dtype, in + static_cast<size_t>(t) * head_dim + d);
          if (!std::isfinite(v)) return InvalidArgumentError("keys: non-finite value");
          *dst++ = v;
        }
      }
    }
  }
  return s;
}

}  // namespace

namespace {
int SlotIn(const std::vector<int>& sorted, int layer) {
  auto it = std::lower_bound(sorted.begin(), sorted.end(), layer);
  return (it != sorted.end() && *it == layer) ? static_cast<int>(it - sorted.begin()) : -1;
}
}  // namespace

int KeySummary::LayerSlot(int layer) const { return SlotIn(layers, layer); }
int KeySummary::TokenLayerSlot(int layer) const { return SlotIn(token_layers, layer); }

StatusOr<KeySummary> KeySummary::FromKeys(const void* keys, DType dtype, int num_layers, int num_kv_heads,
                                          int num_tokens, int head_dim, std::span<const int> layers,
                                          std::span<const int> token_layers, std::span<const uint8_t> token_mask) {
  const size_t head_stride = static_cast<size_t>(std::max(num_tokens, 0)) * std::max(head_dim, 0);
  return Summarize(keys, dtype, num_layers, num_kv_heads, num_tokens, head_dim, head_stride * std::max(num_kv_heads, 0),
                   head_stride, layers, token_layers, token_mask);
}

StatusOr<KeySummary> KeySummary::FromSegment(const Segment& segment, std::span<const int> layers,
                                             std::span<const int> token_layers, std::span<const uint8_t> token_mask) {
  KVAGENT_RETURN_IF_ERROR(segment.Validate());
  if (!segment.pre_rope) return InvalidArgumentError("segment keys are post-RoPE; summaries need pre-RoPE keys");
  const SegmentLayout& lay = segment.layout;
  // Canonical [layer][k|v][head][token][dim]: the K plane of layer l starts at Offset(l, 0, 0, 0).
  const size_t layer_stride = lay.Offset(1, 0, 0, 0) - lay.Offset(0, 0, 0, 0);
  return Summarize(segment.payload->data(), lay.dtype, lay.num_layers, lay.num_kv_heads, lay.num_tokens, lay.head_dim,
                   layer_stride, lay.PlaneElements(), layers, token_layers, token_mask);
}

std::string KeySummary::Serialize(DType dtype) const {
  bool f16 = dtype == DType::kF16;
  if (f16) {
    for (const auto* v : {&min, &max, &mean}) {
      for (float x : *v) {
        if (!(std::fabs(x) <= kF16Max)) {
          f16 = false;
          break;
        }
      }
    }
  }
  std::string out;
  PutU32(&out, kMagic);
  PutU8(&out, token_layers.empty() ? kVersion : kVersionTokens);
  PutU8(&out, static_cast<uint8_t>(f16 ? DType::kF16 : DType::kF32));
  PutU32(&out, static_cast<uint32_t>(num_kv_heads));
  PutU32(&out, static_cast<uint32_t>(head_dim));
  PutU32(&out, static_cast<uint32_t>(num_tokens));
  PutU32(&out, static_cast<uint32_t>(layers.size()));
  for (int l : layers) PutU32(&out, static_cast<uint32_t>(l));
  const size_t n = min.size();
  out.reserve(out.size() + 3 * n * (f16 ? 2 : 4) + 8);
  auto put = [&](const std::vector<float>& v, int direction) {
    for (float x : v) {
      if (!f16) {
        out.append(reinterpret_cast<const char*>(&x), 4);
        continue;
      }
      uint16_t h = F32ToF16(x);
      if (direction < 0 && F16ToF32(h) > x) h = F16Down(h);
      if (direction > 0 && F16ToF32(h) < x) h = F16Up(h);
      out.append(reinterpret_cast<const char*>(&h), 2);
    }
  };
  put(min, -1);
  put(max, +1);
  put(mean, 0);
  if (!token_layers.empty()) {  // version 2: [count][layers][num_token_keys][tag][keys]
    bool tf16 = dtype == DType::kF16;
    for (float x : token_keys) tf16 = tf16 && std::fabs(x) <= kF16Max;
    PutU32(&out, static_cast<uint32_t>(token_layers.size()));
    for (int l : token_layers) PutU32(&out, static_cast<uint32_t>(l));
    PutU32(&out, static_cast<uint32_t>(num_token_keys));
    PutU8(&out, static_cast<uint8_t>(tf16 ? DType::kF16 : DType::kF32));
    f16 = tf16;
    put(token_keys, 0);
  }
  PutU64(&out, Checksum64(std::as_bytes(std::span<const char>(out.data(), out.size()))));
  return out;
}

StatusOr<KeySummary> KeySummary::Deserialize(std::string_view bytes) {
  if (bytes.size() < 8) return DataLossError("key summary: truncated");
  uint64_t stored_sum = 0;
  std::memcpy(&stored_sum, bytes.data() + bytes.size() - 8, 8);
  std::string_view body = bytes.substr(0, bytes.size() - 8);
  if (Checksum64(std::as_bytes(std::span<const char>(body.data(), body.size()))) != stored_sum) {
    return DataLossError("key summary: checksum mismatch");
  }
  WireReader r(body);
  uint32_t magic = 0, heads = 0, dim = 0, tokens = 0, nlayers = 0;
  uint8_t version = 0, tag = 0;
  KVAGENT_RETURN_IF_ERROR(r.U32(&magic));
  if (magic != kMagic) return DataLossError("key summary: bad magic");
  KVAGENT_RETURN_IF_ERROR(r.U8(&version));
  if (version != kVersion && version != kVersionTokens) {
    return DataLossError("key summary: unknown version " + std::to_string(version));
  }
  KVAGENT_RETURN_IF_ERROR(r.U8(&tag));
  if (tag != static_cast<uint8_t>(DType::kF32) && tag != static_cast<uint8_t>(DType::kF16)) {
    return DataLossError("key summary: bad dtype tag");
  }
  KVAGENT_RETURN_IF_ERROR(r.U32(&heads));
  KVAGENT_RETURN_IF_ERROR(r.U32(&dim));
  KVAGENT_RETURN_IF_ERROR(r.U32(&tokens));
  KVAGENT_RETURN_IF_ERROR(r.U32(&nlayers));
  if (heads < 1 || heads > kMaxHeads || dim < 1 || dim > kMaxDim || tokens < 1 || tokens > INT32_MAX || nlayers < 1 ||
      nlayers > kMaxLayers) {
    return DataLossError("key summary: bad geometry");
  }
  KeySummary s;
  s.num_kv_heads = static_cast<int>(heads);
  s.head_dim = static_cast<int>(dim);
  s.num_tokens = static_cast<int>(tokens);
  for (uint32_t i = 0; i < nlayers; ++i) {
    uint32_t l = 0;
    KVAGENT_RETURN_IF_ERROR(r.U32(&l));
    if (l > kMaxLayers || (i > 0 && static_cast<int>(l) <= s.layers.back())) {
      return DataLossError("key summary: layers not strictly ascending");
    }
    s.layers.push_back(static_cast<int>(l));
  }
  const size_t n = static_cast<size_t>(nlayers) * heads * dim;
  const size_t esize = tag == static_cast<uint8_t>(DType::kF16) ? 2 : 4;
  if (version == kVersion ? r.remaining() != 3 * n * esize : r.remaining() < 3 * n * esize) {
    return DataLossError("key summary: payload size mismatch");
  }
  const char* p = body.data() + r.position();
  size_t esz = esize;
  auto get_n = [&](std::vector<float>* v, size_t count) -> Status {
    v->resize(count);
    for (size_t i = 0; i < count; ++i, p += esz) {
      float x;
      if (esz == 4) {
        std::memcpy(&x, p, 4);
      } else {
        uint16_t h;
        std::memcpy(&h, p, 2);
        x = F16ToF32(h);
      }
      if (!std::isfinite(x)) return DataLossError("key summary: non-finite value");
      (*v)[i] = x;
    }
    return Status::Ok();
  };
  KVAGENT_RETURN_IF_ERROR(get_n(&s.min, n));
  KVAGENT_RETURN_IF_ERROR(get_n(&s.max, n));
  KVAGENT_RETURN_IF_ERROR(get_n(&s.mean, n));
  for (size_t i = 0; i < n; ++i) {
    if (!(s.min[i] <= s.max[i])) return DataLossError("key summary: min > max");
  }
  if (version == kVersionTokens) {
    WireReader t(body.substr(static_cast<size_t>(p - body.data())));
    uint32_t ntl = 0, nkeys = 0;
    uint8_t ttag = 0;
    KVAGENT_RETURN_IF_ERROR(t.U32(&ntl));
    if (ntl < 1 || ntl > kMaxLayers) return DataLossError("key summary: bad token layer count");
    for (uint32_t i = 0; i < ntl; ++i) {
      uint32_t l = 0;
      KVAGENT_RETURN_IF_ERROR(t.U32(&l));
      if (l > kMaxLayers || (i > 0 && static_cast<int>(l) <= s.token_layers.back())) {
        return DataLossError("key summary: token layers not strictly ascending");
      }
      s.token_layers.push_back(static_cast<int>(l));
    }
    KVAGENT_RETURN_IF_ERROR(t.U32(&nkeys));
    KVAGENT_RETURN_IF_ERROR(t.U8(&ttag));
    if (nkeys < 1 || nkeys > tokens) return DataLossError("key summary: bad token key count");
    if (ttag != static_cast<uint8_t>(DType::kF32) && ttag != static_cast<uint8_t>(DType::kF16)) {
      return DataLossError("key summary: bad token key dtype tag");
    }
    esz = ttag == static_cast<uint8_t>(DType::kF16) ? 2 : 4;
    const size_t nt = static_cast<size_t>(ntl) * heads * nkeys * dim;
    if (t.remaining() != nt * esz) return DataLossError("key summary: token key size mismatch");
    p += t.position();
    s.num_token_keys = static_cast<int>(nkeys);
    KVAGENT_RETURN_IF_ERROR(get_n(&s.token_keys, nt));
  }
  return s;
}

float BoxUpperBound(const float* q, const float* lo, const float* hi, int dim) {
  float acc = 0;
  for (int d = 0; d < dim; ++d) acc += std::max(q[d] * lo[d], q[d] * hi[d]);
  return acc;
}

}  // namespace kvagent
