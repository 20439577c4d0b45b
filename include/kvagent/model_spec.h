// ModelSpec: the geometry of a model's KV cache and how its keys are rotated.
//
// KV is only valid for the exact weights that produced it. `fingerprint` identifies those
// weights (the adapters hash the checkpoint's tensors and config); every store key and every
// read checks it, and a mismatch is an error (FailedPrecondition), never a silent reuse.
//
// Thread-safety: plain values.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kvagent/dtype.h"
#include "kvagent/hash.h"
#include "kvagent/status.h"

namespace kvagent {

enum class RopeStyle : uint8_t {
  kHalfSplit = 0,    // GPT-NeoX / Llama: pairs (i, i + rotary_dim/2)
  kInterleaved = 1,  // GPT-J: pairs (2i, 2i + 1)
};

enum class RopeScaling : uint8_t {
  kNone = 0,        // HF rope_type "default"
  kLinear = 1,      // "linear": positions divided by factor
  kLlama3 = 2,      // "llama3": per-frequency smooth interpolation
  kYarn = 3,        // "yarn": NTK-by-parts + attention factor on cos/sin
  kDynamicNtk = 4,  // "dynamic": NTK base scaling at a fixed max position
};

// RoPE of one layer. Mirrors the fields of HF `rope_parameters` / `rope_scaling`.
struct RopeSpec {
  bool enabled = true;      // false: the layer has no rotary embedding (NoPE)
  double theta = 10000.0;   // rope_theta (base)
  int rotary_dim = 0;       // rotated dims per head (0 = head_dim); even, <= head_dim
  RopeStyle style = RopeStyle::kHalfSplit;
  RopeScaling scaling = RopeScaling::kNone;
  double factor = 1.0;                    // linear / llama3 / yarn / dynamic
  double low_freq_factor = 1.0;           // llama3
  double high_freq_factor = 4.0;          // llama3
  int64_t original_max_position = 8192;   // llama3 / yarn / dynamic
  double beta_fast = 32.0;                // yarn
  double beta_slow = 1.0;                 // yarn
  double attention_factor = 0.0;          // yarn mscale on cos/sin; 0 = derive from factor
  int64_t dynamic_max_position = 0;       // dynamic: fixed sequence length used for the base

  friend bool operator==(const RopeSpec&, const RopeSpec&) = default;
};

// Attention of one layer.
struct LayerSpec {
  int sliding_window = 0;  // 0 = full attention; else tokens visible to each query
  RopeSpec rope;

  friend bool operator==(const LayerSpec&, const LayerSpec&) = default;
};

struct ModelSpec {
  std::string name;         // informative (e.g. "gemma3-270m")
  int num_layers = 0;
  int num_q_heads = 0;      // attention (query) heads
  int num_kv_heads = 0;     // KV heads; num_q_heads % num_kv_heads == 0 (GQA)
  int head_dim = 0;
  DType kv_dtype = DType::kF32;  // dtype of the canonical payload (f32, f16 or bf16)
  double attn_scale = 0.0;  // softmax scale of q.k; 0 = 1/sqrt(head_dim)
  std::vector<LayerSpec> layers;  // size num_layers
  Hash128 fingerprint;      // identity of the weights

  // InvalidArgument describing the first inconsistency, or OK.
  Status Validate() const;
  // K and V bytes of one token over all layers and KV heads in kv_dtype.
  size_t KvBytesPerToken() const;
  double EffectiveAttnScale() const;
  int GroupSize() const { return num_kv_heads > 0 ? num_q_heads / num_kv_heads : 0; }

  // Serialised form (stable, used in store headers and catalogs) and back.
  std::string Serialize() const;
  static StatusOr<ModelSpec> Deserialize(std::string_view bytes);

  friend bool operator==(const ModelSpec&, const ModelSpec&) = default;
};

// A uniform spec: every layer full attention with the same RoPE.
ModelSpec UniformModelSpec(std::string name, int num_layers, int num_q_heads, int num_kv_heads,
                           int head_dim, DType kv_dtype, const RopeSpec& rope,
                           const Hash128& fingerprint);

}  // namespace kvagent
