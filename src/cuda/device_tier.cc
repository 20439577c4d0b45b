#include "kvagent/device_tier.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <list>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuda/cuda_check.h"
#include "kvagent/segment.h"

namespace kvagent::cuda {

namespace {

constexpr size_t kBlockAlign = 256;

size_t RoundUp(size_t n, size_t a) { return (n + a - 1) / a * a; }

// Makes `device` current for the scope and restores the caller's device after: the library
// must not change which device a caller's thread works on.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&prev_) != cudaSuccess) {
      cudaGetLastError();
      prev_ = -1;
    }
    if (prev_ != device) {
      status_ = CudaStatus(cudaSetDevice(device), "cudaSetDevice");
    }
  }
  ~DeviceGuard() {
    if (prev_ >= 0 && status_.ok()) cudaSetDevice(prev_);
  }
  const Status& status() const { return status_; }

 private:
  int prev_ = -1;
  Status status_;
};

}  // namespace

// ---- pinned host memory ----

Status InstallPinnedHostAllocator() {
  KVAGENT_RETURN_IF_ERROR(CheckDevice());
  static std::once_flag once;
  std::call_once(once, [] {
    Buffer::Allocator a;
    a.alloc = [](size_t n) -> void* {
      void* p = nullptr;
      // Portable: usable from every device; Mapped: kernels may read it directly (zero-copy).
      if (cudaHostAlloc(&p, n == 0 ? 1 : n, cudaHostAllocPortable | cudaHostAllocMapped) != cudaSuccess) {
        cudaGetLastError();
        return nullptr;
      }
      return p;
    };
    a.free = [](void* p) {
      if (p != nullptr) cudaFreeHost(p);
    };
    a.name = "cuda_pinned";
    Buffer::SetHostAllocator(std::move(a));
  });
  return Status::Ok();
}

StatusOr<const void*> MappedDevicePointer(const void* host) {
  if (host == nullptr) return InvalidArgumentError("MappedDevicePointer: null pointer");
  KVAGENT_RETURN_IF_ERROR(CheckDevice());
  cudaPointerAttributes attr{};
  cudaError_t e = cudaPointerGetAttributes(&attr, host);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return InvalidArgumentError(std::string("MappedDevicePointer: ") + cudaGetErrorString(e));
  }
  if (attr.type != cudaMemoryTypeHost || attr.devicePointer == nullptr)
    return InvalidArgumentError("MappedDevicePointer: not mapped pinned host memory");
  return static_cast<const void*>(attr.devicePointer);
}

// ---- device tier ----

namespace internal {

struct Block {
  size_t arena = 0;
  size_t offset = 0;
  size_t size = 0;
};

struct TierState {
  struct Arena {
    char* base = nullptr;
    size_t size = 0;
    std::map<size_t, size_t> free;  // offset -> size, coalesced
  };
  struct Pending {
    Block block;
    std::vector<cudaEvent_t> events;
  };
  struct Slot {
    std::shared_ptr<TierEntry> entry;
    std::list<Hash128>::iterator lru;
  };

  mutable std::mutex mu;
  DeviceTierOptions opt;
  std::vector<Arena> arenas;
  size_t reserved = 0;
  size_t allocated = 0;
  uint64_t evictions = 0;
  std::vector<Pending> pending;
  std::vector<cudaEvent_t> event_pool;
  cudaStream_t evict_stream = nullptr;
  std::unordered_map<Hash128, Slot, Hash128Hasher> map;
  std::list<Hash128> lru;  // front: most recently used

  ~TierState() {
    DeviceGuard g(opt.device);
    for (Pending& p : pending)
      for (cudaEvent_t e : p.events) {
        cudaEventSynchronize(e);
        cudaEventDestroy(e);
      }
    for (cudaEvent_t e : event_pool) cudaEventDestroy(e);
    if (evict_stream) {
      cudaStreamSynchronize(evict_stream);
      cudaStreamDestroy(evict_stream);
    }
    for (Arena& a : arenas) cudaFree(a.base);
  }

  StatusOr<cudaEvent_t> GetEventLocked() {
    if (!event_pool.empty()) {
      cudaEvent_t e = event_pool.back();
      event_pool.pop_back();
      return e;
    }
    cudaEvent_t e = nullptr;
    KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate"));
    return e;
  }

