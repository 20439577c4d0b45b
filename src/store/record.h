// On-disk record format of the disk tier (docs/storage-format.md describes it in full).
//
// A record is a 128-byte header, the serialised metadata, zero padding to a 64-byte boundary,
// the encoded payload and zero padding to the next 64-byte boundary. Records start at 64-byte
// aligned offsets, so a reader that lost its place can resynchronise on the next aligned
// header whose magic and checksum are valid.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "kvagent/codec.h"
#include "kvagent/hash.h"
#include "kvagent/segment.h"
#include "kvagent/status.h"

namespace kvagent::disk {

inline constexpr uint32_t kRecordMagic = 0x3153564bu;  // "KVS1" little-endian
// Version 2 lets a writer pad between metadata and payload (up to kMaxPayloadPad bytes) so the
// payload starts on a file block boundary for direct I/O; readers accept versions 1 and 2.
inline constexpr uint16_t kFormatVersion = 2;
inline constexpr uint16_t kOldestFormatVersion = 1;
inline constexpr uint32_t kMaxPayloadPad = 4096 - 64;
inline constexpr size_t kHeaderSize = 128;
inline constexpr size_t kAlign = 64;
// Sanity bounds a header must respect (reject absurd lengths before allocating).
inline constexpr uint32_t kMaxMetaBytes = 1u << 30;
inline constexpr uint64_t kMaxPayloadBytes = uint64_t{1} << 40;

// kPadding (version 2): filler that ends a batch of records on a file block boundary so the
// batch can be written with direct I/O; it names no key and readers skip it.
enum class RecordKind : uint8_t { kSegment = 1, kTombstone = 2, kPadding = 3 };
inline constexpr uint64_t kMaxPaddingRecord = 8192;

struct RecordHeader {
  RecordKind kind = RecordKind::kSegment;
  Hash128 key;
  Hash128 model;
  CodecKind codec = CodecKind::kRaw;
  SegmentLayout layout;  // zero for tombstones
  bool pre_rope = true;
  uint32_t meta_len = 0;
  uint32_t payload_offset = 0;  // from record start, multiple of kAlign
  uint64_t payload_len = 0;     // encoded bytes
  uint64_t record_len = 0;      // total, multiple of kAlign
  uint64_t meta_checksum = 0;
  uint64_t payload_checksum = 0;
};

inline uint64_t AlignUp(uint64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Serialises `h` (with its header checksum) into exactly kHeaderSize bytes.
void EncodeHeader(const RecordHeader& h, std::byte* out);
// Parses and validates a header: DataLoss on bad magic, version, checksum or inconsistent
// lengths (never reads past `in`'s kHeaderSize bytes).
Status DecodeHeader(std::span<const std::byte> in, RecordHeader* h);

// Metadata block of a segment record: parent, tokens, positions, SegmentMeta, summary.
std::string EncodeMeta(const Segment& s);
// Fills the metadata fields of `s` (not key/model/layout/payload). DataLoss on malformed input
// or counts that disagree with `num_tokens`.
Status DecodeMeta(std::string_view in, int num_tokens, Segment* s);

// Builds the full bytes of a record, except the payload which the caller appends after
// `prefix` (payload_offset bytes) and follows with `record_len - payload_offset -
// payload_len` zero bytes.
struct EncodedRecord {
  RecordHeader header;
  std::string prefix;  // header + metadata + padding, payload_offset bytes
};
EncodedRecord BuildSegmentRecord(const Segment& s, CodecKind codec, std::span<const std::byte> encoded_payload);
EncodedRecord BuildTombstone(const Hash128& key);
// A padding record of `len` bytes (a multiple of kAlign, kHeaderSize..kMaxPaddingRecord), all of
// it in `prefix` (header then zeros).
EncodedRecord BuildPadding(uint64_t len);
// The padding record length that moves file offset `at` (a multiple of kAlign) to the next
// multiple of `block` (a power of two, at most 4096): 0 if `at` is on a boundary, else the gap,
// plus one block when the gap is too short for a header.
uint64_t PaddingTo(uint64_t at, uint64_t block);
// Pads `rec` (a segment record built by BuildSegmentRecord, padded before or not) so that its
// payload starts at a multiple of `block` (a power of two, at most 4096) in the file when the
// record starts at file offset `record_start` (a multiple of kAlign): sets payload_offset and
// record_len, re-encodes the header. Returns the padding (0..block-64 bytes).
uint32_t PadPayloadToBlock(EncodedRecord* rec, uint64_t record_start, uint32_t block);

// SegmentInfo as stored in the catalog (compact wire form).
std::string EncodeInfo(const SegmentInfo& info);
Status DecodeInfo(std::string_view in, SegmentInfo* info);

}  // namespace kvagent::disk
