#include "engines/llama_cpp/gguf_model_info.h"

#include <gguf.h>
#include <xxhash.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

namespace kvagent::llama_cpp {
namespace {

struct GgufDeleter {
  void operator()(gguf_context* c) const { gguf_free(c); }
};
using GgufPtr = std::unique_ptr<gguf_context, GgufDeleter>;

// Numeric metadata of any integer/float type as double; `fallback` when absent.
double Num(const gguf_context* g, const std::string& key, double fallback) {
  const int64_t id = gguf_find_key(g, key.c_str());
  if (id < 0) return fallback;
  switch (gguf_get_kv_type(g, id)) {
    case GGUF_TYPE_UINT8: return gguf_get_val_u8(g, id);
    case GGUF_TYPE_INT8: return gguf_get_val_i8(g, id);
    case GGUF_TYPE_UINT16: return gguf_get_val_u16(g, id);
    case GGUF_TYPE_INT16: return gguf_get_val_i16(g, id);
    case GGUF_TYPE_UINT32: return gguf_get_val_u32(g, id);
    case GGUF_TYPE_INT32: return gguf_get_val_i32(g, id);
    case GGUF_TYPE_UINT64: return static_cast<double>(gguf_get_val_u64(g, id));
    case GGUF_TYPE_INT64: return static_cast<double>(gguf_get_val_i64(g, id));
    case GGUF_TYPE_FLOAT32: return gguf_get_val_f32(g, id);
    case GGUF_TYPE_FLOAT64: return gguf_get_val_f64(g, id);
    case GGUF_TYPE_BOOL: return gguf_get_val_bool(g, id) ? 1 : 0;
    default: return fallback;
  }
}

std::string Str(const gguf_context* g, const std::string& key, std::string fallback) {
  const int64_t id = gguf_find_key(g, key.c_str());
  if (id < 0 || gguf_get_kv_type(g, id) != GGUF_TYPE_STRING) return fallback;
  return gguf_get_val_str(g, id);
}

// llama.cpp's sliding-window layer pattern (llama_model_base::load_swa_pattern): a per-layer
// bool array, or every n-th layer full attention (the last of each group of n).
std::vector<bool> SwaPattern(const gguf_context* g, const std::string& arch, int layers, int default_period) {
  std::vector<bool> swa(layers, false);
  const std::string key = arch + ".attention.sliding_window_pattern";
  const int64_t id = gguf_find_key(g, key.c_str());
  if (id >= 0 && gguf_get_kv_type(g, id) == GGUF_TYPE_ARRAY && gguf_get_arr_type(g, id) == GGUF_TYPE_BOOL) {
    const auto* data = static_cast<const bool*>(gguf_get_arr_data(g, id));
    for (int i = 0; i < layers && i < static_cast<int>(gguf_get_arr_n(g, id)); ++i) swa[i] = data[i];
    return swa;
  }
  const int period = static_cast<int>(Num(g, key, default_period));
  for (int i = 0; i < layers; ++i) swa[i] = period == 0 || (i % period < period - 1);
  return swa;
}

Status HashTensorData(const gguf_context* g, const std::string& path, Env* env, XXH3_state_t* st) {
  KVAGENT_ASSIGN_OR_RETURN(std::unique_ptr<RandomAccessFile> file, env->NewRandomAccessFile(path));
  const uint64_t base = gguf_get_data_offset(g);
  const int64_t n = gguf_get_n_tensors(g);
  // Sorted by name: the fingerprint does not depend on the order tensors are stored in.
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [g](int64_t a, int64_t b) {
    return std::strcmp(gguf_get_tensor_name(g, a), gguf_get_tensor_name(g, b)) < 0;
  });
  std::vector<std::byte> buf(size_t{4} << 20);
  for (int64_t i : order) {
    const char* name = gguf_get_tensor_name(g, i);
    XXH3_128bits_update(st, name, std::strlen(name) + 1);
    const int32_t type = gguf_get_tensor_type(g, i);
    XXH3_128bits_update(st, &type, sizeof(type));
    XXH3_128bits_update(st, gguf_get_tensor_ne(g, i), sizeof(int64_t) * 4);
    uint64_t off = base + gguf_get_tensor_offset(g, i);
    size_t left = gguf_get_tensor_size(g, i);
    while (left > 0) {
      const size_t want = std::min(left, buf.size());
      size_t got = 0;
      KVAGENT_RETURN_IF_ERROR(file->Read(off, std::span<std::byte>(buf.data(), want), &got));
      if (got != want) return DataLossError("gguf: tensor " + std::string(name) + " is truncated in " + path);
      XXH3_128bits_update(st, buf.data(), got);
      off += got;
      left -= got;
    }
  }
  return Status::Ok();
}

}  // namespace

const std::vector<std::string>& SupportedLlamaArchitectures() {
  static const std::vector<std::string> v = {"gemma3", "qwen2", "qwen3"};
  return v;
}

