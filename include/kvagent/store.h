// Store: the tiered, content-addressed home of segments.
//
//   Put -> host tier (bounded bytes, LRU eviction, refcounted handles)
//       -> write-behind queue (bounded; Put blocks when full = back-pressure)
//       -> disk tier (append-only segment files + SQLite catalog), when a path is given.
//   Get -> host hit, else disk read (checksum verified) and promotion into the host tier.
//   GetDevice (optional device tier, CUDA builds) -> device hit, else Get as above and one
//       host->device copy into the device tier (bounded bytes, LRU, refcounted handles).
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
#include "kvagent/remote_options.h"
#include "kvagent/segment.h"
#include "kvagent/status.h"
#include "kvagent/store_types.h"

namespace kvagent {

// Remote (Redis) tier counters (kvagent/remote_tier.h).
struct RemoteStats {
  TierStats tier;              // hits, misses, puts (writes sent), bytes (payload bytes sent), corrupt_records
  uint64_t queue_depth = 0;    // writes queued, not yet acknowledged by the server
  uint64_t dropped = 0;        // writes dropped (queue full or out of attempts)
  uint64_t retries = 0;        // batch re-sends after a failure
  uint64_t errors = 0;         // failed commands and connections
  uint64_t bytes_read = 0;     // payload bytes read
  bool connected = false;      // an open, working connection right now
};

struct StoreStats {
  TierStats host;
  TierStats disk;
  TierStats device;                // hits/misses of GetDevice, puts = host->device loads; bytes = device bytes held
                                   // (live entries and frees waiting for recorded stream work)
  uint64_t promotions = 0;         // disk -> host on hit
  uint64_t write_queue_depth = 0;  // segments queued for write-behind (not yet taken by the writer) or failed
  uint64_t write_errors = 0;       // write-behind failures (the segment stays in host)
  RemoteStats remote;
  uint64_t remote_promotions = 0;  // remote -> host on hit
  uint64_t blocked_puts = 0;       // Puts waiting for a write-behind queue slot (back-pressure) now
  bool has_disk = false;
  bool has_device = false;
  bool has_remote = false;
};

struct StoreOptions {
  std::string path;  // directory; empty = host tier only
  uint64_t host_capacity_bytes = 1ull << 30;
  uint64_t disk_capacity_bytes = 0;        // 0 = unbounded
  uint64_t max_file_bytes = 256ull << 20;  // segment files roll over at this size
  bool write_behind = true;                // false: Put writes through to disk before returning
  size_t write_queue_limit = 64;           // queued (not yet taken) write-behind segments before Put blocks
  // Durability. write_behind=false: Put returns after the record is written (and fdatasync'ed
  // when sync). write_behind=true: an acknowledged Put is readable at once but durable only after
  // Flush() or Close() returns OK; the writer syncs once per drained batch (group commit) when
  // sync. Write errors and retries: docs/store.md.
  bool sync = true;
  CodecKind disk_codec = CodecKind::kRaw;
  bool disk_direct_io = true;  // DiskTierOptions::direct_io
  Env* env = nullptr;          // nullptr = Env::Default()
  // Device tier (CUDA builds): device_capacity_bytes > 0 adds a tier of that many bytes of
  // cudaMalloc'd memory on CUDA device `device`. Open returns Unavailable when the build has no
  // CUDA or no usable device, InvalidArgument for a device index out of range. Opening one also
  // switches host buffers allocated from then on (process-wide) to pinned, device-mapped memory
  // (cuda::InstallPinnedHostAllocator), so host tier -> device loads run at full PCIe speed.
  uint64_t device_capacity_bytes = 0;  // 0 = no device tier
  int device = 0;
  // Remote tier (Redis): remote.url non-empty adds it below host and disk (kvagent/remote_tier.h).
  // Put queues a write to it after the local tiers hold the segment (never blocking on the
  // server); Get falls through to it after a local miss and promotes the segment into the host
  // tier; List adds the namespace's remote segments and Info their rows; Delete queues the
  // removal of the remote copy of a segment the local tiers know (its model names the remote
  // key). While the server is unreachable the local tiers serve alone: a local miss is NotFound,
  // never a remote error.
  RemoteOptions remote;
};

// A segment's canonical payload ([layer][k|v][kv_head][token][dim], layout.dtype) resident in
// device memory, as returned by Store::GetDevice. Copyable; every copy keeps the device bytes
// alive: the tier may evict or drop the entry, but its memory is reused only after the last
// copy is destroyed and every stream use recorded with RecordUse has completed. The bytes are
// the store's: read them, never write them.
class DeviceSegment {
 public:
  // Implementation hook (the CUDA device tier): keeps the allocation alive.
  class Holder {
   public:
    virtual ~Holder() = default;
    virtual Status RecordUse(void* stream) const = 0;
  };

