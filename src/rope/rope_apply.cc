// Public entry points: argument checks, then one table + one pass over the planes. Forward,
// inverse and reposition all reduce to "rotate by angle(position) with scale": forward scales
// by the YaRN attention factor a, inverse by 1/a with sin negated, reposition by 1 with the
// integer position difference, so a is applied or removed exactly once.
#include <algorithm>
#include <cstring>
#include <string>

#include "kvagent/rope.h"
#include "rope/rope_kernel.h"

namespace kvagent {
namespace {

using rope_detail::CheckPositions;
using rope_detail::CheckView;
using rope_detail::PlanePair;

Status CheckPair(const RopeTensorView& in, const RopeTensorView& out, int64_t head_dim, size_t num_positions) {
  KVAGENT_RETURN_IF_ERROR(CheckView(in, head_dim, "input"));
  KVAGENT_RETURN_IF_ERROR(CheckView(out, head_dim, "output"));
  if (in.dtype != out.dtype) return InvalidArgumentError("rope: input and output dtypes differ");
  if (in.num_heads != out.num_heads || in.num_tokens != out.num_tokens) {
    return InvalidArgumentError("rope: input and output shapes differ");
  }
  if (static_cast<size_t>(in.num_tokens) != num_positions) {
    return InvalidArgumentError("rope: " + std::to_string(num_positions) + " positions for " +
                                std::to_string(in.num_tokens) + " tokens");
  }
  return Status::Ok();
}

// Element-wise copy of a view (disabled specs).
void CopyView(const RopeTensorView& in, const RopeTensorView& out) {
  const size_t es = DTypeSize(in.dtype);
  const size_t row = static_cast<size_t>(in.head_dim) * es;
  for (int64_t h = 0; h < in.num_heads; ++h) {
    for (int64_t t = 0; t < in.num_tokens; ++t) {
      const auto* x = static_cast<const std::byte*>(in.data) + (h * in.head_stride + t * in.token_stride) * es;
      auto* y = static_cast<std::byte*>(out.data) + (h * out.head_stride + t * out.token_stride) * es;
      if (x != y) std::memmove(y, x, row);
    }
  }
}

Status Rotate(const RopeFrequencies& freqs, std::span<const PlanePair> planes, std::span<const int64_t> positions,
              double scale, bool negate_sin, const RopeOptions& options) {
  size_t elements = 0;
  for (const PlanePair& p : planes) elements += static_cast<size_t>(p.in.num_heads * p.in.num_tokens * p.in.head_dim);
  if (elements == 0) return Status::Ok();
  const int threads = rope_detail::ThreadsFor(options, elements);
  rope_detail::CosSinTable table = rope_detail::BuildTable(freqs, positions, scale, negate_sin, threads);
  rope_detail::RotatePlanes(freqs, table, planes, threads);
  return Status::Ok();
}

Status ApplyChecked(const RopeFrequencies& freqs, const RopeTensorView& in, const RopeTensorView& out,
                    std::span<const int64_t> positions, RopeDirection direction, const RopeOptions& options) {
  const PlanePair pair{in, out};
  if (direction == RopeDirection::kForward) {
    return Rotate(freqs, {&pair, 1}, positions, freqs.attention_factor, false, options);
  }
  return Rotate(freqs, {&pair, 1}, positions, 1.0 / freqs.attention_factor, true, options);
}

enum class SegmentOp { kRotate, kUnrotate, kReposition };

Status SegmentKeys(const ModelSpec& spec, const SegmentLayout& layout, std::span<std::byte> payload,
                   std::span<const int64_t> from, std::span<const int64_t> to, SegmentOp op,
                   const RopeOptions& options) {
  if (layout.num_layers != spec.num_layers || layout.num_kv_heads != spec.num_kv_heads ||
      layout.head_dim != spec.head_dim || layout.dtype != spec.kv_dtype) {
    return InvalidArgumentError("rope: segment layout does not match the model spec");
  }
  if (spec.layers.size() != static_cast<size_t>(spec.num_layers)) {
    return InvalidArgumentError("rope: model spec has " + std::to_string(spec.layers.size()) + " layer specs for " +
                                std::to_string(spec.num_layers) + " layers");
  }
  if (layout.num_tokens < 0 || layout.num_kv_heads < 0 || layout.num_layers < 0) {
    return InvalidArgumentError("rope: negative segment extent");
  }
  if (payload.size() != layout.NumBytes()) {
    return InvalidArgumentError("rope: payload has " + std::to_string(payload.size()) + " bytes, layout needs " +
                                std::to_string(layout.NumBytes()));
  }
  const std::span<const int64_t> positions = op == SegmentOp::kRotate ? to : from;
  if (positions.size() != static_cast<size_t>(layout.num_tokens) ||
      (op == SegmentOp::kReposition && to.size() != static_cast<size_t>(layout.num_tokens))) {
    return InvalidArgumentError("rope: positions must have one entry per segment token (" +
                                std::to_string(layout.num_tokens) + ")");
  }
  KVAGENT_RETURN_IF_ERROR(CheckPositions(from, "from"));
  KVAGENT_RETURN_IF_ERROR(CheckPositions(to, "to"));
  std::vector<int64_t> delta;
  if (op == SegmentOp::kReposition) {
    delta.resize(to.size());
    for (size_t t = 0; t < to.size(); ++t) delta[t] = to[t] - from[t];
  }
  // Validate every layer before touching the payload, then group layers by spec.
  std::vector<std::pair<RopeSpec, std::vector<int>>> groups;
  for (int l = 0; l < spec.num_layers; ++l) {
    const RopeSpec& r = spec.layers[static_cast<size_t>(l)].rope;
    if (Status st = ValidateRopeSpec(r, spec.head_dim); !st.ok()) return st.WithContext("layer " + std::to_string(l));
    if (!r.enabled) continue;
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == r; });
    if (it == groups.end()) {
      groups.push_back({r, {l}});
    } else {
      it->second.push_back(l);
    }
  }
  const size_t es = DTypeSize(layout.dtype);
  for (const auto& [rope, layers] : groups) {
    KVAGENT_ASSIGN_OR_RETURN(RopeFrequencies freqs, ComputeRopeFrequencies(rope, spec.head_dim));
    std::vector<PlanePair> planes;
    for (int l : layers) {
      void* k = payload.data() + layout.Offset(l, 0, 0, 0) * es;
      RopeTensorView v =
          RopeTensorView::Dense(k, layout.dtype, layout.num_kv_heads, layout.num_tokens, layout.head_dim);
      planes.push_back(PlanePair{v, v});
    }
    Status st;
    switch (op) {
      case SegmentOp::kRotate:
        st = Rotate(freqs, planes, to, freqs.attention_factor, false, options);
        break;
      case SegmentOp::kUnrotate:
        st = Rotate(freqs, planes, from, 1.0 / freqs.attention_factor, true, options);
        break;
      case SegmentOp::kReposition:
        st = Rotate(freqs, planes, delta, 1.0, false, options);
        break;
    }
    KVAGENT_RETURN_IF_ERROR(st);
  }
  return Status::Ok();
}

}  // namespace

