// The byte layout of llama.cpp's per-sequence KV state (llama_state_seq_get_data /
// llama_state_seq_set_data, llama-kv-cache.cpp state_write/state_read) for one sequence, one
// stream, V not transposed (flash attention), no per-cell extension (no M-RoPE):
//
//   u32 magic 0xaf143cd8 (llama-context.cpp io_magic) | i32 seq_id
//   then per cache (one; two for interleaved sliding-window models: full-attention layers, then
//   window layers):
//     u32 n_stream (1) | u32 cell_count | cell_count x (i32 pos, u32 n_seq_id = 1, i32 seq_id)
//     | u32 v_trans (0) | u32 n_layer
//     | n_layer x (i32 k_type, u64 k_row_bytes, cell_count rows)
//     | n_layer x (i32 v_type, u64 v_row_bytes, cell_count rows)
//   A cache with cell_count 0 ends after cell_count.
//
// A row is one cell of one layer: kv_heads x head_dim elements, head-major, in the cache type.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kvagent/status.h"

namespace kvagent::llama_cpp {

inline constexpr uint32_t kLlamaSeqStateMagic = 0xaf143cd8;

struct KvCacheSection {
  std::vector<int32_t> positions;  // one per cell
  struct Layer {
    int32_t k_type = 0, v_type = 0;  // ggml_type
    uint64_t k_row = 0, v_row = 0;   // bytes per cell
    std::vector<uint8_t> k, v;       // positions.size() rows each
  };
  std::vector<Layer> layers;  // empty when positions is empty
};

// Parses `num_sections` caches. DataLoss when the bytes do not follow the layout above
// (including a transposed V or a second stream).
StatusOr<std::vector<KvCacheSection>> ParseKvState(std::span<const uint8_t> bytes, int num_sections);

// The inverse of ParseKvState (sequence id 0).
std::vector<uint8_t> SerializeKvState(const std::vector<KvCacheSection>& sections);

}  // namespace kvagent::llama_cpp