  void FreeBlockLocked(const Block& b) {
    Arena& a = arenas[b.arena];
    auto [it, inserted] = a.free.emplace(b.offset, b.size);
    (void)inserted;
    auto next = std::next(it);
    if (next != a.free.end() && it->first + it->second == next->first) {
      it->second += next->second;
      a.free.erase(next);
    }
    if (it != a.free.begin()) {
      auto prev = std::prev(it);
      if (prev->first + prev->second == it->first) {
        prev->second += it->second;
        a.free.erase(it);
      }
    }
    allocated -= b.size;
  }

  void ReleaseLocked(const Block& b, std::vector<cudaEvent_t> events) {
    if (events.empty()) {
      FreeBlockLocked(b);
    } else {
      pending.push_back(Pending{b, std::move(events)});
    }
  }

  // Returns pending blocks whose events all completed; with `wait`, first blocks on the oldest.
  void ReclaimLocked(bool wait) {
    if (wait && !pending.empty())
      for (cudaEvent_t e : pending.front().events) cudaEventSynchronize(e);
    for (size_t i = 0; i < pending.size();) {
      bool done = true;
      for (cudaEvent_t e : pending[i].events) {
        cudaError_t q = cudaEventQuery(e);
        if (q == cudaErrorNotReady) {
          done = false;
          break;
        }
        if (q != cudaSuccess) cudaGetLastError();  // a failed stream: the memory is unreachable anyway
      }
      if (!done) {
        ++i;
        continue;
      }
      for (cudaEvent_t e : pending[i].events) event_pool.push_back(e);
      FreeBlockLocked(pending[i].block);
      pending[i] = std::move(pending.back());
      pending.pop_back();
    }
  }

  // Waits for the most recently queued pending free (an eviction just made) and reclaims it.
  void WaitForLastLocked() {
    if (pending.empty()) return;
    for (cudaEvent_t e : pending.back().events) cudaEventSynchronize(e);
    ReclaimLocked(false);
  }

  bool TryCarveLocked(size_t need, Block* out) {
    for (size_t ai = 0; ai < arenas.size(); ++ai) {
      Arena& a = arenas[ai];
      for (auto it = a.free.begin(); it != a.free.end(); ++it) {
        if (it->second < need) continue;
        size_t off = it->first, sz = it->second;
        a.free.erase(it);
        if (sz > need) a.free.emplace(off + need, sz - need);
        *out = Block{ai, off, need};
        allocated += need;
        return true;
      }
    }
    return false;
  }

  bool NewArenaLocked(size_t need) {
    size_t size = std::max(RoundUp(opt.arena_bytes, kBlockAlign), need);
    if (reserved + size > opt.capacity_bytes) size = need;
    if (reserved + size > opt.capacity_bytes) return false;
    void* p = nullptr;
    if (cudaMalloc(&p, size) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    Arena a;
    a.base = static_cast<char*>(p);
    a.size = size;
    a.free.emplace(0, size);
    arenas.push_back(std::move(a));
    reserved += size;
    return true;
  }
};

struct TierEntry {
  std::shared_ptr<TierState> state;
  Hash128 key;
  void* ptr = nullptr;
  size_t bytes = 0;
  Block block;
  std::vector<cudaEvent_t> events;  // guarded by state->mu
  bool released = false;            // guarded by state->mu

