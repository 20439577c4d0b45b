// Planner: lays out the context the engine will see for a new query:
//
//   [prefix (pinned: system prompt)] [retrieved segments, original order] [recent turns] [new tokens]
//
// and assigns each part fresh contiguous positions starting at 0 (keys are stored pre-RoPE and
// rotated once to these positions by the Positioner). Optionally:
//  - sink repair (EPIC-style): the first `sink_repair_tokens` tokens of every retrieved segment
//    are marked for recomputation in the new context instead of reuse;
//  - page alignment: each segment's first slot starts on a page boundary (vLLM block size 16,
//    SGLang page size) so pages are never shared between segments; positions stay contiguous;
//  - a context limit: lowest-scored retrieved segments are dropped until the plan fits.
//
// Thread-safety: pure function.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kvagent/hash.h"
#include "kvagent/status.h"

namespace kvagent {

enum class PlanPart : uint8_t { kPrefix = 0, kRetrieved = 1, kRecent = 2 };

struct PlanInput {
  Hash128 key;
  int num_tokens = 0;
  double score = 0;          // retrieval score (used to drop segments when over the limit)
  int64_t order = 0;         // original order (e.g. session * 1e6 + turn); parts are sorted by it
};

struct PlanOptions {
  int sink_repair_tokens = 0;  // recompute this many leading tokens of each retrieved segment
  int page_size = 1;           // slot alignment of each segment start (1 = none)
  int64_t max_context = 0;     // total positions allowed incl. new tokens (0 = unlimited)
};

struct PlannedSegment {
  Hash128 key;
  PlanPart part = PlanPart::kRetrieved;
  int num_tokens = 0;
  int64_t position = 0;      // planned position of the segment's first token
  int64_t slot = 0;          // first cache slot (== position unless page-aligned)
  int recompute_tokens = 0;  // leading tokens to recompute rather than reuse
  double score = 0;
};

struct Plan {
  std::vector<PlannedSegment> segments;  // in context order
  int64_t new_tokens_position = 0;       // position of the first new token
  int64_t new_tokens_slot = 0;
  int new_tokens = 0;
  int64_t total_positions = 0;           // positions used incl. new tokens
  int64_t total_slots = 0;               // slots used incl. alignment padding
  int64_t reused_tokens = 0;             // tokens whose KV comes from memory
  int64_t recomputed_tokens = 0;         // sink-repair tokens + new tokens (prefill work)
  std::vector<Hash128> dropped;          // retrieved segments dropped to fit max_context
};

// InvalidArgument for negative sizes, page_size < 1, or when prefix + recent + new tokens alone
// exceed max_context (ResourceExhausted).
StatusOr<Plan> MakePlan(const std::vector<PlanInput>& prefix, const std::vector<PlanInput>& retrieved,
                        const std::vector<PlanInput>& recent, int new_tokens, const PlanOptions& options);

}  // namespace kvagent
