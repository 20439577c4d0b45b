// Shared machinery of the rope/*.cc files: cos/sin tables and the strided rotation kernel.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kvagent/rope.h"

namespace kvagent::rope_detail {

// cos/sin of every (token, frequency), [token][rotary_dim / 2], already multiplied by the
// direction's scale (YaRN factor or its inverse) and with sin negated for inverse rotations.
struct CosSinTable {
  int half = 0;
  int64_t tokens = 0;
  // True when every position is the same (a segment moved as a block has one delta): cos and
  // sin then hold that one row, read for every token (it stays in L1 instead of streaming a
  // row per token and head).
  bool uniform = false;
  std::vector<float> cos;
  std::vector<float> sin;
  const float* CosRow(int64_t t) const { return cos.data() + static_cast<size_t>(uniform ? 0 : t) * half; }
  const float* SinRow(int64_t t) const { return sin.data() + static_cast<size_t>(uniform ? 0 : t) * half; }
};

// Threads to use for `elements` elements of work under `options` (>= 1).
int ThreadsFor(const RopeOptions& options, size_t elements);

// angle = positions[t] * inv_freq[i] in double; cos/sin rounded once to float after `scale`.
CosSinTable BuildTable(const RopeFrequencies& freqs, std::span<const int64_t> positions, double scale, bool negate_sin,
                       int threads);

struct PlanePair {
  RopeTensorView in;
  RopeTensorView out;
};

// Rotates every pair (validated views of freqs.head_dim, table.tokens tokens).
void RotatePlanes(const RopeFrequencies& freqs, const CosSinTable& table, std::span<const PlanePair> planes,
                  int threads);

// InvalidArgument unless `v` is a usable [heads][tokens][head_dim] view of f32/f16/bf16 whose
// rows do not overlap each other. `what` names the argument in messages.
Status CheckView(const RopeTensorView& v, int64_t head_dim, const char* what);

// InvalidArgument unless every |position| < 2^31.
Status CheckPositions(std::span<const int64_t> positions, const char* what);

}  // namespace kvagent::rope_detail