  ~TierEntry() {
    std::lock_guard<std::mutex> l(state->mu);
    if (!released) state->ReleaseLocked(block, std::move(events));
  }
};

struct EventState {
  int device = 0;
  cudaEvent_t event = nullptr;
  ~EventState() {
    if (event) cudaEventDestroy(event);
  }
};

}  // namespace internal

void* DeviceHandle::data() const { return entry_ ? entry_->ptr : nullptr; }
size_t DeviceHandle::size() const { return entry_ ? entry_->bytes : 0; }
const Hash128& DeviceHandle::key() const {
  static const Hash128 kZero;
  return entry_ ? entry_->key : kZero;
}

Status DeviceHandle::RecordUse(Stream stream) const {
  if (!entry_) return FailedPreconditionError("RecordUse on an empty DeviceHandle");
  internal::TierState& s = *entry_->state;
  std::lock_guard<std::mutex> l(s.mu);
  DeviceGuard g(s.opt.device);
  KVAGENT_RETURN_IF_ERROR(g.status());
  auto& evs = entry_->events;
  if (evs.size() >= 8) {  // drop completed uses so a long-lived handle keeps few events
    for (size_t i = 0; i < evs.size();) {
      if (cudaEventQuery(evs[i]) == cudaSuccess) {
        s.event_pool.push_back(evs[i]);
        evs[i] = evs.back();
        evs.pop_back();
      } else {
        cudaGetLastError();
        ++i;
      }
    }
  }
  KVAGENT_ASSIGN_OR_RETURN(cudaEvent_t e, s.GetEventLocked());
  Status st = CudaStatus(cudaEventRecord(e, stream), "RecordUse");
  if (!st.ok()) {
    s.event_pool.push_back(e);
    return st;
  }
  evs.push_back(e);
  return Status::Ok();
}

StatusOr<std::unique_ptr<DeviceTier>> DeviceTier::Open(DeviceTierOptions options) {
  if (options.capacity_bytes == 0) return InvalidArgumentError("DeviceTier: capacity_bytes must be > 0");
  if (options.arena_bytes == 0) return InvalidArgumentError("DeviceTier: arena_bytes must be > 0");
  KVAGENT_RETURN_IF_ERROR(CheckDevice());
  int count = 0;
  KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaGetDeviceCount(&count), "cudaGetDeviceCount"));
  if (options.device < 0 || options.device >= count)
    return InvalidArgumentError("DeviceTier: device " + std::to_string(options.device) + " of " +
                                std::to_string(count));
  auto s = std::make_shared<internal::TierState>();
  s->opt = std::move(options);
  DeviceGuard g(s->opt.device);
  KVAGENT_RETURN_IF_ERROR(g.status());
  KVAGENT_RETURN_IF_ERROR(
      CudaStatus(cudaStreamCreateWithFlags(&s->evict_stream, cudaStreamNonBlocking), "DeviceTier stream"));
  return std::unique_ptr<DeviceTier>(new DeviceTier(std::move(s)));
}

DeviceTier::~DeviceTier() {
  // Entries hold the state; dropping the map outside the lock lets unreferenced entries release
  // their blocks (their destructors take the lock) and breaks the state <-> entry cycle.
  std::unordered_map<Hash128, internal::TierState::Slot, Hash128Hasher> doomed;
  {
    std::lock_guard<std::mutex> l(state_->mu);
    doomed.swap(state_->map);
    state_->lru.clear();
  }
}

