#include "kvagent/model_spec.h"

#include <cmath>
#include <string>

#include "kvagent/wire.h"

namespace kvagent {

namespace {
constexpr uint32_t kSpecMagic = 0x4b564d53;  // "SMVK"
constexpr uint8_t kSpecVersion = 1;
}  // namespace

Status ModelSpec::Validate() const {
  auto bad = [](std::string m) { return InvalidArgumentError("ModelSpec: " + m); };
  if (num_layers <= 0) return bad("num_layers must be > 0");
  if (num_kv_heads <= 0) return bad("num_kv_heads must be > 0");
  if (num_q_heads <= 0 || num_q_heads % num_kv_heads != 0)
    return bad("num_q_heads (" + std::to_string(num_q_heads) + ") must be a positive multiple of num_kv_heads (" +
               std::to_string(num_kv_heads) + ")");
  if (head_dim <= 0 || head_dim % 2 != 0) return bad("head_dim must be positive and even");
  if (kv_dtype != DType::kF32 && kv_dtype != DType::kF16 && kv_dtype != DType::kBF16)
    return bad("kv_dtype must be f32, f16 or bf16");
  if (!std::isfinite(attn_scale) || attn_scale < 0) return bad("attn_scale must be finite and >= 0");
  if (static_cast<int>(layers.size()) != num_layers)
    return bad("layers has " + std::to_string(layers.size()) + " entries, num_layers is " + std::to_string(num_layers));
  for (int l = 0; l < num_layers; ++l) {
    const LayerSpec& ls = layers[l];
    std::string at = " (layer " + std::to_string(l) + ")";
    if (ls.sliding_window < 0) return bad("sliding_window must be >= 0" + at);
    const RopeSpec& r = ls.rope;
    // Every number finite, enabled or not (found by model_spec_fuzz: a NaN in a disabled layer
    // made a deserialised spec unequal to itself).
    for (double v : {r.theta, r.factor, r.low_freq_factor, r.high_freq_factor, r.beta_fast, r.beta_slow,
                     r.attention_factor})
      if (!std::isfinite(v)) return bad("rope parameters must be finite" + at);
    if (static_cast<uint8_t>(r.style) > static_cast<uint8_t>(RopeStyle::kInterleaved) ||
        static_cast<uint8_t>(r.scaling) > static_cast<uint8_t>(RopeScaling::kDynamicNtk))
      return bad("unknown rope style or scaling" + at);
    if (!r.enabled) continue;
    int rd = r.rotary_dim == 0 ? head_dim : r.rotary_dim;
    if (rd <= 0 || rd > head_dim || rd % 2 != 0) return bad("rotary_dim must be even and <= head_dim" + at);
    if (!(r.theta > 0) || !std::isfinite(r.theta)) return bad("rope theta must be positive" + at);
    if (r.scaling != RopeScaling::kNone && !(r.factor > 0)) return bad("rope scaling factor must be positive" + at);
  }
  return Status::Ok();
}

size_t ModelSpec::KvBytesPerToken() const {
  return static_cast<size_t>(num_layers) * 2 * num_kv_heads * head_dim * DTypeSize(kv_dtype);
}

double ModelSpec::EffectiveAttnScale() const {
  return attn_scale > 0 ? attn_scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

std::string ModelSpec::Serialize() const {
  std::string out;
  PutU32(&out, kSpecMagic);
  PutU8(&out, kSpecVersion);
  PutBytes(&out, name);
  PutU32(&out, static_cast<uint32_t>(num_layers));
  PutU32(&out, static_cast<uint32_t>(num_q_heads));
  PutU32(&out, static_cast<uint32_t>(num_kv_heads));
  PutU32(&out, static_cast<uint32_t>(head_dim));
  PutU8(&out, static_cast<uint8_t>(kv_dtype));
  PutF64(&out, attn_scale);
  PutU64(&out, fingerprint.lo);
  PutU64(&out, fingerprint.hi);
  PutU32(&out, static_cast<uint32_t>(layers.size()));
  for (const LayerSpec& l : layers) {
    PutU32(&out, static_cast<uint32_t>(l.sliding_window));
    const RopeSpec& r = l.rope;
    PutU8(&out, r.enabled ? 1 : 0);
    PutF64(&out, r.theta);
    PutU32(&out, static_cast<uint32_t>(r.rotary_dim));
    PutU8(&out, static_cast<uint8_t>(r.style));
    PutU8(&out, static_cast<uint8_t>(r.scaling));
    PutF64(&out, r.factor);
    PutF64(&out, r.low_freq_factor);
    PutF64(&out, r.high_freq_factor);
    PutI64(&out, r.original_max_position);
    PutF64(&out, r.beta_fast);
    PutF64(&out, r.beta_slow);
    PutF64(&out, r.attention_factor);
    PutI64(&out, r.dynamic_max_position);
  }
  return out;
}

StatusOr<ModelSpec> ModelSpec::Deserialize(std::string_view bytes) {
  WireReader r(bytes);
  uint32_t magic = 0;
  uint8_t version = 0;
  KVAGENT_RETURN_IF_ERROR(r.U32(&magic));
  if (magic != kSpecMagic) return DataLossError("ModelSpec: bad magic");
  KVAGENT_RETURN_IF_ERROR(r.U8(&version));
  if (version != kSpecVersion) return DataLossError("ModelSpec: unsupported version " + std::to_string(version));
  ModelSpec s;
  uint32_t u = 0;
  uint8_t b = 0;
  KVAGENT_RETURN_IF_ERROR(r.String(&s.name));
  KVAGENT_RETURN_IF_ERROR(r.U32(&u)); s.num_layers = static_cast<int>(u);
  KVAGENT_RETURN_IF_ERROR(r.U32(&u)); s.num_q_heads = static_cast<int>(u);
  KVAGENT_RETURN_IF_ERROR(r.U32(&u)); s.num_kv_heads = static_cast<int>(u);
  KVAGENT_RETURN_IF_ERROR(r.U32(&u)); s.head_dim = static_cast<int>(u);
  KVAGENT_RETURN_IF_ERROR(r.U8(&b)); s.kv_dtype = static_cast<DType>(b);
  KVAGENT_RETURN_IF_ERROR(r.F64(&s.attn_scale));
  KVAGENT_RETURN_IF_ERROR(r.U64(&s.fingerprint.lo));
  KVAGENT_RETURN_IF_ERROR(r.U64(&s.fingerprint.hi));
  uint32_t n = 0;
  KVAGENT_RETURN_IF_ERROR(r.U32(&n));
  if (n > 100000) return DataLossError("ModelSpec: implausible layer count");
  s.layers.resize(n);
  for (LayerSpec& l : s.layers) {
    KVAGENT_RETURN_IF_ERROR(r.U32(&u)); l.sliding_window = static_cast<int>(u);
    RopeSpec& rs = l.rope;
    KVAGENT_RETURN_IF_ERROR(r.U8(&b)); rs.enabled = b != 0;
    KVAGENT_RETURN_IF_ERROR(r.F64(&rs.theta));
    KVAGENT_RETURN_IF_ERROR(r.U32(&u)); rs.rotary_dim = static_cast<int>(u);
    KVAGENT_RETURN_IF_ERROR(r.U8(&b)); rs.style = static_cast<RopeStyle>(b);
    KVAGENT_RETURN_IF_ERROR(r.U8(&b)); rs.scaling = static_cast<RopeScaling>(b);
    KVAGENT_RETURN_IF_ERROR(r.F64(&rs.factor));
    KVAGENT_RETURN_IF_ERROR(r.F64(&rs.low_freq_factor));
    KVAGENT_RETURN_IF_ERROR(r.F64(&rs.high_freq_factor));
    KVAGENT_RETURN_IF_ERROR(r.I64(&rs.original_max_position));
    KVAGENT_RETURN_IF_ERROR(r.F64(&rs.beta_fast));
    KVAGENT_RETURN_IF_ERROR(r.F64(&rs.beta_slow));
    KVAGENT_RETURN_IF_ERROR(r.F64(&rs.attention_factor));
    KVAGENT_RETURN_IF_ERROR(r.I64(&rs.dynamic_max_position));
  }
  KVAGENT_RETURN_IF_ERROR(s.Validate().WithContext("deserialised ModelSpec"));
  return s;
}

ModelSpec UniformModelSpec(std::string name, int num_layers, int num_q_heads, int num_kv_heads, int head_dim,
                           DType kv_dtype, const RopeSpec& rope, const Hash128& fingerprint) {
  ModelSpec s;
  s.name = std::move(name);
  s.num_layers = num_layers;
  s.num_q_heads = num_q_heads;
  s.num_kv_heads = num_kv_heads;
  s.head_dim = head_dim;
  s.kv_dtype = kv_dtype;
  s.fingerprint = fingerprint;
  s.layers.assign(static_cast<size_t>(num_layers > 0 ? num_layers : 0), LayerSpec{0, rope});
  return s;
}

}  // namespace kvagent
