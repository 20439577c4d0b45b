// Payload codecs: how a segment's canonical KV payload is encoded in a tier.
//
//  - kRaw: the canonical bytes unchanged (bit-exact round trip).
//  - kInt8: symmetric int8 quantisation of K and V with one f32 scale per (layer, k|v, kv_head,
//    channel), i.e. per column of each [token][dim] plane: scale = max|x| / 127 over the
//    plane's tokens. Decoded values are q * scale in the segment dtype. Error per element is
//    at most scale / 2 (plus dtype rounding).
//
// Encoded int8 layout: all scales first (f32, [layer][k|v][head][dim]), then int8 values in
// the canonical element order.
// Thread-safety: pure functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "kvagent/segment.h"
#include "kvagent/status.h"

namespace kvagent {

enum class CodecKind : uint8_t { kRaw = 0, kInt8 = 1 };

std::string_view CodecName(CodecKind c);  // "raw", "int8"
StatusOr<CodecKind> CodecFromName(std::string_view name);

// Encoded size of a payload of `layout` under codec `c`.
size_t EncodedSize(const SegmentLayout& layout, CodecKind c);

// Encodes `raw` (layout.NumBytes() bytes, canonical) into `out` (EncodedSize bytes).
Status EncodePayload(const SegmentLayout& layout, CodecKind c, std::span<const std::byte> raw,
                     std::span<std::byte> out);
// Decodes `encoded` into `out` (layout.NumBytes() bytes). DataLoss if sizes disagree.
Status DecodePayload(const SegmentLayout& layout, CodecKind c, std::span<const std::byte> encoded,
                     std::span<std::byte> out);

// Reconstruction quality of a codec on one payload (for reports and tests).
struct CodecReport {
  size_t raw_bytes = 0;
  size_t encoded_bytes = 0;
  double max_abs_error = 0;   // over all elements
  double rms_error = 0;
  double rel_rms_error = 0;   // rms error / rms of the data
};
StatusOr<CodecReport> MeasureCodec(const SegmentLayout& layout, CodecKind c, std::span<const std::byte> raw);

}  // namespace kvagent
