// GPU KV path, checking layer: moves KV between the canonical segment layout and engine cache
// layouts on a CUDA device, with RoPE re-positioning and int8 dequantisation fused into the copy.
//
// Availability: the declarations below are defined only in builds with CUDA
// (KVAGENT_WITH_CUDA=1). In such a build on a machine without a usable device,
// DeviceAvailable() is false and every function that needs a device returns Unavailable
// without side effects; ComputeRopeTable is host-only and always works.
//
// Pointers: "device pointer" means memory the current device can address: cudaMalloc'd memory
// or mapped pinned host memory (cudaHostAlloc; the fused load then reads the host memory over
// PCIe, no staging). Functions check that pointers are non-null and suitably aligned, and that
// shapes and dtypes agree; they cannot check that a pointer really addresses enough memory.
//
// Streams: all kernels are enqueued on the caller's stream (nullptr = legacy default stream)
// and return after enqueueing; inputs must stay valid and unmodified until the stream reaches
// that point. Launch errors come back as Internal with the CUDA error string.
//
// Thread-safety: functions are reentrant; RopeDeviceTable is immutable after Create and may be
// shared between threads and streams.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kvagent/dtype.h"
#include "kvagent/model_spec.h"
#include "kvagent/status.h"

struct CUstream_st;

namespace kvagent::cuda {

using Stream = CUstream_st*;  // same type as cudaStream_t

// True when the CUDA runtime finds at least one device (cached after the first call).
bool DeviceAvailable();
// OK, or Unavailable naming why no device can be used ("no CUDA device", driver errors).
Status CheckDevice();

// ---- RoPE frequencies ------------------------------------------------------------------------

// The rotation of one layer, resolved from its RopeSpec for head_dim per Hugging Face's
// rope_type rules (default, linear, llama3, yarn, dynamic), computed in double and rounded to
// fp32 like HF's inv_freq buffer (the engine rotates queries with those fp32 values).
// inv_freq has rotary_dim / 2 entries; angle(pos, i) = pos * inv_freq[i] evaluated in double
// from the integer position (linear scaling is folded into inv_freq). Semantics match the CPU
// positioner (kvagent/rope.h), whose ComputeRopeFrequencies (torch's exact fp32 op order) this
// table is built from: forward a * R(p) x, inverse R(-p) x / a, reposition R(p_to - p_from) x.
// attention_factor multiplies cos and sin when rotating (yarn; 1 otherwise) and is applied
// exactly once: kApply multiplies, kInverse divides, kShift (post-RoPE to post-RoPE) leaves it
// alone. A disabled spec gives rotary_dim 0.
struct RopeTable {
  int rotary_dim = 0;
  RopeStyle style = RopeStyle::kHalfSplit;
  double attention_factor = 1.0;
  std::vector<double> inv_freq;
};
// InvalidArgument for an odd or too large rotary_dim, theta <= 1, a non-positive factor where
// scaling needs one, or llama3 with high_freq_factor <= low_freq_factor.
StatusOr<RopeTable> ComputeRopeTable(const RopeSpec& spec, int head_dim);

// The tables of every layer of a model, uploaded to the device once.
class RopeDeviceTable {
 public:
  // Unavailable without a device; InvalidArgument from ComputeRopeTable, or if layers mix
  // rotation styles (one style per model).
  static StatusOr<std::shared_ptr<const RopeDeviceTable>> Create(const ModelSpec& spec);
  // From per-layer tables computed elsewhere (one per model layer; rotary_dim 0 = no rotation).
  // InvalidArgument unless every table has rotary_dim / 2 frequencies, an even rotary_dim <=
  // head_dim, a positive attention factor, and the layers share one style.
  static StatusOr<std::shared_ptr<const RopeDeviceTable>> Create(std::vector<RopeTable> tables, int head_dim);
  ~RopeDeviceTable();
  RopeDeviceTable(const RopeDeviceTable&) = delete;
  RopeDeviceTable& operator=(const RopeDeviceTable&) = delete;

  int num_layers() const { return static_cast<int>(host_.size()); }
  int head_dim() const { return head_dim_; }
  const RopeTable& layer(int i) const { return host_[static_cast<size_t>(i)]; }
  // Device arrays (see src/cuda/kv_kernels.cuh RopeDev).
  const double* inv_freq() const { return inv_freq_; }
  const int32_t* rotary_dim() const { return rotary_dim_; }
  const float* attention_factor() const { return attn_; }
  int freq_stride() const { return freq_stride_; }
  bool interleaved() const { return interleaved_; }

 private:
  RopeDeviceTable() = default;
  std::vector<RopeTable> host_;
  int head_dim_ = 0;
  int freq_stride_ = 0;
  bool interleaved_ = false;
  double* inv_freq_ = nullptr;
  int32_t* rotary_dim_ = nullptr;
  float* attn_ = nullptr;
};

// ---- layouts ---------------------------------------------------------------------------------

// An engine's KV cache for a range of layers. Element (layer l, K or V, slot s, head h, dim d)
// is at  k_layers[l] (or v_layers[l]) + (s / block_size) * stride_block
//        + (s % block_size) * stride_slot + h * stride_head + d     (strides in elements).
// The dim axis must be contiguous. Factories cover the common layouts; any strided view can be
// described directly (e.g. a slice of a larger cache).
struct EngineKvView {
  DType dtype = DType::kBF16;
  int num_kv_heads = 0;
  int head_dim = 0;
  std::vector<void*> k_layers;  // device pointers, one per layer
  std::vector<void*> v_layers;
  int block_size = 1;
  int64_t num_slots = 0;  // addressable slots per layer (blocks * block_size, or tokens)
  int64_t stride_block = 0;
  int64_t stride_slot = 0;
  int64_t stride_head = 0;

