// The Store's device tier on CUDA: a cuda::DeviceTier for the bytes, a TransferEngine for the
// host->device loads, and a map key -> segment metadata (the payload-less Segment that
// DeviceSegment::meta() returns).
#include <cuda_runtime.h>

#include <atomic>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cuda/cuda_check.h"
#include "kvagent/device_tier.h"
#include "store/device_cache.h"

namespace kvagent {

namespace {

using cuda::DeviceHandle;

class HandleHolder final : public DeviceSegment::Holder {
 public:
  explicit HandleHolder(DeviceHandle h) : h_(std::move(h)) {}
  Status RecordUse(void* stream) const override { return h_.RecordUse(static_cast<cuda::Stream>(stream)); }

 private:
  DeviceHandle h_;
};

// A segment copied device -> host by an eviction; adopted by the host tier after the copy.
struct Evicted {
  SegmentHandle meta;
  std::shared_ptr<Buffer> payload;
};
// Evictions run inside DeviceTier::Allocate on the calling thread: Load points this at its own
// list, so each Load re-adopts exactly the copies its Allocate made (and waited for).
thread_local std::vector<Evicted>* tl_evicted = nullptr;

class CudaDeviceCache final : public DeviceCache {
 public:
  explicit CudaDeviceCache(DeviceCacheOptions o) : opt_(std::move(o)) {}

  Status Init() {
    cuda::DeviceTierOptions t;
    t.device = opt_.device;
    t.capacity_bytes = opt_.capacity_bytes;
    t.on_evict = [this](const Hash128& key, const void* ptr, size_t bytes, cuda::Stream stream) {
      return OnEvict(key, ptr, bytes, stream);
    };
    KVAGENT_ASSIGN_OR_RETURN(tier_, cuda::DeviceTier::Open(std::move(t)));
    KVAGENT_ASSIGN_OR_RETURN(xfer_, cuda::TransferEngine::Create(opt_.device));
    return Status::Ok();
  }

  StatusOr<DeviceSegment> Lookup(const Hash128& key, bool count) override {
    StatusOr<DeviceHandle> h = tier_->Lookup(key);
    if (h.ok()) {
      SegmentHandle meta;
      {
        std::lock_guard<std::mutex> l(mu_);
        auto it = meta_.find(key);
        // The pointer check rejects metadata of a newer version loaded after this handle's
        // entry was erased (its bytes are still held by `h`, so they cannot be the same).
        if (it != meta_.end() && it->second.ptr == h->data()) meta = it->second.meta;
      }
      if (meta) {
        if (count) hits_.fetch_add(1, std::memory_order_relaxed);
        return Make(std::move(meta), *h);
      }
    } else if (h.status().code() != StatusCode::kNotFound) {
      return h.status();
    }
    if (count) misses_.fetch_add(1, std::memory_order_relaxed);
    return DeviceSegment();
  }

  StatusOr<DeviceSegment> Load(const SegmentHandle& segment, std::vector<SegmentHandle>* evicted_out) override {
    if (!segment || !segment->payload) return InvalidArgumentError("device tier: segment without payload");
    const size_t bytes = segment->PayloadBytes();
    auto meta = std::make_shared<Segment>(*segment);
    meta->payload = nullptr;
    std::vector<Evicted> evicted;
    StatusOr<DeviceHandle> h = AllocateCollecting(segment->key, bytes, &evicted);
    if (!h.ok() && h.status().code() == StatusCode::kAlreadyExists) {
      // A stale entry whose metadata was replaced: the store serialises loads of a key, so
      // erasing it here races with nobody.
      Erase(segment->key);
      h = AllocateCollecting(segment->key, bytes, &evicted);
    }
    for (Evicted& e : evicted) {
      auto s = std::make_shared<Segment>(*e.meta);
      s->payload = std::move(e.payload);
      if (evicted_out) evicted_out->push_back(std::move(s));
    }
    KVAGENT_RETURN_IF_ERROR(h.status().WithContext("device tier: loading segment " + segment->key.ToHex()));
    cuda::CopyRequest c{h->data(), segment->payload->data(), bytes};
    StatusOr<cuda::TransferEvent> ev = xfer_->HostToDevice(std::span<const cuda::CopyRequest>(&c, 1));
    Status st = ev.ok() ? ev->Wait() : ev.status();
    if (!st.ok()) {
      (void)tier_->Erase(segment->key);
      return st.WithContext("device tier: host->device copy of " + segment->key.ToHex());
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      meta_[segment->key] = MetaEntry{meta, h->data()};
    }
    loads_.fetch_add(1, std::memory_order_relaxed);
    return Make(std::move(meta), *h);
  }