StatusOr<DeviceHandle> DeviceTier::Allocate(const Hash128& key, size_t bytes) {
  if (bytes == 0) return InvalidArgumentError("DeviceTier::Allocate: zero bytes");
  internal::TierState& s = *state_;
  const size_t need = RoundUp(bytes, kBlockAlign);
  if (need > s.opt.capacity_bytes)
    return ResourceExhaustedError("DeviceTier: " + std::to_string(bytes) + " bytes exceed the capacity of " +
                                  std::to_string(s.opt.capacity_bytes));
  std::vector<std::shared_ptr<internal::TierEntry>> graveyard;  // destroyed after the lock is released
  std::lock_guard<std::mutex> l(s.mu);
  if (s.map.count(key)) return AlreadyExistsError("DeviceTier: key " + key.ToHex() + " already present");
  DeviceGuard g(s.opt.device);
  KVAGENT_RETURN_IF_ERROR(g.status());
  internal::Block block;
  std::vector<Hash128> refused;  // victims whose eviction callback failed
  while (true) {
    s.ReclaimLocked(false);
    if (s.TryCarveLocked(need, &block)) break;
    if (s.NewArenaLocked(need)) continue;
    // Evict the least recently used entry that no handle outside the tier references.
    bool evicted = false;
    for (auto it = s.lru.rbegin(); it != s.lru.rend(); ++it) {
      auto mit = s.map.find(*it);
      std::shared_ptr<internal::TierEntry>& e = mit->second.entry;
      if (e.use_count() != 1) continue;  // in use: never evicted
      if (std::find(refused.begin(), refused.end(), *it) != refused.end()) continue;
      std::vector<cudaEvent_t> events;
      if (s.opt.on_evict) {
        for (cudaEvent_t ev : e->events) cudaStreamWaitEvent(s.evict_stream, ev, 0);
        Status st = s.opt.on_evict(e->key, e->ptr, e->bytes, s.evict_stream);
        if (!st.ok()) {
          refused.push_back(*it);
          continue;
        }
        KVAGENT_ASSIGN_OR_RETURN(cudaEvent_t done, s.GetEventLocked());
        KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(done, s.evict_stream), "eviction event"));
        for (cudaEvent_t ev : e->events) s.event_pool.push_back(ev);  // captured by the stream wait
        events.push_back(done);
      } else {
        events = std::move(e->events);
      }
      e->events.clear();
      e->released = true;
      const bool queued = !events.empty();
      s.ReleaseLocked(e->block, std::move(events));
      // The victim's bytes are reusable once its copy (and recorded uses) finish: wait for that
      // rather than evicting further entries while the copy is in flight.
      if (queued) s.WaitForLastLocked();
      graveyard.push_back(std::move(e));
      s.lru.erase(mit->second.lru);
      s.map.erase(mit);
      ++s.evictions;
      evicted = true;
      break;
    }
    if (evicted) continue;
    if (!s.pending.empty()) {
      s.ReclaimLocked(true);
      continue;
    }
    return ResourceExhaustedError("DeviceTier: cannot fit " + std::to_string(bytes) + " bytes (" +
                                  std::to_string(s.allocated) + " of " + std::to_string(s.opt.capacity_bytes) +
                                  " bytes held by entries in use or fragmented)");
  }
  auto e = std::make_shared<internal::TierEntry>();
  e->state = state_;
  e->key = key;
  e->bytes = bytes;
  e->block = block;
  e->ptr = s.arenas[block.arena].base + block.offset;
  s.lru.push_front(key);
  s.map.emplace(key, internal::TierState::Slot{e, s.lru.begin()});
  return DeviceHandle(std::move(e));
}

StatusOr<DeviceHandle> DeviceTier::Lookup(const Hash128& key) {
  std::lock_guard<std::mutex> l(state_->mu);
  auto it = state_->map.find(key);
  if (it == state_->map.end()) return NotFoundError("DeviceTier: key " + key.ToHex() + " not present");
  state_->lru.splice(state_->lru.begin(), state_->lru, it->second.lru);
  return DeviceHandle(it->second.entry);
}

bool DeviceTier::Contains(const Hash128& key) const {
  std::lock_guard<std::mutex> l(state_->mu);
  return state_->map.count(key) != 0;
}

Status DeviceTier::Erase(const Hash128& key) {
  std::shared_ptr<internal::TierEntry> doomed;  // destroyed after the lock is released
  std::lock_guard<std::mutex> l(state_->mu);
  auto it = state_->map.find(key);
  if (it == state_->map.end()) return NotFoundError("DeviceTier: key " + key.ToHex() + " not present");
  doomed = std::move(it->second.entry);
  state_->lru.erase(it->second.lru);
  state_->map.erase(it);
  return Status::Ok();
}

DeviceTier::Stats DeviceTier::GetStats() const {
  std::lock_guard<std::mutex> l(state_->mu);
  Stats st;
  st.capacity_bytes = state_->opt.capacity_bytes;
  st.reserved_bytes = state_->reserved;
  st.allocated_bytes = state_->allocated;
  st.entries = state_->map.size();
  for (const auto& [k, slot] : state_->map)
    if (slot.entry.use_count() > 1) ++st.pinned_entries;
  st.evictions = state_->evictions;
  return st;
}

// ---- transfers ----

Status TransferEvent::Wait() const {
  if (!e_) return Status::Ok();
  return CudaStatus(cudaEventSynchronize(e_->event), "TransferEvent::Wait");
}

