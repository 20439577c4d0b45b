// libFuzzer target: arbitrary bytes as a segment file. Opening the tier must not crash, and
// every record it serves must re-serialise to a record whose checksums are the ones on disk.
// Built only with clang (tests/cpp/disk/CMakeLists.txt).
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "kvagent/disk_tier.h"
#include "store/record.h"

using namespace kvagent;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view bytes(reinterpret_cast<const char*>(data), size);
  // The parsers alone.
  if (size >= disk::kHeaderSize) {
    disk::RecordHeader h;
    if (disk::DecodeHeader(std::as_bytes(std::span<const uint8_t>(data, disk::kHeaderSize)), &h).ok() &&
        h.kind == disk::RecordKind::kSegment && h.meta_len <= size - disk::kHeaderSize) {
      Segment s;
      disk::DecodeMeta(bytes.substr(disk::kHeaderSize, h.meta_len), h.layout.num_tokens, &s).IgnoreError();
    }
  }
  // The whole recovery path.
  auto env = NewMemEnv();
  if (!env->CreateDirs("/z").ok()) return 0;
  if (!WriteStringToFile(env.get(), bytes, "/z/segments-000001.kvs", false).ok()) return 0;
  DiskTierOptions o;
  o.dir = "/z";
  o.env = env.get();
  auto t = DiskTier::Open(o);
  if (!t.ok()) __builtin_trap();  // a damaged file is skipped, never a failed Open
  for (const auto& info : (*t)->List({})) {
    auto got = (*t)->Get(info.key, info.model);
    if (!got.ok()) continue;
    const Segment& s = **got;
    // Served data came from a verified record of the input: a raw payload hashes to that record's
    // checksum; an int8 one was decoded, so its record is matched by key, codec and layout.
    const bool raw = info.codec == static_cast<uint8_t>(CodecKind::kRaw);
    const uint64_t want = raw ? Checksum64(s.payload->span()) : 0;
    bool found = false;
    for (size_t off = 0; off + disk::kHeaderSize <= size && !found; off += disk::kAlign) {
      disk::RecordHeader h;
      if (disk::DecodeHeader(std::as_bytes(std::span<const uint8_t>(data + off, disk::kHeaderSize)), &h).ok())
        found = h.key == s.key && h.kind == disk::RecordKind::kSegment && h.layout == s.layout &&
                static_cast<uint8_t>(h.codec) == info.codec && (!raw || h.payload_checksum == want);
    }
    if (!found) __builtin_trap();
  }
  return 0;
}
