// Value types shared by the Store facade (kvagent/store.h) and the tiers below it (host, disk):
// per-tier statistics, the metadata filter of List, the reports of Verify and Compact, and the
// progress callback. A tier includes this header, never the facade.
// Thread-safety: plain values.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "kvagent/hash.h"
#include "kvagent/segment.h"

namespace kvagent {

struct TierStats {
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t puts = 0;
  uint64_t evictions = 0;
  uint64_t segments = 0;         // live segments in the tier
  uint64_t bytes = 0;            // bytes held (payload after codec; disk: live record bytes)
  uint64_t capacity_bytes = 0;   // 0 = unbounded
  uint64_t file_bytes = 0;       // disk only: bytes in segment files, live + dead
  uint64_t corrupt_records = 0;  // disk only: records found corrupt and skipped
  uint64_t pooled_bytes = 0;     // host only: idle payload buffers kept for reuse (not in bytes)
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

}  // namespace kvagent