  void Erase(const Hash128& key) override {
    (void)tier_->Erase(key);
    std::lock_guard<std::mutex> l(mu_);
    meta_.erase(key);
  }

  TierStats Stats() override {
    cuda::DeviceTier::Stats t = tier_->GetStats();
    TierStats s;
    s.hits = hits_.load(std::memory_order_relaxed);
    s.misses = misses_.load(std::memory_order_relaxed);
    s.puts = loads_.load(std::memory_order_relaxed);
    s.evictions = t.evictions;
    s.segments = t.entries;
    s.bytes = t.allocated_bytes;
    s.capacity_bytes = t.capacity_bytes;
    return s;
  }

 private:
  struct MetaEntry {
    SegmentHandle meta;
    const void* ptr = nullptr;
  };

  DeviceSegment Make(SegmentHandle meta, const DeviceHandle& h) const {
    return DeviceSegment(std::move(meta), h.data(), h.size(), opt_.device, std::make_shared<HandleHolder>(h));
  }

  StatusOr<DeviceHandle> AllocateCollecting(const Hash128& key, size_t bytes, std::vector<Evicted>* sink) {
    tl_evicted = sink;
    StatusOr<DeviceHandle> h = tier_->Allocate(key, bytes);
    tl_evicted = nullptr;
    return h;
  }

  // Runs under the device tier's lock (DeviceTierOptions::on_evict).
  Status OnEvict(const Hash128& key, const void* ptr, size_t bytes, cuda::Stream stream) {
    SegmentHandle meta;
    {
      std::lock_guard<std::mutex> l(mu_);
      auto it = meta_.find(key);
      if (it != meta_.end() && it->second.ptr == ptr) meta = it->second.meta;
    }
    if (meta && !(opt_.has_backing && opt_.has_backing(key))) {
      // The only copy left: back to host memory before the bytes are reused.
      if (tl_evicted == nullptr) return FailedPreconditionError("device eviction outside Load");
      KVAGENT_ASSIGN_OR_RETURN(std::shared_ptr<Buffer> buf, Buffer::Allocate(bytes));
      KVAGENT_RETURN_IF_ERROR(cuda::CudaStatus(cudaMemcpyAsync(buf->data(), ptr, bytes, cudaMemcpyDeviceToHost, stream),
                                               "device eviction copy"));
      tl_evicted->push_back(Evicted{meta, std::move(buf)});
    }
    std::lock_guard<std::mutex> l(mu_);
    auto it = meta_.find(key);
    if (it != meta_.end() && it->second.ptr == ptr) meta_.erase(it);
    return Status::Ok();
  }

  DeviceCacheOptions opt_;
  std::unique_ptr<cuda::DeviceTier> tier_;  // destroyed after xfer_ (declared first)
  std::unique_ptr<cuda::TransferEngine> xfer_;
  std::mutex mu_;
  std::unordered_map<Hash128, MetaEntry, Hash128Hasher> meta_;
  std::atomic<uint64_t> hits_{0}, misses_{0}, loads_{0};
};

}  // namespace

StatusOr<std::unique_ptr<DeviceCache>> OpenDeviceCache(DeviceCacheOptions options) {
  if (options.capacity_bytes == 0) return InvalidArgumentError("device tier: capacity_bytes must be > 0");
  Status dev = cuda::CheckDevice();
  if (!dev.ok()) return UnavailableError("device tier unavailable: " + std::string(dev.message()));
  // Host buffers allocated from now on are pinned (and device-mapped), so host -> device loads run
  // at full PCIe speed; buffers that exist keep their allocator.
  KVAGENT_RETURN_IF_ERROR(cuda::InstallPinnedHostAllocator());
  auto c = std::make_unique<CudaDeviceCache>(std::move(options));
  KVAGENT_RETURN_IF_ERROR(c->Init());
  return std::unique_ptr<DeviceCache>(std::move(c));
}

}  // namespace kvagent
