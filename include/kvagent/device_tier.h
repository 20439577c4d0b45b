// Device tier and host<->device transfers for the GPU KV path.
//
// Availability: defined only in builds with CUDA (KVAGENT_WITH_CUDA=1). Without a usable
// device, every factory returns Unavailable and changes nothing.
//
// DeviceTier: a bounded pool of device memory carved from cudaMalloc'd arenas (never managed
// memory), keyed by Hash128, with LRU eviction to host through a callback and refcounted
// handles: bytes behind a live DeviceHandle are never evicted, reused or freed. Per-stream
// safety: DeviceHandle::RecordUse(stream) records an event; after the entry is erased or
// evicted its memory is reused only once every recorded event has completed, and the eviction
// copy waits for them too.
//
// TransferEngine: host<->device copies on two dedicated non-blocking streams (one per
// direction), many small copies submitted as one batch (cudaMemcpyBatchAsync where the driver
// supports it), each submission returning a TransferEvent callers can wait on or make a stream
// wait on, so copies overlap compute on other streams.
//
// Thread-safety: DeviceTier, DeviceHandle, TransferEngine and TransferEvent are safe to use
// from several threads at once. Handles and events may outlive the object that made them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>

#include "kvagent/cuda_kv.h"
#include "kvagent/hash.h"
#include "kvagent/status.h"

namespace kvagent::cuda {

// Installs a Buffer host allocator ("cuda_pinned") that returns page-locked, device-mapped
// memory (cudaHostAlloc), so host-tier payloads copy at full PCIe speed and kernels can read
// them directly. Call once at start-up, before any Buffer exists (kvagent/segment.h). Without a
// device: Unavailable, and the current allocator stays. Idempotent.
Status InstallPinnedHostAllocator();

// The device pointer for mapped pinned host memory `host` (identical to `host` on UVA systems),
// e.g. a CanonicalSpan::data that a kernel reads over PCIe. InvalidArgument if `host` is not
// pinned memory of this process.
StatusOr<const void*> MappedDevicePointer(const void* host);

namespace internal {
struct TierState;
struct TierEntry;
struct EventState;
}  // namespace internal

// A reference to one device allocation of a DeviceTier. Empty when default-constructed.
class DeviceHandle {
 public:
  DeviceHandle() = default;
  explicit operator bool() const { return entry_ != nullptr; }
  void* data() const;
  size_t size() const;  // bytes requested
  const Hash128& key() const;
  // Records that work enqueued on `stream` so far uses these bytes (see file comment).
  // Internal on CUDA errors; FailedPrecondition on an empty handle.
  Status RecordUse(Stream stream) const;

 private:
  friend class DeviceTier;
  explicit DeviceHandle(std::shared_ptr<internal::TierEntry> e) : entry_(std::move(e)) {}
  std::shared_ptr<internal::TierEntry> entry_;
};

struct DeviceTierOptions {
  int device = 0;
  size_t capacity_bytes = 0;               // bound on cudaMalloc'd bytes; > 0
  size_t arena_bytes = size_t{256} << 20;  // arena granularity; a larger request gets its own arena
  // Eviction to host: enqueue a copy of `bytes` at `device_ptr` on `stream` (which already waits
  // for the entry's recorded uses); the memory is reused only after `stream` passes that point.
  // Runs with the tier's lock held: it must not call into the tier. A non-OK status keeps the
  // entry resident (the allocation that needed space continues with other victims). Null: victims
  // are dropped without a copy (the caller keeps another copy elsewhere).
  std::function<Status(const Hash128& key, const void* device_ptr, size_t bytes, Stream stream)> on_evict;
};

class DeviceTier {
 public:
  struct Stats {
    size_t capacity_bytes = 0;
    size_t reserved_bytes = 0;   // cudaMalloc'd arenas
    size_t allocated_bytes = 0;  // blocks of live entries and of frees waiting for events
    size_t entries = 0;
    size_t pinned_entries = 0;  // entries referenced by a handle outside the tier
    uint64_t evictions = 0;
  };

  // InvalidArgument for capacity 0; Unavailable without a device.
  static StatusOr<std::unique_ptr<DeviceTier>> Open(DeviceTierOptions options);
  ~DeviceTier();  // waits for eviction copies; memory of live handles is freed when they drop
  DeviceTier(const DeviceTier&) = delete;
  DeviceTier& operator=(const DeviceTier&) = delete;

  // A new entry of `bytes` (> 0, uninitialised) under `key`, most recently used. Evicts
  // least-recently-used entries that no handle references, one at a time, waiting (with the
  // tier's lock held) for each victim's eviction copy and recorded uses before reusing its bytes. AlreadyExists if
  // `key` is present; ResourceExhausted if the bytes cannot be had even after evicting every unreferenced entry.
  StatusOr<DeviceHandle> Allocate(const Hash128& key, size_t bytes);
  // The entry under `key`, marked most recently used; NotFound if absent.
  StatusOr<DeviceHandle> Lookup(const Hash128& key);
  bool Contains(const Hash128& key) const;
  // Removes `key` from the tier; its memory returns to the pool when the last handle drops and
  // its recorded uses complete. NotFound if absent.
  Status Erase(const Hash128& key);
  Stats GetStats() const;

 private:
  explicit DeviceTier(std::shared_ptr<internal::TierState> s) : state_(std::move(s)) {}
  std::shared_ptr<internal::TierState> state_;
};

// Completion of one TransferEngine submission.
class TransferEvent {
 public:
  TransferEvent() = default;  // an empty event is complete
  // Blocks the calling thread until the copies finished. Internal on CUDA errors.
  Status Wait() const;
  // True once complete.
  StatusOr<bool> Ready() const;
  // Makes `stream` wait (on the device, the host does not block) for the copies.
  Status MakeStreamWait(Stream stream) const;

 private:
  friend class TransferEngine;
  explicit TransferEvent(std::shared_ptr<internal::EventState> e) : e_(std::move(e)) {}
  std::shared_ptr<internal::EventState> e_;
};

struct CopyRequest {
  void* dst = nullptr;
  const void* src = nullptr;
  size_t bytes = 0;
};

class TransferEngine {
 public:
  // Unavailable without a device.
  static StatusOr<std::unique_ptr<TransferEngine>> Create(int device = 0);
  ~TransferEngine();  // synchronises its streams
  TransferEngine(const TransferEngine&) = delete;
  TransferEngine& operator=(const TransferEngine&) = delete;

  // Enqueues the copies on the direction's stream after `after` (an event from any stream,
  // e.g. the producer's, or empty) and returns the event of their completion. Host memory
  // should be pinned for asynchronous, full-speed copies (pageable memory works but is staged by
  // the driver). Copies within one call must not overlap. InvalidArgument for null pointers or
  // zero-byte requests; Internal for CUDA errors. Sources must stay valid until the event.
  StatusOr<TransferEvent> HostToDevice(std::span<const CopyRequest> copies, const TransferEvent& after = {});
  StatusOr<TransferEvent> DeviceToHost(std::span<const CopyRequest> copies, const TransferEvent& after = {});
  // Records an event on `stream` (e.g. the compute stream that produced data to copy out).
  StatusOr<TransferEvent> RecordOn(Stream stream);

  Stream h2d_stream() const { return h2d_; }
  Stream d2h_stream() const { return d2h_; }

 private:
  TransferEngine() = default;
  StatusOr<TransferEvent> Submit(std::span<const CopyRequest> copies, const TransferEvent& after, bool to_device);
  int device_ = 0;
  Stream h2d_ = nullptr;
  Stream d2h_ = nullptr;
};

}  // namespace kvagent::cuda
