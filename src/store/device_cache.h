// Internal: the Store's device tier, behind an interface so the store compiles without CUDA.
// The CUDA implementation (src/cuda/store_device_cache.cc) wraps cuda::DeviceTier and a
// TransferEngine; builds without CUDA get OpenDeviceCache returning Unavailable.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "kvagent/hash.h"
#include "kvagent/segment.h"
#include "kvagent/status.h"
#include "kvagent/store.h"

namespace kvagent {

struct DeviceCacheOptions {
  int device = 0;
  uint64_t capacity_bytes = 0;
  // True when the host or disk tier (or the write-behind queue) still holds `key`: an evicted
  // device entry is then dropped without a copy. Called with the device tier's lock held; must
  // not call into the device cache.
  std::function<bool(const Hash128& key)> has_backing;
};

// Thread-safety: all methods may be called concurrently. The store serialises Load and Erase of
// one key (its striped lock), so a load never resurrects a key replaced or deleted meanwhile.
class DeviceCache {
 public:
  virtual ~DeviceCache() = default;
  // The resident copy of `key`, or an empty DeviceSegment; `count`: counts a hit or a miss.
  virtual StatusOr<DeviceSegment> Lookup(const Hash128& key, bool count) = 0;
  // Copies `segment` (payload in host memory) into the tier and waits for the copy. Entries
  // evicted to make room that no other tier held are copied device -> host and appended to
  // `evicted` (complete, owned payloads) for the store to re-adopt, even when Load fails.
  virtual StatusOr<DeviceSegment> Load(const SegmentHandle& segment, std::vector<SegmentHandle>* evicted) = 0;
  // Drops `key` if resident (holders keep their bytes).
  virtual void Erase(const Hash128& key) = 0;
  virtual TierStats Stats() = 0;
};

// Unavailable without CUDA in the build or without a usable device; InvalidArgument for a
// device index out of range or capacity 0.
StatusOr<std::unique_ptr<DeviceCache>> OpenDeviceCache(DeviceCacheOptions options);

}  // namespace kvagent
