#include "store/record.h"

#include <cstring>

#include "kvagent/wire.h"

namespace kvagent::disk {

namespace {

template <typename T>
void Store(std::byte* out, size_t at, T v) {
  std::memcpy(out + at, &v, sizeof(T));
}
template <typename T>
T Load(const std::byte* in, size_t at) {
  T v;
  std::memcpy(&v, in + at, sizeof(T));
  return v;
}

constexpr size_t kChecksumAt = kHeaderSize - 8;

void PutHash(std::string* out, const Hash128& h) {
  PutU64(out, h.lo);
  PutU64(out, h.hi);
}
Status GetHash(WireReader* r, Hash128* h) {
  KVAGENT_RETURN_IF_ERROR(r->U64(&h->lo));
  return r->U64(&h->hi);
}

void PutMeta(std::string* out, const SegmentMeta& m) {
  PutBytes(out, m.ns);
  PutBytes(out, m.agent);
  PutBytes(out, m.session);
  PutI64(out, m.turn);
  PutU32(out, static_cast<uint32_t>(m.chunk));
  PutBytes(out, m.role);
  PutBytes(out, m.text);
  PutI64(out, m.time_us);
}
Status GetMeta(WireReader* r, SegmentMeta* m) {
  KVAGENT_RETURN_IF_ERROR(r->String(&m->ns));
  KVAGENT_RETURN_IF_ERROR(r->String(&m->agent));
  KVAGENT_RETURN_IF_ERROR(r->String(&m->session));
  KVAGENT_RETURN_IF_ERROR(r->I64(&m->turn));
  KVAGENT_RETURN_IF_ERROR(r->I32(&m->chunk));
  KVAGENT_RETURN_IF_ERROR(r->String(&m->role));
  KVAGENT_RETURN_IF_ERROR(r->String(&m->text));
  return r->I64(&m->time_us);
}

bool ValidDType(uint8_t d) { return d <= static_cast<uint8_t>(DType::kBF16); }
bool ValidCodec(uint8_t c) { return c <= static_cast<uint8_t>(CodecKind::kInt8); }

// Elements of a layout, or 0 if it overflows the sanity bound.
uint64_t BoundedElements(const SegmentLayout& l) {
  uint64_t n = 2;
  for (int v : {l.num_layers, l.num_kv_heads, l.head_dim, l.num_tokens}) {
    if (v <= 0) return 0;
    if (n > kMaxPayloadBytes / static_cast<uint64_t>(v)) return 0;
    n *= static_cast<uint64_t>(v);
  }
  return n;
}

}  // namespace

void EncodeHeader(const RecordHeader& h, std::byte* out) {
  std::memset(out, 0, kHeaderSize);
  Store<uint32_t>(out, 0, kRecordMagic);
  Store<uint16_t>(out, 4, kFormatVersion);
  Store<uint16_t>(out, 6, static_cast<uint16_t>(kHeaderSize));
  Store<uint8_t>(out, 8, static_cast<uint8_t>(h.kind));
  Store<uint8_t>(out, 9, static_cast<uint8_t>(h.codec));
  Store<uint8_t>(out, 10, static_cast<uint8_t>(h.layout.dtype));
  Store<uint8_t>(out, 11, h.pre_rope ? 1 : 0);
  Store<uint32_t>(out, 12, h.meta_len);
  Store<uint64_t>(out, 16, h.key.lo);
  Store<uint64_t>(out, 24, h.key.hi);
  Store<uint64_t>(out, 32, h.model.lo);
  Store<uint64_t>(out, 40, h.model.hi);
  Store<int32_t>(out, 48, h.layout.num_layers);
  Store<int32_t>(out, 52, h.layout.num_kv_heads);
  Store<int32_t>(out, 56, h.layout.head_dim);
  Store<int32_t>(out, 60, h.layout.num_tokens);
  Store<uint32_t>(out, 64, h.payload_offset);
  Store<uint64_t>(out, 72, h.payload_len);
  Store<uint64_t>(out, 80, h.record_len);
  Store<uint64_t>(out, 88, h.meta_checksum);
  Store<uint64_t>(out, 96, h.payload_checksum);
  Store<uint64_t>(out, kChecksumAt, Checksum64(std::span<const std::byte>(out, kChecksumAt)));
}

Status DecodeHeader(std::span<const std::byte> in, RecordHeader* h) {
  if (in.size() < kHeaderSize) return DataLossError("record header truncated");
  const std::byte* p = in.data();
  if (Load<uint32_t>(p, 0) != kRecordMagic) return DataLossError("bad record magic");
  if (Load<uint64_t>(p, kChecksumAt) != Checksum64(std::span<const std::byte>(p, kChecksumAt)))
    return DataLossError("record header checksum mismatch");
  const uint16_t version = Load<uint16_t>(p, 4);
  if (version < kOldestFormatVersion || version > kFormatVersion)
    return DataLossError("unsupported record format version " + std::to_string(version));
  if (Load<uint16_t>(p, 6) != kHeaderSize) return DataLossError("bad record header size");
  uint8_t kind = Load<uint8_t>(p, 8), codec = Load<uint8_t>(p, 9), dtype = Load<uint8_t>(p, 10);
  if (kind != static_cast<uint8_t>(RecordKind::kSegment) && kind != static_cast<uint8_t>(RecordKind::kTombstone) &&
      !(kind == static_cast<uint8_t>(RecordKind::kPadding) && version >= 2))
    return DataLossError("bad record kind " + std::to_string(kind));
  if (!ValidCodec(codec)) return DataLossError("bad record codec " + std::to_string(codec));
  if (!ValidDType(dtype)) return DataLossError("bad record dtype " + std::to_string(dtype));
  h->kind = static_cast<RecordKind>(kind);
  h->codec = static_cast<CodecKind>(codec);
  h->layout.dtype = static_cast<DType>(dtype);
  h->pre_rope = Load<uint8_t>(p, 11) != 0;
  h->meta_len = Load<uint32_t>(p, 12);
  h->key = Hash128{Load<uint64_t>(p, 16), Load<uint64_t>(p, 24)};
  h->model = Hash128{Load<uint64_t>(p, 32), Load<uint64_t>(p, 40)};
  h->layout.num_layers = Load<int32_t>(p, 48);
  h->layout.num_kv_heads = Load<int32_t>(p, 52);
  h->layout.head_dim = Load<int32_t>(p, 56);
  h->layout.num_tokens = Load<int32_t>(p, 60);
  h->payload_offset = Load<uint32_t>(p, 64);
  h->payload_len = Load<uint64_t>(p, 72);
  h->record_len = Load<uint64_t>(p, 80);
  h->meta_checksum = Load<uint64_t>(p, 88);
  h->payload_checksum = Load<uint64_t>(p, 96);
  if (h->kind == RecordKind::kPadding) {
    if (h->meta_len != 0 || h->payload_len != 0 || h->payload_offset != kHeaderSize || h->record_len < kHeaderSize ||
        h->record_len > kMaxPaddingRecord || h->record_len % kAlign != 0)
      return DataLossError("bad padding record lengths");
    return Status::Ok();
  }
  if (h->kind == RecordKind::kTombstone) {
    if (h->meta_len != 0 || h->payload_len != 0 || h->payload_offset != kHeaderSize || h->record_len != kHeaderSize)
      return DataLossError("bad tombstone lengths");
    return Status::Ok();
  }
  if (h->meta_len > kMaxMetaBytes) return DataLossError("record metadata length out of range");
  uint64_t elements = BoundedElements(h->layout);
  if (elements == 0) return DataLossError("record layout out of range");
  const uint64_t min_offset = AlignUp(kHeaderSize + h->meta_len);
  const uint64_t max_offset = min_offset + (version >= 2 ? kMaxPayloadPad : 0);
  if (h->payload_offset < min_offset || h->payload_offset > max_offset || h->payload_offset % kAlign != 0)
    return DataLossError("bad record payload offset");
  if (h->payload_len != EncodedSize(h->layout, h->codec))
    return DataLossError("record payload length disagrees with layout");
  if (h->record_len != AlignUp(h->payload_offset + h->payload_len)) return DataLossError("bad record length");
  return Status::Ok();
}

std::string EncodeMeta(const Segment& s) {
  std::string out;
  PutHash(&out, s.parent);
  PutU32(&out, static_cast<uint32_t>(s.tokens.size()));
  out.append(reinterpret_cast<const char*>(s.tokens.data()), s.tokens.size() * sizeof(int32_t));
  PutU32(&out, static_cast<uint32_t>(s.positions.size()));
  out.append(reinterpret_cast<const char*>(s.positions.data()), s.positions.size() * sizeof(int64_t));
  PutMeta(&out, s.meta);
  PutBytes(&out, s.summary);
  return out;
}

Status DecodeMeta(std::string_view in, int num_tokens, Segment* s) {
  WireReader r(in);
  KVAGENT_RETURN_IF_ERROR(GetHash(&r, &s->parent));
  uint32_t n = 0;
  KVAGENT_RETURN_IF_ERROR(r.U32(&n));
  if (n != static_cast<uint32_t>(num_tokens)) return DataLossError("record token count disagrees with layout");
  if (r.remaining() < static_cast<size_t>(n) * sizeof(int32_t)) return DataLossError("record tokens truncated");
  s->tokens.resize(n);
  if (n > 0) std::memcpy(s->tokens.data(), in.data() + r.position(), n * sizeof(int32_t));  // data() may be null at 0
  WireReader skip(in.substr(r.position() + n * sizeof(int32_t)));
  KVAGENT_RETURN_IF_ERROR(skip.U32(&n));
  if (n != static_cast<uint32_t>(num_tokens)) return DataLossError("record position count disagrees with layout");
  if (skip.remaining() < static_cast<size_t>(n) * sizeof(int64_t)) return DataLossError("record positions truncated");
  size_t pos_at = in.size() - skip.remaining();
  s->positions.resize(n);
  if (n > 0) std::memcpy(s->positions.data(), in.data() + pos_at, n * sizeof(int64_t));
  WireReader rest(in.substr(pos_at + n * sizeof(int64_t)));
  KVAGENT_RETURN_IF_ERROR(GetMeta(&rest, &s->meta));
  KVAGENT_RETURN_IF_ERROR(rest.String(&s->summary));
  if (rest.remaining() != 0) return DataLossError("trailing bytes after record metadata");
  return Status::Ok();
}

EncodedRecord BuildSegmentRecord(const Segment& s, CodecKind codec, std::span<const std::byte> encoded_payload) {
  EncodedRecord rec;
  std::string meta = EncodeMeta(s);
  RecordHeader& h = rec.header;
  h.kind = RecordKind::kSegment;
  h.key = s.key;
  h.model = s.model;
  h.codec = codec;
  h.layout = s.layout;
  h.pre_rope = s.pre_rope;
  h.meta_len = static_cast<uint32_t>(meta.size());
  h.payload_offset = static_cast<uint32_t>(AlignUp(kHeaderSize + meta.size()));
  h.payload_len = encoded_payload.size();
  h.record_len = AlignUp(h.payload_offset + h.payload_len);
  h.meta_checksum = Checksum64(std::as_bytes(std::span<const char>(meta.data(), meta.size())));
  h.payload_checksum = Checksum64(encoded_payload);
  rec.prefix.assign(h.payload_offset, '\0');
  EncodeHeader(h, reinterpret_cast<std::byte*>(rec.prefix.data()));
  std::memcpy(rec.prefix.data() + kHeaderSize, meta.data(), meta.size());
  return rec;
}

uint32_t PadPayloadToBlock(EncodedRecord* rec, uint64_t record_start, uint32_t block) {
  RecordHeader& h = rec->header;
  const uint64_t unpadded = AlignUp(kHeaderSize + h.meta_len);
  const uint32_t pad = static_cast<uint32_t>((block - (record_start + unpadded) % block) % block);
  if (unpadded + pad == h.payload_offset) return pad;
  h.payload_offset = static_cast<uint32_t>(unpadded + pad);
  h.record_len = AlignUp(h.payload_offset + h.payload_len);
  rec->prefix.resize(unpadded);
  rec->prefix.resize(h.payload_offset, '\0');
  EncodeHeader(h, reinterpret_cast<std::byte*>(rec->prefix.data()));
  return pad;
}

namespace {

// A record with no metadata and no payload: a header of `kind` naming `key`, then zeros to `len`.
EncodedRecord BuildBareRecord(RecordKind kind, const Hash128& key, uint64_t len) {
  EncodedRecord rec;
  RecordHeader& h = rec.header;
  h.kind = kind;
  h.key = key;
  h.layout = SegmentLayout{0, 0, 0, 0, DType::kF32};
  h.payload_offset = kHeaderSize;
  h.record_len = len;
  h.meta_checksum = Checksum64({});
  h.payload_checksum = Checksum64({});
  rec.prefix.assign(len, '\0');
  EncodeHeader(h, reinterpret_cast<std::byte*>(rec.prefix.data()));
  return rec;
}

}  // namespace

EncodedRecord BuildPadding(uint64_t len) { return BuildBareRecord(RecordKind::kPadding, Hash128{}, len); }

EncodedRecord BuildTombstone(const Hash128& key) { return BuildBareRecord(RecordKind::kTombstone, key, kHeaderSize); }

uint64_t PaddingTo(uint64_t at, uint64_t block) {
  const uint64_t gap = (block - at % block) % block;
  if (gap == 0) return 0;
  return gap < kHeaderSize ? gap + block : gap;
}

std::string EncodeInfo(const SegmentInfo& info) {
  std::string out;
  PutHash(&out, info.key);
  PutHash(&out, info.model);
  PutHash(&out, info.parent);
  PutU32(&out, static_cast<uint32_t>(info.layout.num_layers));
  PutU32(&out, static_cast<uint32_t>(info.layout.num_kv_heads));
  PutU32(&out, static_cast<uint32_t>(info.layout.head_dim));
  PutU32(&out, static_cast<uint32_t>(info.layout.num_tokens));
  PutU8(&out, static_cast<uint8_t>(info.layout.dtype));
  PutU8(&out, info.pre_rope ? 1 : 0);
  PutMeta(&out, info.meta);
  PutU64(&out, info.payload_bytes);
  PutU64(&out, info.stored_bytes);
  PutU8(&out, info.codec);
  PutBytes(&out, info.summary);
  return out;
}

Status DecodeInfo(std::string_view in, SegmentInfo* info) {
  WireReader r(in);
  KVAGENT_RETURN_IF_ERROR(GetHash(&r, &info->key));
  KVAGENT_RETURN_IF_ERROR(GetHash(&r, &info->model));
  KVAGENT_RETURN_IF_ERROR(GetHash(&r, &info->parent));
  KVAGENT_RETURN_IF_ERROR(r.I32(&info->layout.num_layers));
  KVAGENT_RETURN_IF_ERROR(r.I32(&info->layout.num_kv_heads));
  KVAGENT_RETURN_IF_ERROR(r.I32(&info->layout.head_dim));
  KVAGENT_RETURN_IF_ERROR(r.I32(&info->layout.num_tokens));
  uint8_t dtype = 0, pre = 0;
  KVAGENT_RETURN_IF_ERROR(r.U8(&dtype));
  if (!ValidDType(dtype)) return DataLossError("catalog: bad dtype");
  info->layout.dtype = static_cast<DType>(dtype);
  KVAGENT_RETURN_IF_ERROR(r.U8(&pre));
  info->pre_rope = pre != 0;
  KVAGENT_RETURN_IF_ERROR(GetMeta(&r, &info->meta));
  KVAGENT_RETURN_IF_ERROR(r.U64(&info->payload_bytes));
  KVAGENT_RETURN_IF_ERROR(r.U64(&info->stored_bytes));
  KVAGENT_RETURN_IF_ERROR(r.U8(&info->codec));
  if (info->codec > 1) return DataLossError("catalog: bad codec");
  KVAGENT_RETURN_IF_ERROR(r.String(&info->summary));
  if (r.remaining() != 0) return DataLossError("catalog: trailing bytes in segment info");
  return Status::Ok();
}

}  // namespace kvagent::disk
