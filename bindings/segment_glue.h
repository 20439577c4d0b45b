// Glue between framework arrays (seen through DLPack) and kvagent::Segment, without nanobind:
// dtype and shape checks, detection of arrays that already hold a canonical payload (so they
// can be wrapped without a copy), strided copies into the canonical layout, and assembly of a
// validated Segment. The nanobind layer (segment_py.cc) only extracts ArrayRefs and owns the
// Python references.
//
// Thread-safety: pure functions; the copies may run with the GIL released as long as the
// caller keeps the source arrays alive.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kvagent/dtype.h"
#include "kvagent/hash.h"
#include "kvagent/segment.h"
#include "kvagent/status.h"

namespace kvagent::py {

// DLPack element type: (type code, bits, lanes) as in DLDataType.
struct DlDType {
  uint8_t code = 0;  // 0 int, 1 uint, 2 float, 4 bfloat, ...
  uint8_t bits = 0;
  uint16_t lanes = 1;
};

// "float32", "int32", "bfloat16", ... for error messages.
std::string DlDTypeName(DlDType t);

// The payload dtype of a DLPack element type: float32 -> f32, float16 -> f16, bfloat16 ->
// bf16; anything else is InvalidArgument naming `what` and the offending type.
StatusOr<DType> PayloadDTypeOf(DlDType t, std::string_view what);

// The DLPack element type of a payload dtype (f32, f16, bf16).
DlDType DlDTypeOf(DType t);

// A CPU array: base pointer (byte offset applied), shape and strides in elements.
struct ArrayRef {
  const std::byte* data = nullptr;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // elements; may be negative or zero (broadcast)
  DType dtype = DType::kF32;
};

// Layout of one array `kv` of shape [layers, 2, kv_heads, tokens, head_dim].
StatusOr<SegmentLayout> LayoutOfKv(const ArrayRef& kv);
// Layout of two arrays `k`, `v` of shape [layers, kv_heads, tokens, head_dim] each (same shape
// and dtype).
StatusOr<SegmentLayout> LayoutOfKAndV(const ArrayRef& k, const ArrayRef& v);

// Start of the canonical payload if `kv` already is one dense canonical block, else nullptr.
const std::byte* CanonicalBaseOfKv(const ArrayRef& kv, const SegmentLayout& layout);
// Same for a (k, v) pair: non-null only when k and v are the K and V halves of one dense
// canonical block (e.g. kv[:, 0] and kv[:, 1]).
const std::byte* CanonicalBaseOfKAndV(const ArrayRef& k, const ArrayRef& v, const SegmentLayout& layout);

// Copies into `dst` (layout.NumBytes() bytes) in canonical order, following the strides.
void CopyKvToCanonical(const ArrayRef& kv, const SegmentLayout& layout, std::byte* dst);
void CopyKAndVToCanonical(const ArrayRef& k, const ArrayRef& v, const SegmentLayout& layout, std::byte* dst);

// Everything of a Segment except its payload.
struct SegmentFields {
  std::vector<int32_t> tokens;
  std::optional<std::vector<int64_t>> positions;  // absent: 0 .. num_tokens-1
  SegmentMeta meta;
  Hash128 model;
  std::optional<Hash128> key;  // absent: MemoryKey(meta.ns, meta.session, meta.turn, meta.chunk)
  Hash128 parent;
  bool pre_rope = true;
  std::string summary;
  const ModelSpec* spec = nullptr;  // when set, the segment must match it (ValidateFor)
};

// Assembles and validates a segment. InvalidArgument (or FailedPrecondition from
// ValidateFor) describes the first problem; nothing is kept on error.
StatusOr<SegmentHandle> MakeSegment(SegmentFields fields, const SegmentLayout& layout, std::shared_ptr<Buffer> payload);

// Layout as text: "layers=2 kv_heads=4 tokens=7 head_dim=16 dtype=bf16".
std::string LayoutString(const SegmentLayout& layout);

}  // namespace kvagent::py
