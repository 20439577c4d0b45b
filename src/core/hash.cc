#include "kvagent/hash.h"

#include <xxhash.h>

#include <cstring>
#include <string>

namespace kvagent {

namespace {

Hash128 FromXxh(XXH128_hash_t h) { return Hash128{h.low64, h.high64}; }

// Incremental hasher that length-prefixes every field.
class FieldHasher {
 public:
  explicit FieldHasher(uint64_t seed) {
    state_ = XXH3_createState();
    XXH3_128bits_reset_withSeed(state_, seed);
  }
  ~FieldHasher() { XXH3_freeState(state_); }
  FieldHasher(const FieldHasher&) = delete;
  FieldHasher& operator=(const FieldHasher&) = delete;

  void Raw(const void* p, size_t n) { XXH3_128bits_update(state_, p, n); }
  void Field(const void* p, size_t n) {
    uint64_t len = n;
    Raw(&len, sizeof(len));
    Raw(p, n);
  }
  void U64(uint64_t v) { Raw(&v, sizeof(v)); }
  void H(const Hash128& h) {
    U64(h.lo);
    U64(h.hi);
  }
  Hash128 Digest() { return FromXxh(XXH3_128bits_digest(state_)); }

 private:
  XXH3_state_t* state_;
};

constexpr uint64_t kPrefixSeed = 0x6b766167656e7401ULL;   // "kvagent\x01"
constexpr uint64_t kMemorySeed = 0x6b766167656e7402ULL;
constexpr uint64_t kContentSeed = 0x6b766167656e7403ULL;

}  // namespace

std::string Hash128::ToHex() const {
  static const char* kDigits = "0123456789abcdef";
  std::string out(32, '0');
  for (int i = 0; i < 16; ++i) out[15 - i] = kDigits[(hi >> (4 * i)) & 0xf];
  for (int i = 0; i < 16; ++i) out[31 - i] = kDigits[(lo >> (4 * i)) & 0xf];
  return out;
}

StatusOr<Hash128> Hash128::FromHex(std::string_view hex) {
  if (hex.size() != 32) return InvalidArgumentError("hash hex must have 32 digits, got " + std::to_string(hex.size()));
  Hash128 h;
  for (size_t i = 0; i < 32; ++i) {
    char c = hex[i];
    uint64_t d;
    if (c >= '0' && c <= '9') d = c - '0';
    else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
    else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
    else return InvalidArgumentError("bad hex digit in hash: " + std::string(hex));
    uint64_t& word = i < 16 ? h.hi : h.lo;
    word = (word << 4) | d;
  }
  return h;
}

Hash128 HashBytes(std::span<const std::byte> data, uint64_t seed) {
  return FromXxh(XXH3_128bits_withSeed(data.data(), data.size(), seed));
}

Hash128 HashString(std::string_view s, uint64_t seed) {
  return FromXxh(XXH3_128bits_withSeed(s.data(), s.size(), seed));
}

uint64_t Checksum64(std::span<const std::byte> data) { return XXH3_64bits(data.data(), data.size()); }

Hash128 PrefixKey(const Hash128& model, const Hash128& parent, std::span<const int32_t> tokens) {
  FieldHasher h(kPrefixSeed);
  h.H(model);
  h.H(parent);
  h.Field(tokens.data(), tokens.size_bytes());
  return h.Digest();
}

Hash128 MemoryKey(std::string_view ns, std::string_view session, int64_t turn, int32_t chunk) {
  FieldHasher h(kMemorySeed);
  h.Field(ns.data(), ns.size());
  h.Field(session.data(), session.size());
  h.U64(static_cast<uint64_t>(turn));
  h.U64(static_cast<uint64_t>(static_cast<uint32_t>(chunk)));
  return h.Digest();
}

Hash128 ContentHash(const Hash128& model, std::span<const int32_t> tokens) {
  FieldHasher h(kContentSeed);
  h.H(model);
  h.Field(tokens.data(), tokens.size_bytes());
  return h.Digest();
}

}  // namespace kvagent