Status RopeApply(const RopeSpec& spec, int head_dim, const RopeTensorView& in, const RopeTensorView& out,
                 std::span<const int64_t> positions, RopeDirection direction, const RopeOptions& options) {
  KVAGENT_RETURN_IF_ERROR(ValidateRopeSpec(spec, head_dim));
  KVAGENT_RETURN_IF_ERROR(CheckPair(in, out, head_dim, positions.size()));
  KVAGENT_RETURN_IF_ERROR(CheckPositions(positions, "rope"));
  if (!spec.enabled) {
    CopyView(in, out);
    return Status::Ok();
  }
  KVAGENT_ASSIGN_OR_RETURN(RopeFrequencies freqs, ComputeRopeFrequencies(spec, head_dim));
  return ApplyChecked(freqs, in, out, positions, direction, options);
}

Status RopeReposition(const RopeSpec& spec, int head_dim, const RopeTensorView& in, const RopeTensorView& out,
                      std::span<const int64_t> from, std::span<const int64_t> to, const RopeOptions& options) {
  KVAGENT_RETURN_IF_ERROR(ValidateRopeSpec(spec, head_dim));
  KVAGENT_RETURN_IF_ERROR(CheckPair(in, out, head_dim, from.size()));
  if (to.size() != from.size()) return InvalidArgumentError("rope: from and to positions differ in length");
  KVAGENT_RETURN_IF_ERROR(CheckPositions(from, "from"));
  KVAGENT_RETURN_IF_ERROR(CheckPositions(to, "to"));
  if (!spec.enabled) {
    CopyView(in, out);
    return Status::Ok();
  }
  KVAGENT_ASSIGN_OR_RETURN(RopeFrequencies freqs, ComputeRopeFrequencies(spec, head_dim));
  std::vector<int64_t> delta(from.size());
  for (size_t t = 0; t < from.size(); ++t) delta[t] = to[t] - from[t];
  const PlanePair pair{in, out};
  return Rotate(freqs, {&pair, 1}, delta, 1.0, false, options);
}

Status RotateSegmentKeys(const ModelSpec& spec, const SegmentLayout& layout, std::span<std::byte> payload,
                         std::span<const int64_t> positions, const RopeOptions& options) {
  return SegmentKeys(spec, layout, payload, {}, positions, SegmentOp::kRotate, options);
}

Status UnrotateSegmentKeys(const ModelSpec& spec, const SegmentLayout& layout, std::span<std::byte> payload,
                           std::span<const int64_t> positions, const RopeOptions& options) {
  return SegmentKeys(spec, layout, payload, positions, {}, SegmentOp::kUnrotate, options);
}

Status RepositionSegmentKeys(const ModelSpec& spec, const SegmentLayout& layout, std::span<std::byte> payload,
                             std::span<const int64_t> from, std::span<const int64_t> to, const RopeOptions& options) {
  return SegmentKeys(spec, layout, payload, from, to, SegmentOp::kReposition, options);
}

}  // namespace kvagent
