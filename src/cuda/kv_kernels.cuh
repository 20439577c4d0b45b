// Framework-free KV move kernels: raw pointers, element strides, a stream. No validation here;
// the checking layer (include/kvagent/cuda_kv.h, src/cuda/cuda_kv.cc) guarantees the
// preconditions listed on each launcher.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kvagent::cuda::kernels {

inline constexpr int kMaxLayers = 128;  // engine pointers per launch (K and V each)
inline constexpr int kMaxItems = 96;    // segments per launch; more are split into launches
inline constexpr int kTileTokens = 16;  // tokens per thread block
inline constexpr int kThreads = 256;

enum class Elem : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum class RotMode : int32_t {
  kNone = 0,     // copy
  kApply = 1,    // rotate by +pos_new, cos/sin times attention factor (pre-RoPE -> post-RoPE)
  kInverse = 2,  // rotate by -pos_old, cos/sin divided by attention factor (post -> pre)
  kShift = 3,    // rotate by (pos_new - pos_old), no factor (post at old -> post at new)
};

// One canonical segment span: payload [layer][k|v][head][token][dim] with `total_tokens` tokens
// per plane; the span is tokens [token_begin, token_begin + num_tokens). `data` points at the
// first layer of this launch. Rows of the span are global rows row_offset + t (slot and
// position arrays are indexed by global row).
struct SegItem {
  const void* data;     // elements of the canonical dtype, or int8 when MoveParams::src_int8
  const float* scales;  // int8 only: [layer][k|v][head][dim], first layer of this launch
  int64_t row_offset;
  int32_t total_tokens;
  int32_t token_begin;
  int32_t num_tokens;
  int32_t tile_begin;  // prefix sum of ceil(num_tokens / kTileTokens) over earlier items
};

// Engine side: element (layer, k|v, slot, head, d) lives at
//   ptr[layer][k|v] + (slot / block_size) * stride_block + (slot % block_size) * stride_slot
//                   + head * stride_head + d.
// Contiguous layouts use block_size 1 and stride_block = token stride.
struct EngineSide {
  void* k[kMaxLayers];
  void* v[kMaxLayers];
  int64_t stride_block;
  int64_t stride_slot;
  int64_t stride_head;
  int64_t num_slots;  // slots outside [0, num_slots) skip their row
  int32_t block_size;
};

// Rotary tables for all model layers, device memory.
struct RopeDev {
  const double* inv_freq;     // [model layer][freq_stride]
  const int32_t* rotary_dim;  // [model layer]; 0 = no rotation on that layer
  const float* attn_factor;   // [model layer]
  int32_t freq_stride;
  int32_t interleaved;  // 0: pairs (i, i + rd/2); 1: pairs (2i, 2i + 1)
};

struct MoveParams {
  EngineSide eng;
  SegItem items[kMaxItems];
  int32_t num_items;
  int32_t num_tiles;
  int32_t num_layers;   // layers in this launch (gridDim.y)
  int32_t layer_begin;  // model layer of launch layer 0 (rope tables only)
  int32_t num_heads;
  int32_t head_dim;
  int32_t to_engine;  // 1: canonical -> engine; 0: engine -> canonical
  int32_t src_int8;   // canonical source is int8 + scales (to_engine only)
  Elem elem;          // dtype of the engine side and of a non-int8 canonical side
  RotMode mode;
  int32_t max_half;  // max over launch layers of rotary_dim / 2 (shared-memory size)
  RopeDev rope;
  const int64_t* slots;  // per global row; null: slot = slot_base + row. Negative: row skipped
  int64_t slot_base;
  const int64_t* pos_new;  // per global row; null: pos_new_base + row
  int64_t pos_new_base;
  const int64_t* pos_old;
  int64_t pos_old_base;
};

// Moves K and V of every item for every launch layer in one launch. Two kernels: the pair
// kernel (16-byte vectors, head_dim / (2 vec) a power of two <= 32, no int8; several layers per
// block, see kv_kernels.cu) and the generic one for everything else. The environment variables
// KVAGENT_KV_MOVE=generic, KVAGENT_KV_MOVE_LPB and KVAGENT_KV_MOVE_UNROLL override the choice
// and the launch shape (benchmarks and tests compare them; results are identical).
// Preconditions (checked by the caller): `vec` in {1, 2, 4, 8, 16 / sizeof(elem)} divides head_dim,
// every rotary_dim / 2 (half-split) or rotary_dim (interleaved, vec even or rotation off), every
// stride, and every pointer is aligned to vec elements (vec bytes for int8 data); items and
// tiles non-empty; num_layers <= kMaxLayers.
cudaError_t LaunchMove(const MoveParams& p, int vec, cudaStream_t stream);

// Bytes of dynamic shared memory LaunchMove uses for `max_half` frequencies.
size_t MoveSharedBytes(int max_half);

}  // namespace kvagent::cuda::kernels
