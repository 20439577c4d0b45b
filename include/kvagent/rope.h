// Positioner: rotary position embedding (RoPE) of keys, forward, inverse and re-positioning.
//
// Keys are stored pre-RoPE ("decoupled position encoding") and rotated once, at the position a
// plan gives them. This header converts between the two forms for every RoPE variant a
// RopeSpec describes (kvagent/model_spec.h mirrors HF `rope_parameters`):
//
//   forward     pre-RoPE x            -> post = a * R(p) x        (a: YaRN attention factor, else 1)
//   inverse     post-RoPE at p        -> pre  = R(-p) post / a    (a divided out exactly once)
//   reposition  post-RoPE at p_from   -> post at p_to = R(p_to - p_from) post
//                                        (one rotation from the integer difference; the factor a,
//                                        already in `post`, is neither applied nor removed)
//
// Numerics (docs/rope.md has the reasoning):
//   * Inverse frequencies are computed with the formulas of HF transformers for each rope_type,
//     and rounded to float32 the way HF's fp32 `inv_freq` buffer is, so our keys share the
//     engine's frequencies exactly; relative angles between our keys and the engine's queries
//     are then exact.
//   * Angles are position * inv_freq evaluated in double from int64 positions (exact for
//     |position| < 2^29), cos/sin in double, rounded once to float. Positions up to 1M and
//     beyond are accurate (HF's own fp32 product loses ~0.06 rad at 1M).
//   * Rotation arithmetic is float32; outputs are rounded to the storage dtype
//     (round-to-nearest-even, kvagent/dtype.h). f16/bf16 inputs are widened to f32 first.
//
// Arrays are [heads][tokens][dim] views with element strides (dim contiguous). Input and
// output may be the same memory (in-place), but must not otherwise overlap.
//
// Thread-safety: all functions are reentrant; they may use worker threads internally
// (RopeOptions::max_threads) and return only after every worker has finished.
// Errors: InvalidArgument for bad shapes, dtypes, positions or specs; Unimplemented for RoPE
// variants outside the supported set (the message lists the supported HF rope_types).
// On error nothing is written.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "kvagent/dtype.h"
#include "kvagent/model_spec.h"
#include "kvagent/segment.h"
#include "kvagent/status.h"

namespace kvagent {

// HF rope_type names this module implements, in the order of RopeScaling:
// "default", "linear", "llama3", "yarn", "dynamic".
std::span<const std::string_view> SupportedRopeTypes();
// HF rope_type name of a scaling ("default" for kNone).
std::string_view RopeTypeName(RopeScaling scaling);

// The frequency table of one RopeSpec at one head dimension.
struct RopeFrequencies {
  int head_dim = 0;
  int rotary_dim = 0;  // rotated dims (even); dims [rotary_dim, head_dim) pass through
  RopeStyle style = RopeStyle::kHalfSplit;
  std::vector<float> inv_freq;    // rotary_dim / 2 entries, HF's fp32 values
  double attention_factor = 1.0;  // multiplies cos and sin in the forward direction (YaRN)
};

// OK, or InvalidArgument / Unimplemented describing why `spec` cannot rotate heads of
// `head_dim` (head_dim > 0; rotary_dim even and <= head_dim; theta > 0; factor > 0 where used;
// llama3 high_freq_factor > low_freq_factor; yarn beta_fast > 0, beta_slow > 0;
// dynamic_max_position >= 0). A disabled spec (enabled == false) is valid.
Status ValidateRopeSpec(const RopeSpec& spec, int head_dim);

// Frequencies of an enabled spec (InvalidArgument if disabled or invalid).
StatusOr<RopeFrequencies> ComputeRopeFrequencies(const RopeSpec& spec, int head_dim);

// The YaRN attention factor a spec implies (1 for other scalings): attention_factor if > 0,
// else 0.1 * ln(factor) + 1 for factor > 1, else 1.
double RopeAttentionFactor(const RopeSpec& spec);

// A strided [heads][tokens][dim] array. Strides count elements, not bytes; the dim stride is 1.
struct RopeTensorView {
  void* data = nullptr;
  DType dtype = DType::kF32;  // f32, f16 or bf16
  int64_t num_heads = 0;
  int64_t num_tokens = 0;
  int64_t head_dim = 0;
  int64_t head_stride = 0;   // elements between heads
  int64_t token_stride = 0;  // elements between tokens

  // A dense [heads][tokens][dim] view of `data`.
  static RopeTensorView Dense(void* data, DType dtype, int64_t heads, int64_t tokens, int64_t dim) {
    return RopeTensorView{data, dtype, heads, tokens, dim, tokens * dim, dim};
  }
};

struct RopeOptions {
  // Upper bound on threads used (including the caller's); 0 = std::thread::hardware_concurrency.
  // Small inputs always run on the calling thread.
  int max_threads = 0;
};

enum class RopeDirection : uint8_t {
  kForward = 0,  // pre-RoPE -> post-RoPE at positions
  kInverse = 1,  // post-RoPE at positions -> pre-RoPE
};

// Rotates `in` into `out` (same shape and dtype; may be the same memory) at `positions`
// (one per token). A disabled spec copies. head_dim of the views must match `head_dim`.
Status RopeApply(const RopeSpec& spec, int head_dim, const RopeTensorView& in, const RopeTensorView& out,
                 std::span<const int64_t> positions, RopeDirection direction, const RopeOptions& options = {});

// Moves post-RoPE keys at `from` to post-RoPE at `to` (one rotation by to[t] - from[t]).
Status RopeReposition(const RopeSpec& spec, int head_dim, const RopeTensorView& in, const RopeTensorView& out,
                      std::span<const int64_t> from, std::span<const int64_t> to, const RopeOptions& options = {});

// ---- Segment-level helpers over the canonical payload [layer][k|v][kv_head][token][dim] ----
// Only K planes change; V planes and layers whose RoPE is disabled are left untouched. Each
// layer uses spec.layers[l].rope; layers with equal RopeSpecs share one cos/sin table.
// `payload` must hold layout.NumBytes() bytes; layout must match `spec` (layers, KV heads,
// head_dim, dtype) and positions must have layout.num_tokens entries.

// Pre-RoPE keys -> post-RoPE at `positions`.
Status RotateSegmentKeys(const ModelSpec& spec, const SegmentLayout& layout, std::span<std::byte> payload,
                         std::span<const int64_t> positions, const RopeOptions& options = {});
// Post-RoPE keys at `positions` -> pre-RoPE.
Status UnrotateSegmentKeys(const ModelSpec& spec, const SegmentLayout& layout, std::span<std::byte> payload,
                           std::span<const int64_t> positions, const RopeOptions& options = {});
// Post-RoPE keys at `from` -> post-RoPE at `to`.
Status RepositionSegmentKeys(const ModelSpec& spec, const SegmentLayout& layout, std::span<std::byte> payload,
                             std::span<const int64_t> from, std::span<const int64_t> to,
                             const RopeOptions& options = {});

}  // namespace kvagent
