// Glue between framework arrays on a CUDA device (seen through DLPack) and the GPU KV path
// (kvagent/cuda_kv.h), without nanobind: device, dtype, shape and stride checks that build an
// EngineKvView, canonical spans and per-row arguments. Errors are InvalidArgument naming the
// argument. Defined only in builds with CUDA (KVAGENT_WITH_CUDA).
//
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "kvagent/cuda_kv.h"
#include "kvagent/segment.h"
#include "kvagent/status.h"
#include "segment_glue.h"

namespace kvagent::py {

constexpr int kDlCpu = 1;
constexpr int kDlCuda = 2;

// One array as DLPack describes it; strides in elements.
struct DevArray {
  void* data = nullptr;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;
  DlDType dtype;
  int device_type = 0;
  int device_id = 0;
};

// How an engine lays out one layer's cache (tensors per layer):
//   token_major [tokens, kv_heads, dim]               (slot = token)
//   head_major  [kv_heads, tokens, dim]               (transformers' cache at one batch entry)
//   paged       [num_blocks, block_size, kv_heads, dim]        (vLLM-style, K and V apart)
//   paged_fused [2, num_blocks, block_size, kv_heads, dim]     (one tensor, K at 0, V at 1)
enum class EngineLayout { kTokenMajor, kHeadMajor, kPaged, kPagedFused };
StatusOr<EngineLayout> EngineLayoutFromName(std::string_view name);
// "none", "apply", "inverse", "shift".
StatusOr<cuda::Rotation> RotationFromName(std::string_view name);

// The view over per-layer caches `k`, `v` (v empty for paged_fused). Every array must be on CUDA
// device `device` (-1: the device of the first array, stored back), share one dtype, shape and
// strides, and have a contiguous last (dim) axis.
StatusOr<cuda::EngineKvView> EngineViewOf(EngineLayout layout, const std::vector<DevArray>& k,
                                          const std::vector<DevArray>& v, int* device);

// The canonical layout of a dense, C-contiguous [layers, 2, kv_heads, tokens, dim] CUDA array.
StatusOr<SegmentLayout> CanonicalLayoutOf(const DevArray& a, int device, std::string_view what);

// A per-row int64 argument: `a` (a 1-D contiguous int64 CUDA array with `rows` entries on
// `device`) or, when `a` is null, the default base + row.
struct RowArg {
  const int64_t* ptr = nullptr;
  int64_t base = 0;
};
StatusOr<RowArg> RowArgOf(const DevArray* a, int64_t base, int64_t rows, int device, std::string_view what);

}  // namespace kvagent::py
