// 128-bit identities (xxh3-128, from Debian's libxxhash) for segments and models.
//
// Two segment identities (DESIGN.md "Segment keys"):
//  - PrefixKey: chained over the token sequence, like vLLM/SGLang prefix caching; equal keys
//    mean "same model, same preceding context, same tokens", so the KV is exactly reusable.
//  - MemoryKey: (namespace, session, turn, chunk) names a memory slot; ContentHash of the tokens
//    de-duplicates identical turns stored under different slots.
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "kvagent/status.h"

namespace kvagent {

struct Hash128 {
  uint64_t lo = 0;
  uint64_t hi = 0;

  bool IsZero() const { return lo == 0 && hi == 0; }
  // 32 lowercase hex digits, hi first.
  std::string ToHex() const;
  static StatusOr<Hash128> FromHex(std::string_view hex);

  friend bool operator==(const Hash128& a, const Hash128& b) { return a.lo == b.lo && a.hi == b.hi; }
  friend bool operator!=(const Hash128& a, const Hash128& b) { return !(a == b); }
  friend bool operator<(const Hash128& a, const Hash128& b) {
    return a.hi != b.hi ? a.hi < b.hi : a.lo < b.lo;
  }
};

struct Hash128Hasher {
  size_t operator()(const Hash128& h) const { return static_cast<size_t>(h.lo ^ (h.hi * 0x9e3779b97f4a7c15ULL)); }
};

Hash128 HashBytes(std::span<const std::byte> data, uint64_t seed = 0);
Hash128 HashString(std::string_view s, uint64_t seed = 0);
// 64-bit xxh3 (record checksums).
uint64_t Checksum64(std::span<const std::byte> data);

// Key of `tokens` following a prefix whose key is `parent` (zero for the first block).
Hash128 PrefixKey(const Hash128& model, const Hash128& parent, std::span<const int32_t> tokens);
// Key of a memory slot. Components are length-prefixed, so ("ab","c") != ("a","bc").
Hash128 MemoryKey(std::string_view ns, std::string_view session, int64_t turn, int32_t chunk);
// Hash of the token ids (de-duplication of identical content).
Hash128 ContentHash(const Hash128& model, std::span<const int32_t> tokens);

}  // namespace kvagent
