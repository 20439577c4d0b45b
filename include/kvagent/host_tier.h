// HostTier: the in-memory tier of the Store. A bounded map key -> immutable segment with LRU
// eviction and refcounted handles.
//
// Memory: Put copies the payload into a tier-owned Buffer (Buffer::Allocate, i.e. pinned host
// memory once the CUDA build has installed its allocator), so callers may reuse or mutate their
// own buffer after Put returns and the stored segment is truly immutable. Adopt inserts a
// segment whose payload the caller promises nobody will mutate (e.g. one just read from disk)
// without copying.
//
// Buffer recycling: payload buffers of at least 64 KiB made by OwnedCopy (or lent by LendBuffer,
// e.g. for a segment read from disk) return, when their
// last handle drops, to a pool of idle buffers keyed by exact size, and are reused by the next
// copy of that size. Fresh allocations of large buffers cost page faults (and pinned
// allocations cost far more), which otherwise halve Put throughput at steady-state eviction.
// Idle pooled bytes are bounded by PoolLimit(capacity) = min(capacity, max(capacity / 8,
// 64 MiB), 256 MiB) (256 MiB when unbounded): at least a few large segments' buffers (the
// write-behind queue and eviction recycle them) without exceeding the capacity itself. Oldest
// dropped first; they are reported by pooled_bytes(), not in stats().bytes.
//
// Accounting: a segment is charged ChargeOf(segment) bytes (payload + token ids + positions +
// summary + metadata strings). stats().bytes is the sum of charges of the segments the tier
// currently references, and never exceeds capacity_bytes (when non-zero).
//
// In-use segments: a segment is "in use" while any SegmentHandle other than the tier's own
// exists (a caller of Get, the Store's write-behind queue, ...). Eviction SKIPS in-use segments:
// the tier only evicts segments whose memory is actually released by evicting them, so bytes
// keeps describing memory that exists because of the tier. When the cold end is all in use and
// no room can be made, Put/Adopt fail with ResourceExhausted and the tier is unchanged.
// Erase and replacement (Put of an existing key) unlink the old segment at once, in use or
// not: its bytes leave the accounting immediately and the memory is freed when the last
// holder drops its handle. A handle stays valid for as long as it is held, whatever the tier
// does.
//
// Eviction order: least recently used first (Put, Adopt and Get make an entry most recently
// used; Peek does not).
//
// Thread-safety: all methods may be called concurrently (one internal mutex; payload copies
// happen outside it).
#pragma once

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "kvagent/hash.h"
#include "kvagent/segment.h"
#include "kvagent/status.h"
#include "kvagent/store_types.h"

namespace kvagent {

class HostTier {
 public:
  // capacity_bytes = 0: unbounded.
  explicit HostTier(uint64_t capacity_bytes);
  HostTier(const HostTier&) = delete;
  HostTier& operator=(const HostTier&) = delete;

  // Bytes charged for holding `segment` in the tier.
  static uint64_t ChargeOf(const Segment& segment);

  // A copy of `segment` whose payload lives in a tier-owned Buffer (fresh or recycled; the one
  // memcpy of a Put). Does not insert it. InvalidArgument if the segment is invalid;
  // ResourceExhausted if memory cannot be had.
  StatusOr<SegmentHandle> OwnedCopy(const Segment& segment);
  // A payload buffer of exactly `size` bytes from the recycling pool (fresh when none is idle);
  // it returns to the pool when its last handle drops. ResourceExhausted without memory.
  StatusOr<std::shared_ptr<Buffer>> LendBuffer(size_t size);

  // Validates `segment`, copies it (OwnedCopy) and inserts the copy, replacing an existing
  // key. Returns the stored handle. InvalidArgument for an invalid segment; ResourceExhausted
  // if it is larger than the capacity or not enough segments that are not in use can be
  // evicted. On error the tier is unchanged.
  StatusOr<SegmentHandle> Put(const Segment& segment);
  // Inserts `segment` as is (no copy), with the same rules and errors as Put.
  Status Adopt(SegmentHandle segment);

  // The segment `key`, made most recently used; counts a hit or a miss. nullptr if absent.
  SegmentHandle Get(const Hash128& key);
  // Like Get but neither counts nor touches the LRU order.
  SegmentHandle Peek(const Hash128& key) const;
  bool Contains(const Hash128& key) const;
  // Unlinks `key`; false if it was absent.
  bool Erase(const Hash128& key);
  // Unlinks everything.
  void Clear();

  // Every held segment, most recently used first.
  std::vector<SegmentHandle> Snapshot() const;

  uint64_t capacity_bytes() const { return capacity_; }
  // Idle recycled buffer bytes held for reuse (see "Buffer recycling").
  uint64_t pooled_bytes() const;
  static uint64_t PoolLimit(uint64_t capacity_bytes);
  TierStats Stats() const;

 private:
  struct Entry {
    SegmentHandle segment;
    uint64_t charge = 0;
    std::list<Hash128>::iterator lru;  // position in lru_
  };

  // Makes room for `need` bytes (excluding the entry for `replacing`, which is about to be
  // replaced). False if impossible; nothing is evicted in that case.
  bool MakeRoomLocked(uint64_t need, const Hash128& replacing);
  void UnlinkLocked(std::unordered_map<Hash128, Entry, Hash128Hasher>::iterator it);

  class BufferPool;

  const uint64_t capacity_;
  std::shared_ptr<BufferPool> pool_;  // shared with the buffers it lends out
  mutable std::mutex mu_;
  std::unordered_map<Hash128, Entry, Hash128Hasher> map_;
  std::list<Hash128> lru_;  // front = most recently used
  uint64_t bytes_ = 0;
  uint64_t hits_ = 0;
  uint64_t misses_ = 0;
  uint64_t puts_ = 0;
  uint64_t evictions_ = 0;
};

}  // namespace kvagent