StatusOr<bool> TransferEvent::Ready() const {
  if (!e_) return true;
  cudaError_t q = cudaEventQuery(e_->event);
  if (q == cudaSuccess) return true;
  if (q == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  return CudaStatus(q, "TransferEvent::Ready");
}

Status TransferEvent::MakeStreamWait(Stream stream) const {
  if (!e_) return Status::Ok();
  return CudaStatus(cudaStreamWaitEvent(stream, e_->event, 0), "TransferEvent::MakeStreamWait");
}

StatusOr<std::unique_ptr<TransferEngine>> TransferEngine::Create(int device) {
  KVAGENT_RETURN_IF_ERROR(CheckDevice());
  std::unique_ptr<TransferEngine> t(new TransferEngine());
  t->device_ = device;
  DeviceGuard g(device);
  KVAGENT_RETURN_IF_ERROR(g.status());
  cudaStream_t a = nullptr, b = nullptr;
  KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&a, cudaStreamNonBlocking), "h2d stream"));
  t->h2d_ = a;
  KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&b, cudaStreamNonBlocking), "d2h stream"));
  t->d2h_ = b;
  return t;
}

TransferEngine::~TransferEngine() {
  DeviceGuard g(device_);
  if (h2d_) {
    cudaStreamSynchronize(h2d_);
    cudaStreamDestroy(h2d_);
  }
  if (d2h_) {
    cudaStreamSynchronize(d2h_);
    cudaStreamDestroy(d2h_);
  }
}

StatusOr<TransferEvent> TransferEngine::RecordOn(Stream stream) {
  DeviceGuard g(device_);
  KVAGENT_RETURN_IF_ERROR(g.status());
  auto es = std::make_shared<internal::EventState>();
  es->device = device_;
  KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaEventCreateWithFlags(&es->event, cudaEventDisableTiming), "event"));
  KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(es->event, stream), "event record"));
  return TransferEvent(std::move(es));
}

StatusOr<TransferEvent> TransferEngine::HostToDevice(std::span<const CopyRequest> copies, const TransferEvent& after) {
  return Submit(copies, after, true);
}
StatusOr<TransferEvent> TransferEngine::DeviceToHost(std::span<const CopyRequest> copies, const TransferEvent& after) {
  return Submit(copies, after, false);
}

StatusOr<TransferEvent> TransferEngine::Submit(std::span<const CopyRequest> copies, const TransferEvent& after,
                                               bool to_device) {
  for (size_t i = 0; i < copies.size(); ++i)
    if (copies[i].dst == nullptr || copies[i].src == nullptr || copies[i].bytes == 0)
      return InvalidArgumentError("TransferEngine: copy " + std::to_string(i) + " has a null pointer or no bytes");
  DeviceGuard g(device_);
  KVAGENT_RETURN_IF_ERROR(g.status());
  cudaStream_t s = to_device ? h2d_ : d2h_;
  KVAGENT_RETURN_IF_ERROR(after.MakeStreamWait(s));
  bool done = false;
  if (copies.size() > 1) {
    // One driver submission for the whole batch; falls back to one call per copy where the
    // driver or the memory kind does not support batching.
    std::vector<void*> dsts(copies.size());
    std::vector<const void*> srcs(copies.size());
    std::vector<size_t> sizes(copies.size());
    for (size_t i = 0; i < copies.size(); ++i) {
      dsts[i] = copies[i].dst;
      srcs[i] = copies[i].src;
      sizes[i] = copies[i].bytes;
    }
    cudaMemcpyAttributes attr{};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    attr.srcLocHint.type = to_device ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
    attr.srcLocHint.id = to_device ? 0 : device_;
    attr.dstLocHint.type = to_device ? cudaMemLocationTypeDevice : cudaMemLocationTypeHost;
    attr.dstLocHint.id = to_device ? device_ : 0;
    attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
    size_t attr_idx = 0;
    cudaError_t e = cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), copies.size(), &attr, &attr_idx, 1, s);
    if (e == cudaSuccess) {
      done = true;
    } else {
      cudaGetLastError();
    }
  }
  if (!done) {
    for (const CopyRequest& c : copies)
      KVAGENT_RETURN_IF_ERROR(
          CudaStatus(cudaMemcpyAsync(c.dst, c.src, c.bytes, cudaMemcpyDefault, s), "TransferEngine copy"));
  }
  return RecordOn(s);
}

}  // namespace kvagent::cuda
