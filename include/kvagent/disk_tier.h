// DiskTier: durable segment storage in append-only files with a SQLite catalog.
//
// Files: <dir>/segments-<000001>.kvs, records appended back to back. Each record: a fixed
// header (magic, format version, header length, key, model fingerprint, codec, layout, lengths
// of metadata and payload, checksums of header, metadata and payload), the serialised
// metadata (tokens, positions, SegmentMeta, summary), then the encoded payload, 64-byte
// aligned so payload reads can go straight into a caller's buffer.
// Catalog: <dir>/catalog.sqlite (WAL) maps key -> (file, offset, lengths, metadata columns).
// The segment files are the source of truth: on Open, records past the catalog's known end
// of each file are scanned and re-indexed; torn or corrupt tails are reported and cut.
//
// Durability: with options.sync, Put returns only after the record is fdatasync'ed; after a
// crash (kill -9) at any point, Open serves every record whose Put returned OK and never a
// torn or corrupt one (checksums are verified on every read; a bad record is DataLoss and is
// skipped by scans).
//
// Capacity: when live bytes exceed capacity_bytes, the least recently read/written records
// are evicted (removed from the catalog; space reclaimed by Compact, which also runs
// automatically when dead space passes compact_dead_ratio).
//
// Thread-safety: all methods may be called concurrently.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kvagent/codec.h"
#include "kvagent/env.h"
#include "kvagent/segment.h"
#include "kvagent/status.h"
#include "kvagent/store.h"

namespace kvagent {

struct DiskTierOptions {
  std::string dir;                         // created if missing
  uint64_t capacity_bytes = 0;             // 0 = unbounded
  uint64_t max_file_bytes = 256ull << 20;  // roll over to a new segment file
  bool sync = true;                        // fdatasync every record before Put returns
  CodecKind codec = CodecKind::kRaw;       // encoding of payloads written from now on
  double compact_dead_ratio = 0.5;         // auto-compact when dead/total file bytes exceeds this
  uint64_t compact_min_dead_bytes = 1ull << 20;  // ...and at least this many bytes are dead
  Env* env = nullptr;                      // nullptr = Env::Default()
};

// What Open found while recovering (records past the catalog's known end of each file).
struct RecoveryReport {
  uint64_t files = 0;             // segment files found
  uint64_t scanned_bytes = 0;     // bytes read by the recovery scan
  uint64_t records_indexed = 0;   // records (segments and tombstones) re-indexed by the scan
  uint64_t corrupt_records = 0;   // records skipped (bad checksum, bad header, catalog entry past EOF)
  uint64_t torn_tails = 0;        // incomplete tails cut off
  uint64_t torn_bytes = 0;        // bytes cut off
  bool catalog_rebuilt = false;   // the SQLite catalog was missing or unusable and was rebuilt
  std::vector<std::string> problems;  // one line per corrupt record or torn tail
};

class DiskTier {
 public:
  virtual ~DiskTier() = default;

  // Opens or creates the tier; recovers from a crash (see above). FailedPrecondition if
  // another process holds the directory's lock.
  static StatusOr<std::unique_ptr<DiskTier>> Open(const DiskTierOptions& options);

  // Appends `segment` (validated) and records it in the catalog. Replaces an existing key.
  // ResourceExhausted on a full disk or a segment larger than capacity; the tier is unchanged.
  virtual Status Put(const Segment& segment) = 0;
  // Reads and verifies the record; FailedPrecondition if it was produced by another model.
  virtual StatusOr<SegmentHandle> Get(const Hash128& key, const Hash128& model) = 0;
  // Reads the decoded payload straight into `dst` (dst.size() == payload bytes); with the raw
  // codec there is no intermediate copy.
  virtual Status ReadPayload(const Hash128& key, const Hash128& model, std::span<std::byte> dst) = 0;
  virtual StatusOr<SegmentInfo> Info(const Hash128& key) = 0;
  virtual bool Contains(const Hash128& key) = 0;
  virtual Status Delete(const Hash128& key) = 0;
  virtual std::vector<SegmentInfo> List(const SegmentFilter& filter) = 0;

  virtual Status Sync() = 0;
  virtual TierStats Stats() = 0;
  virtual StatusOr<VerifyReport> Verify(ProgressFn progress) = 0;
  virtual StatusOr<CompactReport> Compact(ProgressFn progress) = 0;

  // What the last Open recovered (see RecoveryReport).
  virtual RecoveryReport Recovery() = 0;
};

}  // namespace kvagent
