// Engine KV views (kvagent/cuda_kv.h): plain descriptions of device memory layouts, built the
// same way with and without CUDA (only the moves need a device).
#include <utility>
#include <vector>

#include "kvagent/cuda_kv.h"

namespace kvagent::cuda {

EngineKvView EngineKvView::Paged(DType dtype, int num_kv_heads, int head_dim, int block_size, int64_t num_blocks,
                                 std::vector<void*> k_layers, std::vector<void*> v_layers) {
  EngineKvView v;
  v.dtype = dtype;
  v.num_kv_heads = num_kv_heads;
  v.head_dim = head_dim;
  v.k_layers = std::move(k_layers);
  v.v_layers = std::move(v_layers);
  v.block_size = block_size;
  v.num_slots = num_blocks * block_size;
  v.stride_head = head_dim;
  v.stride_slot = static_cast<int64_t>(num_kv_heads) * head_dim;
  v.stride_block = v.stride_slot * block_size;
  return v;
}

EngineKvView EngineKvView::PagedFused(DType dtype, int num_kv_heads, int head_dim, int block_size, int64_t num_blocks,
                                      const std::vector<void*>& kv_layers) {
  const int64_t half = num_blocks * block_size * num_kv_heads * head_dim;
  std::vector<void*> ks, vs;
  for (void* p : kv_layers) {
    ks.push_back(p);
    vs.push_back(p == nullptr ? nullptr : static_cast<char*>(p) + half * static_cast<int64_t>(DTypeSize(dtype)));
  }
  return Paged(dtype, num_kv_heads, head_dim, block_size, num_blocks, std::move(ks), std::move(vs));
}

EngineKvView EngineKvView::TokenMajor(DType dtype, int num_kv_heads, int head_dim, int64_t max_tokens,
                                      std::vector<void*> k_layers, std::vector<void*> v_layers) {
  EngineKvView v;
  v.dtype = dtype;
  v.num_kv_heads = num_kv_heads;
  v.head_dim = head_dim;
  v.k_layers = std::move(k_layers);
  v.v_layers = std::move(v_layers);
  v.block_size = 1;
  v.num_slots = max_tokens;
  v.stride_block = static_cast<int64_t>(num_kv_heads) * head_dim;
  v.stride_slot = 0;
  v.stride_head = head_dim;
  return v;
}

EngineKvView EngineKvView::HeadMajor(DType dtype, int num_kv_heads, int head_dim, int64_t max_tokens,
                                     std::vector<void*> k_layers, std::vector<void*> v_layers) {
  EngineKvView v = TokenMajor(dtype, num_kv_heads, head_dim, max_tokens, std::move(k_layers), std::move(v_layers));
  v.stride_block = head_dim;
  v.stride_head = max_tokens * head_dim;
  return v;
}

EngineKvView CanonicalAsView(DType dtype, int num_layers, int num_kv_heads, int head_dim, int num_tokens, void* data) {
  const int64_t plane = static_cast<int64_t>(num_tokens) * head_dim;
  const int64_t es = static_cast<int64_t>(DTypeSize(dtype));
  std::vector<void*> ks, vs;
  for (int l = 0; l < num_layers; ++l) {
    char* base = data == nullptr ? nullptr : static_cast<char*>(data);
    ks.push_back(base ? base + (2LL * l) * num_kv_heads * plane * es : nullptr);
    vs.push_back(base ? base + (2LL * l + 1) * num_kv_heads * plane * es : nullptr);
  }
  EngineKvView v = EngineKvView::TokenMajor(dtype, num_kv_heads, head_dim, num_tokens, std::move(ks), std::move(vs));
  v.stride_block = head_dim;
  v.stride_head = plane;
  return v;
}

}  // namespace kvagent::cuda
