#include "kvagent/host_tier.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>

namespace kvagent {

namespace {
constexpr size_t kMinPooledBytes = 64 << 10;  // smaller blocks are cheap for malloc to recycle
constexpr uint64_t kMaxPoolBytes = 256ull << 20;
constexpr uint64_t kMinPoolBytes = 64ull << 20;  // a few 16 MiB segments even in a small tier
}  // namespace

// Idle buffers by exact size, oldest first. Lent buffers are Buffer::Wrap views of a pooled
// Buffer whose release hands it back; the pool is reached through a weak pointer, so buffers may
// outlive the tier.
class HostTier::BufferPool : public std::enable_shared_from_this<HostTier::BufferPool> {
 public:
  explicit BufferPool(uint64_t limit) : limit_(limit) {}

  StatusOr<std::shared_ptr<Buffer>> Lend(size_t size) {
    if (size < kMinPooledBytes || limit_ == 0) return Buffer::Allocate(size);
    std::shared_ptr<Buffer> inner;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = by_size_.find(size);
      if (it != by_size_.end()) {
        inner = std::move(*it->second);
        fifo_.erase(it->second);
        by_size_.erase(it);
        bytes_ -= size;
      }
    }
    if (!inner) {
      KVAGENT_ASSIGN_OR_RETURN(inner, Buffer::Allocate(size));
    }
    std::byte* data = inner->data();
    std::weak_ptr<BufferPool> weak = weak_from_this();
    return Buffer::Wrap(data, size, [weak, inner] {
      if (std::shared_ptr<BufferPool> pool = weak.lock()) pool->Return(inner);
    });
  }

  uint64_t bytes() const {
    std::lock_guard<std::mutex> lock(mu_);
    return bytes_;
  }

 private:
  void Return(const std::shared_ptr<Buffer>& buffer) {
    const size_t size = buffer->size();
    if (size > limit_) return;
    std::lock_guard<std::mutex> lock(mu_);
    while (bytes_ + size > limit_ && !fifo_.empty()) {
      auto oldest = fifo_.begin();
      auto range = by_size_.equal_range((*oldest)->size());
      for (auto it = range.first; it != range.second; ++it) {
        if (it->second == oldest) {
          by_size_.erase(it);
          break;
        }
      }
      bytes_ -= (*oldest)->size();
      fifo_.erase(oldest);
    }
    fifo_.push_back(buffer);
    by_size_.emplace(size, std::prev(fifo_.end()));
    bytes_ += size;
  }

  const uint64_t limit_;
  mutable std::mutex mu_;
  std::list<std::shared_ptr<Buffer>> fifo_;
  std::unordered_multimap<size_t, std::list<std::shared_ptr<Buffer>>::iterator> by_size_;
  uint64_t bytes_ = 0;
};

HostTier::HostTier(uint64_t capacity_bytes)
    : capacity_(capacity_bytes), pool_(std::make_shared<BufferPool>(PoolLimit(capacity_bytes))) {}

uint64_t HostTier::PoolLimit(uint64_t capacity_bytes) {
  if (capacity_bytes == 0) return kMaxPoolBytes;
  return std::min({capacity_bytes, std::max<uint64_t>(capacity_bytes / 8, kMinPoolBytes), kMaxPoolBytes});
}

uint64_t HostTier::pooled_bytes() const { return pool_->bytes(); }

uint64_t HostTier::ChargeOf(const Segment& s) {
  const SegmentMeta& m = s.meta;
  return s.PayloadBytes() + s.tokens.size() * sizeof(int32_t) + s.positions.size() * sizeof(int64_t) +
         s.summary.size() + m.ns.size() + m.agent.size() + m.session.size() + m.role.size() + m.text.size();
}

StatusOr<std::shared_ptr<Buffer>> HostTier::LendBuffer(size_t size) { return pool_->Lend(size); }

StatusOr<SegmentHandle> HostTier::OwnedCopy(const Segment& segment) {
  KVAGENT_RETURN_IF_ERROR(segment.Validate());
  auto copy = std::make_shared<Segment>();
  copy->key = segment.key;
  copy->model = segment.model;
  copy->parent = segment.parent;
  copy->layout = segment.layout;
  copy->pre_rope = segment.pre_rope;
  copy->tokens = segment.tokens;
  copy->positions = segment.positions;
  copy->meta = segment.meta;
  copy->summary = segment.summary;
  KVAGENT_ASSIGN_OR_RETURN(copy->payload, pool_->Lend(segment.PayloadBytes()));
  std::memcpy(copy->payload->data(), segment.payload->data(), segment.PayloadBytes());
  return SegmentHandle(std::move(copy));
}

