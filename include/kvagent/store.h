// Store: the tiered, content-addressed home of segments.
//
//   Put -> host tier (bounded bytes, LRU eviction, refcounted handles)
//       -> write-behind queue (bounded; Put blocks when full = back-pressure)
//       -> disk tier (append-only segment files + SQLite catalog), when a path is given.
//   Get -> host hit, else disk read (checksum verified) and promotion into the host tier.
//
// Every read checks the model fingerprint: a segment produced by other weights is an error
// (FailedPrecondition), never returned. Segments are immutable once stored; a Put with an
// existing key replaces it (last writer wins).
//
// Errors: InvalidArgument for malformed segments (the store is left unchanged), NotFound,
// FailedPrecondition (fingerprint mismatch, store closed, path locked by another process),
// ResourceExhausted (disk full, or a segment larger than a tier), DataLoss (corrupt record:
// reported and skipped, the rest stays readable).
//
// Thread-safety: all methods are safe to call concurrently. Handles stay valid after the
// segment is evicted or deleted (eviction never frees a segment in use).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kvagent/codec.h"
#include "kvagent/env.h"
#include "kvagent/hash.h"
#include "kvagent/segment.h"
#include "kvagent/status.h"

namespace kvagent {

struct TierStats {
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t puts = 0;
  uint64_t evictions = 0;
  uint64_t segments = 0;        // live segments in the tier
  uint64_t bytes = 0;           // bytes held (payload after codec; disk: live record bytes)
  uint64_t capacity_bytes = 0;  // 0 = unbounded
  uint64_t file_bytes = 0;      // disk only: bytes in segment files, live + dead
  uint64_t corrupt_records = 0; // disk only: records found corrupt and skipped
};

struct StoreStats {
  TierStats host;
  TierStats disk;
  uint64_t promotions = 0;         // disk -> host on hit
  uint64_t write_queue_depth = 0;  // segments waiting for write-behind (beyond the one being written)
  uint64_t write_errors = 0;       // write-behind failures (the segment stays in host)
  bool has_disk = false;
};

// Selects segments by metadata; empty fields match anything.
struct SegmentFilter {
  std::optional<Hash128> model;
  std::string ns;
  std::string agent;
  std::string session;
  int64_t min_time_us = INT64_MIN;
  int64_t max_time_us = INT64_MAX;

  bool Matches(const SegmentInfo& info) const;
};

struct StoreOptions {
  std::string path;                        // directory; empty = host tier only
  uint64_t host_capacity_bytes = 1ull << 30;
  uint64_t disk_capacity_bytes = 0;        // 0 = unbounded
  uint64_t max_file_bytes = 256ull << 20;  // segment files roll over at this size
  bool write_behind = true;                // false: Put writes through to disk before returning
  size_t write_queue_limit = 64;           // segments queued for write-behind before Put blocks
  // Durability. write_behind=false: Put returns after the record is written (and fdatasync'ed
  // when sync). write_behind=true: an acknowledged Put is readable at once but durable only after
  // Flush() or Close() returns OK; the writer syncs once per drained batch (group commit) when
  // sync. Write errors and retries: docs/store.md.
  bool sync = true;
  CodecKind disk_codec = CodecKind::kRaw;
  bool disk_direct_io = true;              // DiskTierOptions::direct_io
  Env* env = nullptr;                      // nullptr = Env::Default()
};

struct VerifyReport {
  uint64_t records = 0;
  uint64_t ok = 0;
  uint64_t corrupt = 0;
  uint64_t bytes = 0;
  std::vector<std::string> problems;  // one line per corrupt or missing record
};

struct CompactReport {
  uint64_t files_before = 0;
  uint64_t files_after = 0;
  uint64_t bytes_before = 0;
  uint64_t bytes_after = 0;
  uint64_t records_moved = 0;
};

// Progress callback for long operations: (done, total) in bytes or records.
using ProgressFn = std::function<void(uint64_t done, uint64_t total)>;

class Store {
 public:
  virtual ~Store() = default;

  static StatusOr<std::unique_ptr<Store>> Open(const StoreOptions& options);

  // Validates and stores `segment`. Blocks while the write-behind queue is full.
  virtual Status Put(SegmentHandle segment) = 0;
  // The segment `key`, produced by `model`. NotFound, FailedPrecondition on mismatch, DataLoss.
  virtual StatusOr<SegmentHandle> Get(const Hash128& key, const Hash128& model) = 0;
  virtual StatusOr<SegmentInfo> Info(const Hash128& key) = 0;
  virtual bool Contains(const Hash128& key) = 0;
  // NotFound if absent. Frees host memory once no handle holds it; disk space on Compact.
  virtual Status Delete(const Hash128& key) = 0;
  virtual std::vector<SegmentInfo> List(const SegmentFilter& filter) = 0;

  // Waits until every acknowledged Put is on disk and synced.
  virtual Status Flush() = 0;
  virtual StoreStats Stats() = 0;
  // Reads every disk record and checks its checksum.
  virtual StatusOr<VerifyReport> Verify(ProgressFn progress) = 0;
  // Rewrites segment files without dead space.
  virtual StatusOr<CompactReport> Compact(ProgressFn progress) = 0;
  // Flushes and stops background work; later calls return FailedPrecondition.
  virtual Status Close() = 0;
};

}  // namespace kvagent
