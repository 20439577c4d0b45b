// libFuzzer target: arbitrary bytes as the metadata block of a segment record and as the
// SegmentInfo blob of a catalog row (store/record.h). The decoders must reject or accept without
// crashing; what they accept re-encodes to the same bytes.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "store/record.h"

using namespace kvagent;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  // First two bytes: the token count the header would claim.
  uint16_t tokens;
  std::memcpy(&tokens, data, 2);
  std::string_view bytes(reinterpret_cast<const char*>(data + 2), size - 2);

  Segment s;
  if (disk::DecodeMeta(bytes, tokens, &s).ok()) {
    if (s.tokens.size() != tokens || s.positions.size() != tokens) __builtin_trap();
    if (disk::EncodeMeta(s) != bytes) __builtin_trap();
  }
  SegmentInfo info;
  if (disk::DecodeInfo(bytes, &info).ok()) {
    if (info.codec > 1 || static_cast<uint8_t>(info.layout.dtype) > static_cast<uint8_t>(DType::kBF16)) __builtin_trap();
    if (disk::EncodeInfo(info).size() != bytes.size()) __builtin_trap();
  }
  return 0;
}