  // vLLM-style separate caches per layer: [num_blocks, block_size, kv_heads, dim].
  static EngineKvView Paged(DType dtype, int num_kv_heads, int head_dim, int block_size, int64_t num_blocks,
                            std::vector<void*> k_layers, std::vector<void*> v_layers);
  // One tensor per layer [2, num_blocks, block_size, kv_heads, dim] (K at index 0, V at 1).
  static EngineKvView PagedFused(DType dtype, int num_kv_heads, int head_dim, int block_size, int64_t num_blocks,
                                 const std::vector<void*>& kv_layers);
  // Contiguous [tokens, kv_heads, dim] per layer; slot = token index.
  static EngineKvView TokenMajor(DType dtype, int num_kv_heads, int head_dim, int64_t max_tokens,
                                 std::vector<void*> k_layers, std::vector<void*> v_layers);
  // transformers' [batch, kv_heads, tokens, dim] per layer, pointers already at the batch
  // entry; slot = token index.
  static EngineKvView HeadMajor(DType dtype, int num_kv_heads, int head_dim, int64_t max_tokens,
                                std::vector<void*> k_layers, std::vector<void*> v_layers);

  int num_layers() const { return static_cast<int>(k_layers.size()); }
};

// One canonical segment (payload [layer][k|v][kv_head][token][dim]) in device-addressable
// memory, and the token span of it to move. Either `data` holds elements of the op's dtype,
// or (int8) `data` holds int8 values in canonical order and `scales` the f32 scales
// [layer][k|v][kv_head][dim] (kvagent/codec.h's int8 codec, its two parts as two pointers).
struct CanonicalSpan {
  const void* data = nullptr;     // at layer 0 of the segment (not of layer_begin)
  const float* scales = nullptr;  // int8 only
  int total_tokens = 0;           // tokens per [token][dim] plane of the payload
  int token_begin = 0;            // first token moved
  int num_tokens = 0;             // tokens moved, >= 1
};

enum class Rotation {
  kNone,     // plain copy, bit-exact
  kApply,    // pre-RoPE keys -> keys rotated to new_positions (times the attention factor)
  kInverse,  // keys rotated at old_positions -> pre-RoPE keys
  kShift,    // keys rotated at old_positions -> rotated at new_positions (one rotation by the
             // exact integer difference; never chained)
};

// Row r of a move is token r of the concatenated spans (span 0's tokens first).
// Per-row arrays are device int64 arrays with one entry per row; a null array means the
// contiguous default base + r.
struct MoveOptions {
  int layer_begin = 0;                   // model layer of the first layer moved: view.k_layers[i] is model
                                         // layer layer_begin + i; spans are read/written from that layer
  int num_layers = -1;                   // layers moved; -1 = all of the view's layers
  int span_layer_begin = -1;             // layer of the spans' data paired with layer_begin; -1: same as
                                         // layer_begin (spans hold every layer). E.g. 0 for a staging
                                         // buffer that holds only the moved layers.
  bool int8_source = false;              // spans hold int8 + scales (LoadToEngine only)
  DType canonical_dtype = DType::kBF16;  // element type of non-int8 spans; must equal view dtype
  Rotation rotation = Rotation::kNone;
  const RopeDeviceTable* rope = nullptr;  // required unless rotation is kNone
  const int64_t* slots = nullptr;         // engine slot per row; outside [0, num_slots): row skipped
  int64_t slot_base = 0;
  const int64_t* new_positions = nullptr;
  int64_t new_position_base = 0;
  const int64_t* old_positions = nullptr;
  int64_t old_position_base = 0;
  int64_t max_position = int64_t{1} << 40;  // documented accuracy range; bases are checked
};

// Canonical spans -> engine cache (e.g. load retrieved segments, rotating keys to planned
// positions). Writes only the engine slots of moved rows; V and the non-rotary dims of K are
// copied bit-exactly unless int8_source (then dequantised: q * scale rounded to the dtype).
// InvalidArgument for inconsistent shapes, dtypes, alignment, null pointers, a default slot or
// position range out of bounds, or over 2^31 slots in a paged view; Unavailable without a device;
// Internal for CUDA launch errors.
Status LoadToEngine(std::span<const CanonicalSpan> spans, const EngineKvView& view, const MoveOptions& options,
                    Stream stream);

// Engine cache -> canonical spans (e.g. capture a turn's KV, un-rotating keys to pre-RoPE).
// `spans[i].data` is written (cast from const); int8 is not supported. Same errors.
Status SaveFromEngine(std::span<const CanonicalSpan> spans, const EngineKvView& view, const MoveOptions& options,
                      Stream stream);

// A canonical layout viewed as an "engine" view (slot = token index), e.g. to re-position a
// device-resident segment into another canonical buffer, or in place (same pointers).
EngineKvView CanonicalAsView(DType dtype, int num_layers, int num_kv_heads, int head_dim, int num_tokens, void* data);

}  // namespace kvagent::cuda
