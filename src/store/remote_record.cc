// Key schema and value format of the remote tier (kvagent/remote_tier.h).
#include <cstring>

#include "kvagent/remote_tier.h"
#include "kvagent/wire.h"
#include "store/record.h"

namespace kvagent {

namespace {

constexpr uint32_t kTableMagic = 0x5452564bu;  // "KVRT" little-endian

std::string ModelKeyPrefix(std::string_view ns, const Hash128& model, const Hash128& key) {
  return RemoteKeyPrefix(ns) + model.ToHex() + ":{" + key.ToHex() + "}:";
}

uint32_t ChunkCount(uint64_t payload_bytes, uint64_t chunk_bytes) {
  return static_cast<uint32_t>((payload_bytes + chunk_bytes - 1) / chunk_bytes);
}

}  // namespace

Status ValidateNamespace(std::string_view ns) {
  if (ns.empty() || ns.size() > 64)
    return InvalidArgumentError("remote namespace must be 1-64 characters, got " + std::to_string(ns.size()));
  for (char c : ns) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
                    c == '.' || c == '-';
    // ':' would let one namespace's prefix cover another's; glob characters would widen ACL patterns.
    if (!ok) return InvalidArgumentError("remote namespace may hold only [A-Za-z0-9_.-]: \"" + std::string(ns) + "\"");
  }
  return Status::Ok();
}

std::string RemoteKeyPrefix(std::string_view ns) { return "kva:v1:" + std::string(ns) + ":"; }

std::string RemoteMetaKey(std::string_view ns, const Hash128& model, const Hash128& key) {
  return ModelKeyPrefix(ns, model, key) + "m";
}

std::string RemoteChunkKey(std::string_view ns, const Hash128& model, const Hash128& key, uint32_t chunk) {
  return ModelKeyPrefix(ns, model, key) + "p:" + std::to_string(chunk);
}

std::string RedisAclPattern(std::string_view ns) { return "~" + RemoteKeyPrefix(ns) + "*"; }

std::string EncodeRemoteMeta(const Segment& s, uint64_t chunk_bytes) {
  const std::span<const std::byte> payload = s.payload->span().first(s.PayloadBytes());
  disk::EncodedRecord rec = disk::BuildSegmentRecord(s, CodecKind::kRaw, payload);
  // The prefix is padded to the record's payload offset; the remote value needs only header + metadata.
  std::string out = rec.prefix.substr(0, disk::kHeaderSize + rec.header.meta_len);
  const size_t table_at = out.size();
  const uint32_t n = ChunkCount(payload.size(), chunk_bytes);
  PutU32(&out, kTableMagic);
  PutU32(&out, static_cast<uint32_t>(chunk_bytes));
  PutU32(&out, n);
  for (uint32_t i = 0; i < n; ++i) {
    const size_t at = static_cast<size_t>(i) * chunk_bytes;
    PutU64(&out, Checksum64(payload.subspan(at, std::min<size_t>(chunk_bytes, payload.size() - at))));
  }
  PutU64(&out, Checksum64(std::as_bytes(std::span<const char>(out.data() + table_at, out.size() - table_at))));
  return out;
}

Status DecodeRemoteMeta(std::string_view value, const Hash128& key, const Hash128& model, Segment* s,
                        RemoteChunkTable* table) {
  disk::RecordHeader h;
  KVAGENT_RETURN_IF_ERROR(disk::DecodeHeader(std::as_bytes(std::span<const char>(value.data(), value.size())), &h));
  if (h.kind != disk::RecordKind::kSegment) return DataLossError("remote value is not a segment record");
  if (h.key != key) return DataLossError("remote value names segment " + h.key.ToHex() + ", not " + key.ToHex());
  if (h.model != model)
    return DataLossError("remote value was produced by model " + h.model.ToHex() + ", not " + model.ToHex());
  if (h.codec != CodecKind::kRaw) return DataLossError("remote value has an encoded payload (raw expected)");
  if (value.size() < disk::kHeaderSize + uint64_t{h.meta_len}) return DataLossError("remote metadata truncated");
  const std::string_view meta = value.substr(disk::kHeaderSize, h.meta_len);
  if (Checksum64(std::as_bytes(std::span<const char>(meta.data(), meta.size()))) != h.meta_checksum)
    return DataLossError("remote metadata checksum mismatch");
  const std::string_view rest = value.substr(disk::kHeaderSize + h.meta_len);
  if (rest.size() < 20) return DataLossError("remote chunk table truncated");
  const std::string_view body = rest.substr(0, rest.size() - 8);
  uint64_t table_sum = 0;
  std::memcpy(&table_sum, rest.data() + body.size(), 8);
  if (Checksum64(std::as_bytes(std::span<const char>(body.data(), body.size()))) != table_sum)
    return DataLossError("remote chunk table checksum mismatch");
  WireReader r(body);
  uint32_t magic = 0, chunk_bytes = 0, n = 0;
  KVAGENT_RETURN_IF_ERROR(r.U32(&magic));
  KVAGENT_RETURN_IF_ERROR(r.U32(&chunk_bytes));
  KVAGENT_RETURN_IF_ERROR(r.U32(&n));
  if (magic != kTableMagic) return DataLossError("bad remote chunk table magic");
  if (chunk_bytes == 0 || n != ChunkCount(h.payload_len, chunk_bytes) || r.remaining() != uint64_t{n} * 8)
    return DataLossError("remote chunk table disagrees with the payload length");
  table->chunk_bytes = chunk_bytes;
  table->checksums.resize(n);
  for (uint32_t i = 0; i < n; ++i) KVAGENT_RETURN_IF_ERROR(r.U64(&table->checksums[i]));
  s->key = h.key;
  s->model = h.model;
  s->layout = h.layout;
  s->pre_rope = h.pre_rope;
  return disk::DecodeMeta(meta, h.layout.num_tokens, s);
}

}  // namespace kvagent
