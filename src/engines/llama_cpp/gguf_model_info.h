// What kv-agent needs to know about a GGUF model before llama.cpp runs it: whether the
// architecture is supported, its attention geometry and per-layer RoPE/window as llama.cpp
// applies them, and the weights fingerprint (see kvagent/llama_engine.h for its definition).
// Reads metadata with ggml's gguf reader and tensor bytes through Env.
#pragma once

#include <string>
#include <vector>

#include "kvagent/env.h"
#include "kvagent/model_spec.h"
#include "kvagent/status.h"

namespace kvagent::llama_cpp {

struct GgufModelInfo {
  std::string architecture;
  ModelSpec spec;               // kv_dtype left to the caller; fingerprint filled
  std::vector<bool> layer_swa;  // per layer: held by llama.cpp's sliding-window cache
  int sliding_window = 0;       // 0 = none
};

// The architectures the adapter knows how to map (all use half-split "NEOX" RoPE).
const std::vector<std::string>& SupportedLlamaArchitectures();

// Reads `path`. NotFound if missing, DataLoss if not a readable GGUF, Unimplemented for an
// unsupported architecture or RoPE scaling.
StatusOr<GgufModelInfo> ReadGgufModelInfo(const std::string& path, Env* env);

}  // namespace kvagent::llama_cpp
