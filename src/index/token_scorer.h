// Token-level attention scores of retrieval heads (ScoreKind::kTokens; internal to src/index).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace kvagent::index_internal {

// One candidate's token keys: f16 bits laid out [pair][num_tokens][head_dim], where a pair is an
// (index layer slot, kv head) in the order the caller uses for TokenHead::pair.
struct TokenBlock {
  const uint16_t* keys = nullptr;
  int num_tokens = 0;  // >= 1
};

// One voting head: its query vectors q[num_queries][head_dim] (already multiplied by the
// attention scale and any per-dimension weight), the pair of keys it attends to, and its weight.
struct TokenHead {
  const float* q = nullptr;
  int num_queries = 0;  // >= 1
  int pair = 0;
  float weight = 1.0f;
};

// score[i] = sum over heads h of weight_h * (1 / num_queries_h) * sum over queries t of
//   (sum over tokens n of block i of exp(q_t . k_n)) / (sum over blocks j of w_j * sum over n of exp(q_t . k_n)),
// i.e. the attention mass head h puts on candidate i with every candidate's tokens in context,
// averaged over the query tokens. `row_weight` (empty = 1 each) lets a scored row stand for
// several candidates in the denominator (the two-stage search's sample rows). Softmax uses the
// maximum logit per (head, query) as its shift, so large logits neither overflow nor underflow to
// a zero denominator. Runs on up to `threads` threads (split over heads); deterministic: the
// result does not depend on the thread count. `blocks` must be non-empty.
std::vector<float> TokenAttentionScores(std::span<const TokenBlock> blocks, std::span<const double> row_weight,
                                        int head_dim, std::span<const TokenHead> heads, int threads);

// The plain reference of TokenAttentionScores (double precision; tests only).
std::vector<float> TokenAttentionScoresReference(std::span<const TokenBlock> blocks,
                                                 std::span<const double> row_weight, int head_dim,
                                                 std::span<const TokenHead> heads);

}  // namespace kvagent::index_internal