  DeviceSegment() = default;
  DeviceSegment(SegmentHandle meta, const void* data, size_t size, int device, std::shared_ptr<const Holder> holder)
      : meta_(std::move(meta)), data_(data), size_(size), device_(device), holder_(std::move(holder)) {}

  explicit operator bool() const { return data_ != nullptr; }
  // Key, model, layout, tokens, positions and metadata of the segment; payload is null (the
  // bytes are on the device).
  const SegmentHandle& meta() const { return meta_; }
  const void* data() const { return data_; }  // device pointer
  size_t size() const { return size_; }       // bytes, meta()->PayloadBytes()
  int device() const { return device_; }      // CUDA device index
  // Records that work enqueued on `stream` (a cudaStream_t; nullptr = the legacy default
  // stream) so far reads these bytes; they are not reused before that work completes even if
  // every copy of this object is gone. Call after enqueueing work that reads data() on a stream
  // other than one you synchronise before dropping the object. FailedPrecondition when empty.
  Status RecordUse(void* stream) const {
    if (!holder_) return FailedPreconditionError("RecordUse on an empty DeviceSegment");
    return holder_->RecordUse(stream);
  }

 private:
  SegmentHandle meta_;
  const void* data_ = nullptr;
  size_t size_ = 0;
  int device_ = -1;
  std::shared_ptr<const Holder> holder_;
};

class Store {
 public:
  virtual ~Store() = default;

  static StatusOr<std::unique_ptr<Store>> Open(const StoreOptions& options);

  // Validates and stores `segment`. Blocks while the write-behind queue is full.
  virtual Status Put(SegmentHandle segment) = 0;
  // The segment `key`, produced by `model`. NotFound, FailedPrecondition on mismatch, DataLoss.
  virtual StatusOr<SegmentHandle> Get(const Hash128& key, const Hash128& model) = 0;
  // The segment `key`, produced by `model`, resident in the device tier: a hit returns the
  // resident copy; a miss reads it as Get does (promoting disk -> host), copies it host ->
  // device on the tier's transfer stream and waits for the copy, so data() is ready for any
  // stream on return. Device eviction drops least-recently-used entries no DeviceSegment
  // references when the host or disk tier still holds the key, and otherwise copies them back
  // into the host tier first (where the host tier's capacity rules apply). Put and Delete of a
  // key remove its device copy (holders keep the old bytes). Errors: as Get; Unavailable if the
  // store has no device tier; ResourceExhausted if the segment does not fit even after evicting
  // every unreferenced entry; Internal for CUDA errors.
  virtual StatusOr<DeviceSegment> GetDevice(const Hash128& key, const Hash128& model) = 0;
  virtual StatusOr<SegmentInfo> Info(const Hash128& key) = 0;
  virtual bool Contains(const Hash128& key) = 0;
  // NotFound if absent. Frees host memory once no handle holds it; disk space on Compact.
  virtual Status Delete(const Hash128& key) = 0;
  virtual std::vector<SegmentInfo> List(const SegmentFilter& filter) = 0;

  // Waits until every acknowledged Put is on disk and synced.
  virtual Status Flush() = 0;
  // Waits until every Put acknowledged so far has been written to the remote tier or dropped,
  // at most timeout_ms: DeadlineExceeded on timeout, Unavailable if writes were dropped
  // meanwhile, FailedPrecondition without a remote tier. Local durability is Flush's.
  virtual Status FlushRemote(int timeout_ms) = 0;
  virtual StoreStats Stats() = 0;
  // Reads every disk record and checks its checksum.
  virtual StatusOr<VerifyReport> Verify(ProgressFn progress) = 0;
  // Rewrites segment files without dead space.
  virtual StatusOr<CompactReport> Compact(ProgressFn progress) = 0;
  // Flushes and stops background work; later calls return FailedPrecondition.
  virtual Status Close() = 0;
};

}  // namespace kvagent