StatusOr<GgufModelInfo> ReadGgufModelInfo(const std::string& path, Env* env) {
  if (!env->FileExists(path)) return NotFoundError("gguf: no such file: " + path);
  gguf_init_params params{/*no_alloc=*/true, /*ctx=*/nullptr};
  GgufPtr g(gguf_init_from_file(path.c_str(), params));
  if (!g) return DataLossError("gguf: not a readable GGUF file: " + path);

  GgufModelInfo info;
  const std::string arch = Str(g.get(), "general.architecture", "");
  info.architecture = arch;
  const auto& sup = SupportedLlamaArchitectures();
  if (std::find(sup.begin(), sup.end(), arch) == sup.end()) {
    std::string names;
    for (const auto& s : sup) names += (names.empty() ? "" : ", ") + s;
    return UnimplementedError("llama.cpp engine: GGUF architecture '" + arch + "' is not supported (supported: " +
                              names + ")");
  }
  const std::string p = arch + ".";
  const int layers = static_cast<int>(Num(g.get(), p + "block_count", 0));
  const int embd = static_cast<int>(Num(g.get(), p + "embedding_length", 0));
  const int q_heads = static_cast<int>(Num(g.get(), p + "attention.head_count", 0));
  const int kv_heads = static_cast<int>(Num(g.get(), p + "attention.head_count_kv", q_heads));
  if (layers <= 0 || embd <= 0 || q_heads <= 0 || kv_heads <= 0) {
    return DataLossError("gguf: " + path + " lacks the attention geometry (block_count, embedding_length, head_count)");
  }
  const int head_dim = static_cast<int>(Num(g.get(), p + "attention.key_length", embd / q_heads));
  const int v_dim = static_cast<int>(Num(g.get(), p + "attention.value_length", head_dim));
  if (v_dim != head_dim) return UnimplementedError("llama.cpp engine: key and value head sizes differ");
  const int rot = static_cast<int>(Num(g.get(), p + "rope.dimension_count", head_dim));

  // RoPE as llama.cpp applies it (llama_model_base::load_hparams): the scaling type defaults to
  // "linear" and is inert at factor 1.
  const double base = Num(g.get(), p + "rope.freq_base", 10000.0);
  std::string scaling = Str(g.get(), p + "rope.scaling.type", "linear");
  double factor = Num(g.get(), p + "rope.scaling.factor", 0.0);
  if (factor == 0.0) factor = Num(g.get(), p + "rope.scale_linear", 0.0);
  if (factor == 0.0) factor = 1.0;
  if (scaling == "none") factor = 1.0;
  if (factor != 1.0 && scaling != "linear") {
    return UnimplementedError("llama.cpp engine: RoPE scaling '" + scaling + "' is not supported (none, linear)");
  }
  for (int64_t i = 0; i < gguf_get_n_tensors(g.get()); ++i) {
    if (std::strncmp(gguf_get_tensor_name(g.get(), i), "rope_freqs", 10) == 0) {
      return UnimplementedError("llama.cpp engine: per-frequency RoPE factors (rope_freqs) are not supported");
    }
  }
  RopeSpec full;
  full.theta = base;
  full.rotary_dim = rot;
  full.style = RopeStyle::kHalfSplit;
  if (factor != 1.0) {
    full.scaling = RopeScaling::kLinear;
    full.factor = factor;
  }

  info.layer_swa.assign(layers, false);
  RopeSpec local = full;
  if (arch == "gemma3") {
    info.sliding_window = static_cast<int>(Num(g.get(), p + "attention.sliding_window", 0));
    if (info.sliding_window > 0) {
      info.layer_swa = SwaPattern(g.get(), arch, layers, 6);
      // SWA layers: their own base (llama_hparams' default 10000 when the GGUF has none), no
      // scaling (rope_freq_scale_train_swa is 1).
      local.theta = Num(g.get(), p + "rope.freq_base_swa", 10000.0);
      local.scaling = RopeScaling::kNone;
      local.factor = 1.0;
    }
  }

  ModelSpec& s = info.spec;
  s.name = Str(g.get(), "general.name", arch);
  s.num_layers = layers;
  s.num_q_heads = q_heads;
  s.num_kv_heads = kv_heads;
  s.head_dim = head_dim;
  s.kv_dtype = DType::kF16;
  // llama.cpp's softmax scale: 1/sqrt(head_dim), except Gemma 3 27B (1/sqrt(embd / heads)).
  s.attn_scale = (arch == "gemma3" && layers == 62) ? 1.0 / std::sqrt(static_cast<double>(embd / q_heads))
                                                    : 1.0 / std::sqrt(static_cast<double>(head_dim));
  s.layers.resize(layers);
  for (int i = 0; i < layers; ++i) {
    s.layers[i].sliding_window = info.layer_swa[i] ? info.sliding_window : 0;
    s.layers[i].rope = info.layer_swa[i] ? local : full;
  }

  // Fingerprint: attention configuration + tensor names/types/shapes/bytes.
  XXH3_state_t* st = XXH3_createState();
  if (st == nullptr) return ResourceExhaustedError("gguf: cannot allocate a hash state");
  XXH3_128bits_reset(st);
  ModelSpec shape = s;
  shape.name.clear();
  const std::string cfg = "kv-agent gguf fingerprint v1|" + arch + "|" + shape.Serialize();
  XXH3_128bits_update(st, cfg.data(), cfg.size());
  Status hs = HashTensorData(g.get(), path, env, st);
  const XXH128_hash_t h = XXH3_128bits_digest(st);
  XXH3_freeState(st);
  KVAGENT_RETURN_IF_ERROR(hs);
  s.fingerprint = Hash128{h.low64, h.high64};
  KVAGENT_RETURN_IF_ERROR(s.Validate());
  return info;
}

}  // namespace kvagent::llama_cpp