StatusOr<SegmentHandle> HostTier::Put(const Segment& segment) {
  KVAGENT_ASSIGN_OR_RETURN(SegmentHandle copy, OwnedCopy(segment));
  KVAGENT_RETURN_IF_ERROR(Adopt(copy));
  return copy;
}

Status HostTier::Adopt(SegmentHandle segment) {
  if (!segment) return InvalidArgumentError("null segment");
  KVAGENT_RETURN_IF_ERROR(segment->Validate());
  const uint64_t charge = ChargeOf(*segment);
  const Hash128 key = segment->key;
  std::lock_guard<std::mutex> lock(mu_);
  if (capacity_ != 0 && charge > capacity_)
    return ResourceExhaustedError("segment of " + std::to_string(charge) + " bytes exceeds the host tier capacity of " +
                                  std::to_string(capacity_) + " bytes");
  if (!MakeRoomLocked(charge, key))
    return ResourceExhaustedError("host tier full: cannot make room for " + std::to_string(charge) +
                                  " bytes, the remaining segments are in use");
  auto it = map_.find(key);
  if (it != map_.end()) UnlinkLocked(it);
  lru_.push_front(key);
  map_.emplace(key, Entry{std::move(segment), charge, lru_.begin()});
  bytes_ += charge;
  ++puts_;
  return Status::Ok();
}

bool HostTier::MakeRoomLocked(uint64_t need, const Hash128& replacing) {
  if (capacity_ == 0) return true;
  uint64_t used = bytes_;
  auto old = map_.find(replacing);
  if (old != map_.end()) used -= old->second.charge;
  if (used + need <= capacity_) return true;
  const uint64_t excess = used + need - capacity_;

  // use_count() == 1 is exact under mu_: only the tier holds the handle and new handles are
  // only made under mu_. A larger count may drop concurrently; skipping it is then merely
  // conservative.
  auto evictable = [&](const Entry& e, const Hash128& k) { return k != replacing && e.segment.use_count() == 1; };
  uint64_t can_free = 0;
  for (auto lit = lru_.rbegin(); lit != lru_.rend() && can_free < excess; ++lit) {
    const Entry& e = map_.at(*lit);
    if (evictable(e, *lit)) can_free += e.charge;
  }
  if (can_free < excess) return false;

  uint64_t freed = 0;
  auto lit = lru_.end();
  while (freed < excess && lit != lru_.begin()) {
    --lit;
    auto it = map_.find(*lit);
    if (!evictable(it->second, it->first)) continue;
    freed += it->second.charge;
    bytes_ -= it->second.charge;
    ++evictions_;
    map_.erase(it);
    lit = lru_.erase(lit);  // the next --lit reaches the entry before the erased one
  }
  return true;
}

void HostTier::UnlinkLocked(std::unordered_map<Hash128, Entry, Hash128Hasher>::iterator it) {
  bytes_ -= it->second.charge;
  lru_.erase(it->second.lru);
  map_.erase(it);
}

SegmentHandle HostTier::Get(const Hash128& key) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = map_.find(key);
  if (it == map_.end()) {
    ++misses_;
    return nullptr;
  }
  ++hits_;
  lru_.splice(lru_.begin(), lru_, it->second.lru);
  return it->second.segment;
}

SegmentHandle HostTier::Peek(const Hash128& key) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = map_.find(key);
  return it == map_.end() ? nullptr : it->second.segment;
}

bool HostTier::Contains(const Hash128& key) const {
  std::lock_guard<std::mutex> lock(mu_);
  return map_.count(key) != 0;
}

bool HostTier::Erase(const Hash128& key) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = map_.find(key);
  if (it == map_.end()) return false;
  UnlinkLocked(it);
  return true;
}

void HostTier::Clear() {
  std::lock_guard<std::mutex> lock(mu_);
  map_.clear();
  lru_.clear();
  bytes_ = 0;
}

std::vector<SegmentHandle> HostTier::Snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<SegmentHandle> out;
  out.reserve(map_.size());
  for (const Hash128& k : lru_) out.push_back(map_.at(k).segment);
  return out;
}

TierStats HostTier::Stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  TierStats s;
  s.hits = hits_;
  s.misses = misses_;
  s.puts = puts_;
  s.evictions = evictions_;
  s.segments = map_.size();
  s.bytes = bytes_;
  s.capacity_bytes = capacity_;
  s.pooled_bytes = pool_->bytes();
  return s;
}

}  // namespace kvagent
