// LlamaEngine: a GGUF model served by llama.cpp (CPU), with kv-agent's canonical KV in and out.
//
// The engine owns one llama.cpp model and one context with a single sequence (seq 0). Its state
// is "the current context": a run of KV cells at positions 0..NextPosition()-1. Every call either
// replaces that context (PlaceContext, Reset) or extends it (Capture, Generate); QueryVectors
// leaves it as it was.
//
// Canonical KV (DESIGN.md): float32 [layer][k|v][kv_head][token][dim], keys pre-RoPE (after the
// per-head q/k norm, before rotation), values as is.
//
//   Capture       decodes tokens after the context and reads their KV back from llama.cpp's
//                 cache through the per-sequence state API (llama_state_seq_get_data): keys
//                 post-RoPE at their positions in the cache's type (f16, f32 or q8_0) ->
//                 dequantised -> un-rotated with the kv-agent positioner (kvagent/rope.h).
//                 Sliding-window models are decoded in chunks of at most the window, so the
//                 window cache still holds every token of the chunk when it is read.
//   PlaceContext  rotates pre-RoPE keys to the planned positions once (positioner), converts
//                 to the cache's type and writes the cells with llama_state_seq_set_data (the
//                 same byte layout llama.cpp writes; window layers receive only the last
//                 `window` tokens, all a later query can see). No token is recomputed.
//   QueryVectors  pre-RoPE Q of tokens after the context at the asked layers: the graph
//                 evaluation callback copies llama.cpp's "Qcur-<layer>" tensors (the RoPE node's
//                 output, [head_dim, q_heads, tokens]) and the positioner un-rotates them; the
//                 tokens are removed from the cache afterwards (llama_memory_seq_rm).
//   Generate      decodes only the new tokens after the context, then greedy decoding.
//
// Supported GGUF architectures: gemma3, qwen2, qwen3, llama (RoPE "none" or "linear" scaling,
// no per-frequency rope_freqs tensor). Others fail Open with Unimplemented naming the
// architecture.
//
// Identity: spec().fingerprint is xxh3-128 over the attention configuration (layers, heads,
// head_dim, per-layer window and RoPE) and every tensor's name, type, shape and raw (quantised)
// bytes as stored in the GGUF file: the same weights give the same fingerprint whatever the
// file's other metadata; a different quantisation of the same model is a different model.
//
// Errors: Status codes as kvagent/status.h. InvalidArgument for bad shapes, token ids outside
// the vocabulary, positions that are not increasing, too many tokens for the context;
// NotFound/DataLoss for unreadable GGUF files; Unimplemented for unsupported architectures;
// Internal when llama.cpp itself fails. A failed call leaves the context empty (Reset) unless
// said otherwise; bad arguments are rejected before anything changes.
//
// Thread-safety: one LlamaEngine is used by one thread at a time. llama.cpp runs its own worker
// threads (LlamaEngineOptions::threads) inside each call.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvagent/env.h"
#include "kvagent/model_spec.h"
#include "kvagent/status.h"

namespace kvagent {

// Element type of llama.cpp's KV cache (llama_context_params type_k / type_v).
enum class LlamaKvType : uint8_t { kF16 = 0, kF32 = 1, kQ8_0 = 2 };

// "f16", "f32", "q8_0" (InvalidArgument otherwise).
StatusOr<LlamaKvType> ParseLlamaKvType(std::string_view name);
std::string_view LlamaKvTypeName(LlamaKvType type);

struct LlamaEngineOptions {
  std::string model_path;       // a GGUF file
  int context_tokens = 8192;    // llama.cpp n_ctx: the most tokens the context may hold
  int batch_tokens = 512;       // n_batch = n_ubatch: tokens per llama_decode step
  int threads = 0;              // CPU threads; 0 = all hardware threads
  LlamaKvType kv_type = LlamaKvType::kF16;
};

// KV of a span of tokens: kv float32 [layers][2][kv_heads][tokens][head_dim], keys pre-RoPE.
struct LlamaKv {
  std::vector<float> kv;
  std::vector<int64_t> positions;  // one per token
  int64_t num_tokens() const { return static_cast<int64_t>(positions.size()); }
};

struct LlamaGeneration {
  std::vector<int32_t> tokens;  // greedy output, stop token excluded
  int64_t prefill_tokens = 0;   // tokens llama.cpp computed for the prompt
  int64_t context_tokens = 0;   // tokens already in the context (not recomputed)
  double prefill_s = 0;         // llama_decode of the prompt
  double first_token_s = 0;     // prefill + selection of the first token
  double decode_s = 0;          // the steps after the first token
};

class LlamaEngine {
 public:
  // Loads the GGUF at options.model_path (memory-mapped by llama.cpp) and creates the context.
  // `env` reads the file for the fingerprint; it must outlive the call only.
  static StatusOr<std::unique_ptr<LlamaEngine>> Open(const LlamaEngineOptions& options,
                                                    Env* env = Env::Default());
  ~LlamaEngine();
  LlamaEngine(const LlamaEngine&) = delete;
  LlamaEngine& operator=(const LlamaEngine&) = delete;
  LlamaEngine(LlamaEngine&&) noexcept;  // the moved-from engine may only be destroyed

  // kv_dtype is f32: the canonical memory this engine produces and places (see the .cc for why).
  const ModelSpec& spec() const;
  const std::string& architecture() const;  // GGUF general.architecture, e.g. "gemma3"
  LlamaKvType kv_type() const;
  int context_capacity() const;

  // ---- tokenizer (llama.cpp's own, from the GGUF) ----
  int32_t vocab_size() const;
  int32_t bos_token() const;  // -1 when the model has none
  std::vector<int32_t> end_of_generation_tokens() const;
  StatusOr<std::vector<int32_t>> Tokenize(std::string_view text, bool add_special, bool parse_special) const;
  // Text of the tokens (special tokens rendered as their text). InvalidArgument for bad ids.
  StatusOr<std::string> Detokenize(std::span<const int32_t> tokens) const;
  // The GGUF's tokenizer.chat_template ("" when absent).
  std::string ChatTemplate() const;

  // ---- the context (sequence 0) ----
  void Reset();
  int64_t NextPosition() const;  // position the next token takes (0 when empty)

  // Replaces the context with `kv` ([layers][2][kv_heads][n][head_dim] float32, keys pre-RoPE)
  // at `positions` (n strictly increasing, >= 0). n == 0 empties the context.
  Status PlaceContext(std::span<const float> kv, std::span<const int64_t> positions);

  // Decodes `tokens` after the context (positions NextPosition()..) and returns their KV as
  // llama.cpp cached it, in canonical form. The tokens stay in the context.
  StatusOr<LlamaKv> Capture(std::span<const int32_t> tokens);

  // Pre-RoPE queries of `tokens` after the context: float32 [layers.size()][q_heads][tokens][head_dim]
  // in the order of `layers`. The context is unchanged afterwards.
  StatusOr<std::vector<float>> QueryVectors(std::span<const int32_t> tokens, std::span<const int> layers);

  // Decodes `tokens` after the context (prefill), then greedy decoding until a token of
  // `stop_tokens` (excluded from the result) or max_new_tokens. Prompt and output stay in the
  // context. max_new_tokens >= 1.
  StatusOr<LlamaGeneration> Generate(std::span<const int32_t> tokens, int max_new_tokens,
                                     std::span<const int32_t> stop_tokens);

  // Logits [vocab] after decoding `tokens` past the context (they stay in the context).
  StatusOr<std::vector<float>> Logits(std::span<const int32_t> tokens);

  struct Impl;

 private:
  explicit LlamaEngine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvagent
