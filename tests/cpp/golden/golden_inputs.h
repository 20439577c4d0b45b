// The inputs of the golden files in tests/cpp/golden/: fixed values (no std:: random
// distributions, whose output differs between standard libraries) that golden_gen serialises and
// golden_test compares the checked-in bytes against. Changing anything here changes the files:
// regenerate them only for a deliberate format change that keeps reading the old files.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kvagent/codec.h"
#include "kvagent/dtype.h"
#include "kvagent/hash.h"
#include "kvagent/index.h"
#include "kvagent/model_spec.h"
#include "kvagent/segment.h"
#include "store/record.h"

namespace kvagent::golden {

inline constexpr Hash128 kModel{0x0123456789abcdefULL, 0xfedcba9876543210ULL};

// Gemma-3-like geometry: sliding and global layers with different RoPE, YaRN on one layer.
inline ModelSpec Spec() {
  RopeSpec local;
  local.theta = 10000.0;
  RopeSpec global;
  global.theta = 1000000.0;
  global.scaling = RopeScaling::kLinear;
  global.factor = 8.0;
  RopeSpec yarn;
  yarn.theta = 500000.0;
  yarn.rotary_dim = 4;
  yarn.style = RopeStyle::kInterleaved;
  yarn.scaling = RopeScaling::kYarn;
  yarn.factor = 4.0;
  yarn.original_max_position = 4096;
  yarn.beta_fast = 16.0;
  yarn.beta_slow = 2.0;
  yarn.attention_factor = 1.25;
  ModelSpec s;
  s.name = "golden-4l";
  s.num_layers = 4;
  s.num_q_heads = 4;
  s.num_kv_heads = 2;
  s.head_dim = 8;
  s.kv_dtype = DType::kBF16;
  s.attn_scale = 0.0625;
  s.fingerprint = kModel;
  s.layers = {LayerSpec{512, local}, LayerSpec{512, local}, LayerSpec{0, global}, LayerSpec{0, yarn}};
  return s;
}

// Exactly representable in f16, so the f16 form round-trips.
inline KeySummary Summary() {
  KeySummary k;
  k.num_kv_heads = 2;
  k.head_dim = 4;
  k.num_tokens = 7;
  k.layers = {0, 3};
  const size_t n = 2 * 2 * 4;
  for (size_t i = 0; i < n; ++i) {
    float base = static_cast<float>(static_cast<int>(i % 9) - 4) * 0.25f;
    k.min.push_back(base - 0.5f);
    k.max.push_back(base + 0.75f);
    k.mean.push_back(base + 0.125f);
  }
  return k;
}

// Deterministic segment `n` (0, 1, 2, ...): f32 payload values are small multiples of 1/16.
inline Segment MakeSegment(int n, DType dtype = DType::kF32, int num_tokens = 3) {
  Segment s;
  s.key = MemoryKey("golden", "session-" + std::to_string(n % 2), n, 0);
  s.model = kModel;
  s.parent = n == 0 ? Hash128{} : Hash128{static_cast<uint64_t>(n), 0x77};
  s.layout = SegmentLayout{2, 2, 4, num_tokens, dtype};
  s.pre_rope = n != 1;
  for (int t = 0; t < num_tokens; ++t) {
    s.tokens.push_back(1000 * (n + 1) + t);
    s.positions.push_back(10 * n + t);
  }
  s.meta = SegmentMeta{"golden", "agent-" + std::to_string(n), "session-" + std::to_string(n % 2), n, 0,
                       n % 2 == 0 ? "user" : "assistant", "turn " + std::to_string(n) + " \xc3\xa9t\xc3\xa9",
                       1700000000000000 + n};
  s.summary = n == 0 ? Summary().Serialize(DType::kF16) : std::string("opaque-") + std::to_string(n);
  s.payload = Buffer::Allocate(s.layout.NumBytes()).value();
  for (size_t i = 0; i < s.layout.NumElements(); ++i) {
    float v = static_cast<float>(static_cast<int>((i * 7 + static_cast<size_t>(n) * 13) % 41) - 20) / 16.0f;
    StoreFromF32(s.payload->data(), dtype, i, v);
  }
  return s;
}

inline SegmentInfo Info(int n) {
  SegmentInfo i = InfoOf(MakeSegment(n));
  i.stored_bytes = 4096 + static_cast<uint64_t>(n);
  i.codec = static_cast<uint8_t>(n % 2);
  return i;
}

// Sets a record's format version (1 or 2) and re-checksums its header. A version 1 record is a
// version 2 record without payload padding or padding records (docs/storage-format.md).
inline void SetVersion(std::string* bytes, size_t at, uint16_t version) {
  std::memcpy(bytes->data() + at + 4, &version, 2);
  uint64_t sum = Checksum64(std::as_bytes(std::span<const char>(bytes->data() + at, disk::kHeaderSize - 8)));
  std::memcpy(bytes->data() + at + disk::kHeaderSize - 8, &sum, 8);
}

inline void AppendRecord(std::string* file, disk::EncodedRecord rec, std::span<const std::byte> payload,
                         uint16_t version) {
  const size_t at = file->size();
  *file += rec.prefix;
  file->append(reinterpret_cast<const char*>(payload.data()), payload.size());
  file->resize(at + rec.header.record_len, '\0');
  SetVersion(file, at, version);
}

inline std::string Encoded(const Segment& s, CodecKind codec) {
  std::string out(EncodedSize(s.layout, codec), '\0');
  if (!EncodePayload(s.layout, codec, s.payload->span(), std::as_writable_bytes(std::span<char>(out))).ok()) return {};
  return out;
}

// Segment 3 is written and then deleted by a tombstone in both files.
inline constexpr int kDeletedSegment = 3;

// A segment file of format `version` (1 or 2): segment 0 (raw f32), segment 1 (int8 codec, f16),
// segment 3 then its tombstone, and segment 2 (bf16, raw). Version 2 adds a padding record before
// segment 2 and pads segment 2's payload to a 512-byte boundary.
inline std::string RecordsFile(uint16_t version) {
  std::string file;
  auto add = [&](const Segment& s, CodecKind codec, uint32_t pad_block) {
    std::string payload = Encoded(s, codec);
    auto bytes = std::as_bytes(std::span<const char>(payload));
    disk::EncodedRecord rec = disk::BuildSegmentRecord(s, codec, bytes);
    if (pad_block != 0) disk::PadPayloadToBlock(&rec, file.size(), pad_block);
    AppendRecord(&file, std::move(rec), bytes, version);
  };
  add(MakeSegment(0), CodecKind::kRaw, 0);
  add(MakeSegment(1, DType::kF16, 5), CodecKind::kInt8, 0);
  add(MakeSegment(kDeletedSegment), CodecKind::kRaw, 0);
  AppendRecord(&file, disk::BuildTombstone(MakeSegment(kDeletedSegment).key), {}, version);
  if (version >= 2) {
    uint64_t pad = disk::PaddingTo(file.size(), 512);
    if (pad != 0) AppendRecord(&file, disk::BuildPadding(pad), {}, version);
  }
  add(MakeSegment(2, DType::kBF16), CodecKind::kRaw, version >= 2 ? 512 : 0);
  return file;
}

// Golden hash values: name -> key, one line each in hashes.txt.
inline std::vector<std::pair<std::string, Hash128>> Hashes() {
  const std::vector<int32_t> tokens = {2, 106, 1645, 108, 4521, 236761, 0, -1};
  const Hash128 first = PrefixKey(kModel, Hash128{}, tokens);
  return {
      {"prefix_key_first", first},
      {"prefix_key_chained", PrefixKey(kModel, first, std::span<const int32_t>(tokens).subspan(0, 3))},
      {"prefix_key_empty", PrefixKey(kModel, Hash128{}, {})},
      {"memory_key", MemoryKey("ns", "session-1", 42, 0)},
      {"memory_key_chunk", MemoryKey("ns", "session-1", 42, 3)},
      {"memory_key_split_ab_c", MemoryKey("ab", "c", 0, 0)},
      {"memory_key_split_a_bc", MemoryKey("a", "bc", 0, 0)},
      {"memory_key_negative_turn", MemoryKey("", "", -7, -1)},
      {"memory_key_unicode", MemoryKey("n\xc3\xa4me", "\xe2\x80\x8b", 1, 0)},
      {"content_hash", ContentHash(kModel, tokens)},
      {"hash_string", HashString("kv-agent")},
      {"hash_string_seeded", HashString("kv-agent", 17)},
  };
}

}  // namespace kvagent::golden
