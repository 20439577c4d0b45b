#include "store/tiered_store.h"

#include <array>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>

#include "kvagent/host_tier.h"
#include "kvagent/remote_tier.h"
#include "store/device_cache.h"

namespace kvagent {

namespace {

// Mutations of one key (Put, Delete, and the disk-read-then-promote path of Get) are serialised
// by a striped lock, so a promotion can never resurrect a key deleted meanwhile, and the host
// tier and the write queue are updated in the same order for a key.
constexpr size_t kStripes = 16;  // List holds all at once: stay well under TSan's 64 held locks

Status ClosedError() { return FailedPreconditionError("store is closed"); }

class TieredStore final : public Store {
 public:
  TieredStore(const StoreOptions& options, std::unique_ptr<DiskTier> disk, std::unique_ptr<RemoteTier> remote)
      : options_(options), host_(options.host_capacity_bytes), disk_(std::move(disk)), remote_(std::move(remote)) {
    if (options_.write_queue_limit == 0) options_.write_queue_limit = 1;
    if (disk_ && options_.write_behind) writer_ = std::thread([this] { WriterLoop(); });
  }
  ~TieredStore() override { Close().IgnoreError(); }

  // Adds the device tier (options.device_capacity_bytes > 0), before the store is shared.
  Status OpenDevice();

  Status Put(SegmentHandle segment) override;
  StatusOr<SegmentHandle> Get(const Hash128& key, const Hash128& model) override;
  StatusOr<DeviceSegment> GetDevice(const Hash128& key, const Hash128& model) override;
  StatusOr<SegmentInfo> Info(const Hash128& key) override;
  bool Contains(const Hash128& key) override;
  Status Delete(const Hash128& key) override;
  std::vector<SegmentInfo> List(const SegmentFilter& filter) override;
  Status Flush() override;
  Status FlushRemote(int timeout_ms) override;
  StoreStats Stats() override;
  StatusOr<VerifyReport> Verify(ProgressFn progress) override;
  StatusOr<CompactReport> Compact(ProgressFn progress) override;
  Status Close() override;

 private:
  // The newest queued (or failed) disk operation for a key. segment == nullptr: a delete.
  struct Pending {
    SegmentHandle segment;
    uint64_t seq = 0;
    bool failed = false;  // the write failed; kept in memory until a Flush retries it
  };
  struct Op {
    Hash128 key;
    uint64_t seq;
    uint64_t bytes;  // payload bytes of the Put (0: a delete)
  };

  size_t StripeIndex(const Hash128& key) const { return Hash128Hasher{}(key) % kStripes; }
  std::mutex& StripeOf(const Hash128& key) { return stripes_[StripeIndex(key)]; }
  // Counts a Put or Delete of a key of the stripe; call with the stripe held.
  void BumpEpochLocked(const Hash128& key) { epochs_[StripeIndex(key)].fetch_add(1, std::memory_order_relaxed); }
  // Get's path past a host miss: the write-behind queue, then disk with promotion. Call with
  // the key's stripe held.
  StatusOr<SegmentHandle> ReadThroughLocked(const Hash128& key, const Hash128& model);
  // The remote tier's copy of `key` (past every local miss), promoted into the host tier. A
  // remote that cannot answer is a miss (NotFound): the caller recomputes.
  StatusOr<SegmentHandle> RemoteReadLocked(const Hash128& key, const Hash128& model);
  // The model of `key` as the local tiers know it (for the remote key of a Delete).
  std::optional<Hash128> LocalModelLocked(const Hash128& key);
  // True if a tier other than the device holds `key` (device eviction may drop its copy).
  bool HasBacking(const Hash128& key);
  // Waits for a queue slot. FailedPrecondition when closing; the last write error when the
  // queue is full of failed writes (waiting would never end).
  Status WaitForSlotLocked(std::unique_lock<std::mutex>& lock);
  void EnqueueLocked(const Hash128& key, SegmentHandle segment);
  // Appends the op for `key`'s pending state `p` to the queue.
  void PushOpLocked(const Hash128& key, const Pending& p);
  // Re-queues failed writes once and waits until everything queued so far is applied. Returns
  // an error if writes are still failing.
  Status DrainLocked(std::unique_lock<std::mutex>& lock);
  void WriterLoop();
  // The pending state of `key`: nullopt if no disk operation is queued or failed for it.
  std::optional<SegmentHandle> PendingLookup(const Hash128& key);

  StoreOptions options_;
  HostTier host_;
  std::unique_ptr<DiskTier> disk_;
  std::unique_ptr<RemoteTier> remote_;  // null: no remote tier

  // Shared by every call; Close takes it exclusively to drop the disk tier (and its lock on
  // the directory) once no call uses it.
  std::shared_mutex close_mu_;
  bool closed_ = false;
  std::mutex close_call_mu_;

  std::array<std::mutex, kStripes> stripes_;
  std::array<std::atomic<uint64_t>, kStripes> epochs_{};
  std::unique_ptr<DeviceCache> device_;  // null: no device tier

  std::mutex mu_;  // guards everything below
  std::condition_variable cv_;
  std::deque<Op> queue_;
  uint64_t queued_bytes_ = 0;  // payload bytes of the Puts in queue_
  std::unordered_map<Hash128, Pending, Hash128Hasher> pending_;
  uint64_t next_seq_ = 1;
  uint64_t done_seq_ = 0;  // seq of the last op the writer finished; ops are applied in seq order
  size_t failed_count_ = 0;
  uint64_t blocked_puts_ = 0;  // Puts inside WaitForSlotLocked's wait
  uint64_t write_errors_ = 0;
  Status last_write_error_;
  bool closing_ = false;
  bool stop_ = false;
  std::thread writer_;

  std::atomic<uint64_t> promotions_{0};
  std::atomic<uint64_t> remote_promotions_{0};
};

Status TieredStore::Put(SegmentHandle segment) {
  if (!segment) return InvalidArgumentError("null segment");
  std::shared_lock<std::shared_mutex> open(close_mu_);
  if (closed_) return ClosedError();
  KVAGENT_RETURN_IF_ERROR(segment->Validate());
  if (!disk_) {
    std::lock_guard<std::mutex> stripe(StripeOf(segment->key));
    BumpEpochLocked(segment->key);
    if (device_) device_->Erase(segment->key);
    KVAGENT_ASSIGN_OR_RETURN(SegmentHandle held, host_.Put(*segment));
    if (remote_) remote_->Enqueue(std::move(held));  // a full queue drops it (counted): the host holds it
    return Status::Ok();
  }

  if (options_.disk_capacity_bytes != 0 && segment->PayloadBytes() > options_.disk_capacity_bytes)
    return ResourceExhaustedError("segment of " + std::to_string(segment->PayloadBytes()) +
                                  " payload bytes exceeds the disk tier capacity of " +
                                  std::to_string(options_.disk_capacity_bytes) + " bytes");
  // The one copy of a Put, made before any lock is taken.
  KVAGENT_ASSIGN_OR_RETURN(SegmentHandle copy, host_.OwnedCopy(*segment));
  const Hash128 key = copy->key;
  std::lock_guard<std::mutex> stripe(StripeOf(key));
  BumpEpochLocked(key);
  if (!options_.write_behind) {
    KVAGENT_RETURN_IF_ERROR(disk_->Put(*copy));
  } else {
    std::unique_lock<std::mutex> lock(mu_);
    KVAGENT_RETURN_IF_ERROR(WaitForSlotLocked(lock));
    EnqueueLocked(key, copy);
  }
  // A host tier too full of in-use segments only loses the cached copy; an older version of
  // the key must not stay behind to shadow the new one.
  if (!host_.Adopt(copy).ok()) host_.Erase(key);
  if (device_) device_->Erase(key);
  if (remote_) remote_->Enqueue(std::move(copy));
  return Status::Ok();
}

Status TieredStore::WaitForSlotLocked(std::unique_lock<std::mutex>& lock) {
  for (;;) {
    if (closing_) return ClosedError();
    // Segments the writer has taken (the batches in flight: at most 8, 64 MiB) do not count: the
    // queue refills while the device writes, so the next batch is a full one.
    if (queue_.size() + failed_count_ < options_.write_queue_limit) return Status::Ok();
    if (failed_count_ > 0)
      return UnavailableError("write-behind queue is full of failed disk writes (" + std::to_string(failed_count_) +
                              " segments kept in memory; Flush() retries them): " + last_write_error_.ToString());
    ++blocked_puts_;
    cv_.wait(lock);
    --blocked_puts_;
  }
}

void TieredStore::EnqueueLocked(const Hash128& key, SegmentHandle segment) {
  Pending& p = pending_[key];
  if (p.failed) --failed_count_;
  p = Pending{std::move(segment), next_seq_++, false};
  PushOpLocked(key, p);
  cv_.notify_all();
}

void TieredStore::PushOpLocked(const Hash128& key, const Pending& p) {
  const uint64_t bytes = p.segment ? p.segment->PayloadBytes() : 0;
  queue_.push_back(Op{key, p.seq, bytes});
  queued_bytes_ += bytes;
}

void TieredStore::WriterLoop() {
  // Consecutive queued Puts go to the disk tier as one batch (up to kBatchBytes of payload or
  // kBatchSegments), so it writes them out together; a Delete is applied on its own, after every
  // batch before it is finished. Batches are submitted (DiskTier::SubmitBatch) while earlier ones
  // are still being written, up to kMaxInFlightBytes / kMaxInFlightBatches, and finished oldest
  // first (FinishBatch) when that limit is reached or the queue runs dry: the device always has
  // writes queued while the next batch is encoded and copied.
  constexpr uint64_t kBatchBytes = 4ull << 20;
  constexpr size_t kBatchSegments = 256;
  constexpr uint64_t kMaxInFlightBytes = 64ull << 20;
  constexpr size_t kMaxInFlightBatches = 8;
  constexpr uint64_t kMinBatchBytes = 1ull << 20;
  struct Item {
    Op op;
    SegmentHandle segment;  // null: a delete
  };
  struct Batch {
    std::vector<Item> items;
    uint64_t bytes = 0;
    uint64_t last_seq = 0;  // of every op taken off the queue for it, applied or skipped
    std::unique_ptr<DiskTier::WriteTicket> ticket;
  };
  std::deque<Batch> in_flight;  // submitted, not finished; oldest first
  uint64_t in_flight_bytes = 0;
  std::vector<const Segment*> puts;
  // Applies a finished batch's outcome (ok_count leading items written); call with mu_ held.
  auto apply = [this](const Batch& b, const Status& s, size_t ok_count) {
    done_seq_ = b.last_seq;
    for (size_t i = 0; i < b.items.size(); ++i) {
      const Item& item = b.items[i];
      auto it = pending_.find(item.op.key);
      if (it == pending_.end() || it->second.seq != item.op.seq) continue;
      if (i < ok_count) {
        pending_.erase(it);
      } else {
        it->second.failed = true;
        ++failed_count_;
      }
    }
    if (!s.ok()) {
      write_errors_ += b.items.size() - std::min(ok_count, b.items.size());
      const Item& first_failed = b.items[std::min(ok_count, b.items.size() - 1)];
      last_write_error_ =
          s.WithContext(std::string(first_failed.segment ? "write-behind put of " : "write-behind delete of ") +
                        first_failed.op.key.ToHex());
    }
    cv_.notify_all();
  };
  // Group commit (without mu_): one sync when the queue runs dry covers every record written
  // since the last one. Nothing under write-behind is acknowledged as durable before Flush(),
  // which syncs again, so a failed sync here only counts; the next Flush reports a lasting one.
  auto sync_if_dry = [this](Status* s, size_t* ok_count) {
    if (!s->ok() || !options_.sync) return;
    {
      std::lock_guard<std::mutex> relock(mu_);
      if (!queue_.empty()) return;
    }
    *s = disk_->Sync();
    if (!s->ok()) *ok_count = 0;
  };
  // Finishes the oldest batch in flight; call with `lock` held (released meanwhile).
  auto finish_oldest = [&](std::unique_lock<std::mutex>& lock) {
    Batch b = std::move(in_flight.front());
    in_flight.pop_front();
    in_flight_bytes -= b.bytes;
    lock.unlock();
    size_t ok_count = 0;
    Status s = disk_->FinishBatch(std::move(b.ticket), &ok_count);
    if (in_flight.empty()) sync_if_dry(&s, &ok_count);
    lock.lock();
    apply(b, s, ok_count);
  };
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_.wait(lock, [&] { return stop_ || !queue_.empty() || !in_flight.empty(); });
    // A batch in flight is finished first when the limit is reached, when the queue is empty,
    // or when it holds less than kMinBatchBytes: it fills up while the device writes.
    if (!in_flight.empty() && (queued_bytes_ < kMinBatchBytes || in_flight_bytes >= kMaxInFlightBytes ||
                               in_flight.size() >= kMaxInFlightBatches)) {
      finish_oldest(lock);
      continue;
    }
    if (queue_.empty()) return;  // stop_ and drained
    Batch batch;
    bool delete_waits = false;
    while (!queue_.empty()) {
      const Op op = queue_.front();
      auto it = pending_.find(op.key);
      const bool live = it != pending_.end() && it->second.seq == op.seq;
      const bool is_delete = live && !it->second.segment;
      if (!batch.items.empty() && (is_delete || batch.items.size() >= kBatchSegments || batch.bytes >= kBatchBytes))
        break;
      if (is_delete && !in_flight.empty()) {  // the puts before it are written first
        delete_waits = true;
        break;
      }
      queue_.pop_front();
      queued_bytes_ -= op.bytes;
      batch.last_seq = op.seq;
      // A superseded op (a newer Put or Delete of the same key is queued behind it) is skipped.
      if (!live) continue;
      batch.items.push_back(Item{op, it->second.segment});
      if (is_delete) break;
      batch.bytes += it->second.segment->PayloadBytes();
    }
    if (batch.items.empty()) {
      // Only superseded ops: done once everything before them is.
      if (batch.last_seq != 0) {
        if (!in_flight.empty()) {
          in_flight.back().last_seq = batch.last_seq;
        } else {
          done_seq_ = batch.last_seq;
          cv_.notify_all();
        }
      }
      if (delete_waits) finish_oldest(lock);
      continue;
    }
    cv_.notify_all();  // slots are free for waiting Puts
    lock.unlock();
    if (!batch.items.front().segment) {  // a delete (nothing is in flight)
      Status s = disk_->Delete(batch.items.front().op.key);
      if (s.code() == StatusCode::kNotFound) s = Status::Ok();
      size_t ok_count = s.ok() ? 1 : 0;
      sync_if_dry(&s, &ok_count);
      lock.lock();
      apply(batch, s, ok_count);
      continue;
    }
    puts.clear();
    for (const Item& item : batch.items) puts.push_back(item.segment.get());
    batch.ticket = disk_->SubmitBatch(puts);
    lock.lock();
    in_flight_bytes += batch.bytes;
    in_flight.push_back(std::move(batch));
  }
}

Status TieredStore::DrainLocked(std::unique_lock<std::mutex>& lock) {
  for (auto& [key, p] : pending_) {
    if (!p.failed) continue;
    p.failed = false;
    --failed_count_;
    p.seq = next_seq_++;
    PushOpLocked(key, p);
  }
  cv_.notify_all();
  const uint64_t target = next_seq_ - 1;
  cv_.wait(lock, [&] { return done_seq_ >= target; });
  if (failed_count_ > 0)
    return UnavailableError(std::to_string(failed_count_) +
                            " segments could not be written to disk (still served from memory; the next "
                            "Flush retries them): " +
                            last_write_error_.ToString());
  return Status::Ok();
}

std::optional<SegmentHandle> TieredStore::PendingLookup(const Hash128& key) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = pending_.find(key);
  if (it == pending_.end()) return std::nullopt;
  return it->second.segment;
}

StatusOr<SegmentHandle> TieredStore::Get(const Hash128& key, const Hash128& model) {
  std::shared_lock<std::shared_mutex> open(close_mu_);
  if (closed_) return ClosedError();
  if (SegmentHandle h = host_.Get(key)) {
    KVAGENT_RETURN_IF_ERROR(CheckFingerprint(h->model, model));
    return h;
  }
  if (!disk_ && !remote_) return NotFoundError("segment " + key.ToHex() + " not in store");
  std::lock_guard<std::mutex> stripe(StripeOf(key));
  return ReadThroughLocked(key, model);
}

StatusOr<SegmentHandle> TieredStore::ReadThroughLocked(const Hash128& key, const Hash128& model) {
  if (!disk_) return RemoteReadLocked(key, model);
  if (std::optional<SegmentHandle> p = PendingLookup(key)) {
    if (!*p) return NotFoundError("segment " + key.ToHex() + " was deleted");
    KVAGENT_RETURN_IF_ERROR(CheckFingerprint((*p)->model, model));
    return *p;
  }
  StatusOr<SegmentHandle> h = disk_->Get(key, model, [this](size_t n) { return host_.LendBuffer(n); });
  if (!h.ok()) {
    if (h.status().code() == StatusCode::kNotFound) return RemoteReadLocked(key, model);
    return h.status();
  }
  if (host_.Adopt(*h).ok()) promotions_.fetch_add(1, std::memory_order_relaxed);
  return h;
}

StatusOr<SegmentHandle> TieredStore::RemoteReadLocked(const Hash128& key, const Hash128& model) {
  if (!remote_) return NotFoundError("segment " + key.ToHex() + " not in store");
  StatusOr<SegmentHandle> h = remote_->Get(key, model, [this](size_t n) { return host_.LendBuffer(n); });
  if (!h.ok()) {
    const StatusCode code = h.status().code();
    // Corrupt or foreign values are reported as the disk tier reports them; anything else the
    // remote says (absent, unreachable, timed out, refused) is a miss.
    if (code == StatusCode::kDataLoss || code == StatusCode::kNotFound) return h.status();
    return NotFoundError("segment " + key.ToHex() + " not in the local tiers; remote tier: " +
                         std::string(h.status().message()));
  }
  if (host_.Adopt(*h).ok()) remote_promotions_.fetch_add(1, std::memory_order_relaxed);
  return h;
}

std::optional<Hash128> TieredStore::LocalModelLocked(const Hash128& key) {
  if (SegmentHandle h = host_.Peek(key)) return h->model;
  if (!disk_) return std::nullopt;
  if (std::optional<SegmentHandle> p = PendingLookup(key)) {
    if (*p) return (*p)->model;
    return std::nullopt;
  }
  StatusOr<SegmentInfo> info = disk_->Info(key);
  if (info.ok()) return info->model;
  return std::nullopt;
}

bool TieredStore::HasBacking(const Hash128& key) {
  if (host_.Contains(key)) return true;
  if (!disk_) return false;
  if (std::optional<SegmentHandle> p = PendingLookup(key)) return *p != nullptr;
  return disk_->Contains(key);
}

Status TieredStore::OpenDevice() {
  if (options_.device_capacity_bytes == 0) return Status::Ok();
  DeviceCacheOptions d;
  d.device = options_.device;
  d.capacity_bytes = options_.device_capacity_bytes;
  d.has_backing = [this](const Hash128& key) { return HasBacking(key); };
  KVAGENT_ASSIGN_OR_RETURN(device_, OpenDeviceCache(std::move(d)));
  return Status::Ok();
}

StatusOr<DeviceSegment> TieredStore::GetDevice(const Hash128& key, const Hash128& model) {
  std::vector<SegmentHandle> evicted;
  std::array<uint64_t, kStripes> epochs;
  StatusOr<DeviceSegment> result = DeviceSegment();
  {
    std::shared_lock<std::shared_mutex> open(close_mu_);
    if (closed_) return ClosedError();
    if (!device_)
      return UnavailableError("store has no device tier (open it with device_capacity_bytes > 0 in a CUDA build)");
    KVAGENT_ASSIGN_OR_RETURN(DeviceSegment hit, device_->Lookup(key, true));
    if (hit) {
      KVAGENT_RETURN_IF_ERROR(CheckFingerprint(hit.meta()->model, model));
      return hit;
    }
    std::lock_guard<std::mutex> stripe(StripeOf(key));
    // Loaded by another caller while this one waited for the stripe? (Counted once, as a miss.)
    KVAGENT_ASSIGN_OR_RETURN(DeviceSegment again, device_->Lookup(key, false));
    if (again) {
      KVAGENT_RETURN_IF_ERROR(CheckFingerprint(again.meta()->model, model));
      return again;
    }
    SegmentHandle h = host_.Get(key);
    if (h) {
      KVAGENT_RETURN_IF_ERROR(CheckFingerprint(h->model, model));
    } else {
      KVAGENT_ASSIGN_OR_RETURN(h, ReadThroughLocked(key, model));
    }
    for (size_t i = 0; i < kStripes; ++i) epochs[i] = epochs_[i].load(std::memory_order_relaxed);
    result = device_->Load(h, &evicted);
  }
  // Device entries no other tier held come back to the host tier, each under its own stripe
  // (taken after this key's is released) and only if no Put or Delete of that stripe ran since
  // the eviction, so a copy never shadows a newer version or resurrects a deleted key.
  for (SegmentHandle& e : evicted) {
    std::shared_lock<std::shared_mutex> open(close_mu_);
    if (closed_) break;
    std::lock_guard<std::mutex> stripe(StripeOf(e->key));
    if (epochs_[StripeIndex(e->key)].load(std::memory_order_relaxed) != epochs[StripeIndex(e->key)]) continue;
    if (!HasBacking(e->key)) host_.Adopt(e).IgnoreError();
  }
  return result;
}

StatusOr<SegmentInfo> TieredStore::Info(const Hash128& key) {
  std::shared_lock<std::shared_mutex> open(close_mu_);
  if (closed_) return ClosedError();
  if (SegmentHandle h = host_.Peek(key)) return InfoOf(*h);
  StatusOr<SegmentInfo> local = NotFoundError("segment " + key.ToHex() + " not in store");
  if (disk_) {
    if (std::optional<SegmentHandle> p = PendingLookup(key)) {
      if (!*p) return NotFoundError("segment " + key.ToHex() + " was deleted");
      return InfoOf(**p);
    }
    local = disk_->Info(key);
  }
  if (local.ok() || local.status().code() != StatusCode::kNotFound || !remote_) return local;
  StatusOr<SegmentInfo> remote = remote_->Info(key);
  if (remote.ok() || remote.status().code() == StatusCode::kDataLoss) return remote;
  return local;
}

bool TieredStore::Contains(const Hash128& key) {
  std::shared_lock<std::shared_mutex> open(close_mu_);
  if (closed_) return false;
  if (host_.Contains(key)) return true;
  if (!disk_) return false;
  if (std::optional<SegmentHandle> p = PendingLookup(key)) return *p != nullptr;
  return disk_->Contains(key);
}

Status TieredStore::Delete(const Hash128& key) {
  std::shared_lock<std::shared_mutex> open(close_mu_);
  if (closed_) return ClosedError();
  std::lock_guard<std::mutex> stripe(StripeOf(key));
  const Status not_found = NotFoundError("segment " + key.ToHex() + " not in store");
  BumpEpochLocked(key);
  if (remote_)
    if (std::optional<Hash128> model = LocalModelLocked(key)) remote_->EnqueueDelete(key, *model);
  if (device_) device_->Erase(key);
  if (!disk_) return host_.Erase(key) ? Status::Ok() : not_found;
  if (!options_.write_behind) {
    Status d = disk_->Delete(key);
    if (!d.ok() && d.code() != StatusCode::kNotFound) return d;
    bool in_host = host_.Erase(key);
    return d.ok() || in_host ? Status::Ok() : not_found;
  }
  // Holding the stripe, nobody else can queue an operation for `key`, so the state read here
  // stays current until the tombstone is queued.
  std::optional<SegmentHandle> p = PendingLookup(key);
  bool exists = p ? *p != nullptr : (host_.Contains(key) || disk_->Contains(key));
  if (!exists) return not_found;
  {
    std::unique_lock<std::mutex> lock(mu_);
    KVAGENT_RETURN_IF_ERROR(WaitForSlotLocked(lock));
    // Supersedes a queued write of the key (the writer skips it) and removes any older disk copy.
    EnqueueLocked(key, nullptr);
  }
  host_.Erase(key);
  return Status::Ok();
}

std::vector<SegmentInfo> TieredStore::List(const SegmentFilter& filter) {
  std::shared_lock<std::shared_mutex> open(close_mu_);
  std::vector<SegmentInfo> out;
  if (closed_) return out;
  // With every stripe held no Put or Delete is half done, so the queued operations and the host
  // tier agree: a key the host holds is its newest version. The pending snapshot is taken
  // before the disk listing, so a write the writer finishes in between is seen in one of them.
  std::unordered_map<Hash128, SegmentHandle, Hash128Hasher> pending;
  std::vector<SegmentHandle> host;
  {
    std::vector<std::unique_lock<std::mutex>> all;
    all.reserve(kStripes);
    for (std::mutex& m : stripes_) all.emplace_back(m);
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [key, p] : pending_) pending.emplace(key, p.segment);
    host = host_.Snapshot();
  }
  std::map<Hash128, SegmentInfo> merged;
  // Remote rows first: every local tier's view of a key replaces the remote one. An unreachable
  // remote lists nothing.
  if (remote_) {
    StatusOr<std::vector<SegmentInfo>> remote = remote_->List(filter);
    if (remote.ok())
      for (SegmentInfo& i : *remote) merged.emplace(i.key, std::move(i));
  }
  if (disk_)
    for (SegmentInfo& i : disk_->List(filter)) merged.insert_or_assign(i.key, std::move(i));
  for (const auto& [key, segment] : pending) {
    merged.erase(key);
    if (segment) {
      SegmentInfo info = InfoOf(*segment);
      if (filter.Matches(info)) merged.emplace(key, std::move(info));
    }
  }
  for (const SegmentHandle& h : host) {
    SegmentInfo info = InfoOf(*h);
    auto it = merged.find(h->key);
    if (it != merged.end()) info.stored_bytes = it->second.stored_bytes;  // as held on disk
    if (filter.Matches(info)) {
      merged.insert_or_assign(h->key, std::move(info));
    } else if (it != merged.end()) {
      merged.erase(it);
    }
  }
  out.reserve(merged.size());
  for (auto& [key, info] : merged) out.push_back(std::move(info));
  return out;
}

Status TieredStore::FlushRemote(int timeout_ms) {
  std::shared_lock<std::shared_mutex> open(close_mu_);
  if (closed_) return ClosedError();
  if (!remote_) return FailedPreconditionError("store has no remote tier");
  return remote_->Flush(timeout_ms);
}

Status TieredStore::Flush() {
  std::shared_lock<std::shared_mutex> open(close_mu_);
  if (closed_) return ClosedError();
  if (!disk_) return Status::Ok();
  Status drained;
  if (options_.write_behind) {
    std::unique_lock<std::mutex> lock(mu_);
    drained = DrainLocked(lock);
  }
  Status synced = disk_->Sync();
  return drained.ok() ? synced : drained;
}

StoreStats TieredStore::Stats() {
  std::shared_lock<std::shared_mutex> open(close_mu_);
  StoreStats s;
  s.host = host_.Stats();
  s.promotions = promotions_.load(std::memory_order_relaxed);
  if (device_) {
    s.has_device = true;
    s.device = device_->Stats();
  }
  if (disk_) {
    s.has_disk = true;
    s.disk = disk_->Stats();
  }
  if (remote_) {
    s.has_remote = true;
    s.remote = remote_->Stats();
    s.remote_promotions = remote_promotions_.load(std::memory_order_relaxed);
  }
  std::lock_guard<std::mutex> lock(mu_);
  s.write_queue_depth = queue_.size() + failed_count_;
  s.write_errors = write_errors_;
  s.blocked_puts = blocked_puts_;
  return s;
}

StatusOr<VerifyReport> TieredStore::Verify(ProgressFn progress) {
  std::shared_lock<std::shared_mutex> open(close_mu_);
  if (closed_) return ClosedError();
  if (!disk_) return FailedPreconditionError("store has no disk tier to verify (opened without a path)");
  return disk_->Verify(std::move(progress));
}

StatusOr<CompactReport> TieredStore::Compact(ProgressFn progress) {
  std::shared_lock<std::shared_mutex> open(close_mu_);
  if (closed_) return ClosedError();
  if (!disk_) return FailedPreconditionError("store has no disk tier to compact (opened without a path)");
  return disk_->Compact(std::move(progress));
}

Status TieredStore::Close() {
  std::lock_guard<std::mutex> once(close_call_mu_);
  {
    std::shared_lock<std::shared_mutex> open(close_mu_);
    if (closed_) return Status::Ok();
  }
  Status result;
  if (disk_) {
    if (writer_.joinable()) {
      std::unique_lock<std::mutex> lock(mu_);
      closing_ = true;  // wakes Puts waiting for a slot; they fail, unacknowledged
      result = DrainLocked(lock);
      stop_ = true;
      cv_.notify_all();
    }
    if (writer_.joinable()) writer_.join();
    Status synced = disk_->Sync();
    if (result.ok()) result = synced;
  }
  // Queued remote writes get one command timeout to go out; what is left is dropped (the local
  // tiers had it; a remote write is a copy).
  if (remote_) remote_->Close(remote_->options().command_timeout_ms).IgnoreError();
  std::unique_lock<std::shared_mutex> exclusive(close_mu_);
  closed_ = true;
  device_.reset();  // DeviceSegments still held keep their bytes
  disk_.reset();
  remote_.reset();
  host_.Clear();
  std::lock_guard<std::mutex> lock(mu_);
  closing_ = true;
  pending_.clear();
  queue_.clear();
  queued_bytes_ = 0;
  failed_count_ = 0;
  return result;
}

}  // namespace

StatusOr<std::unique_ptr<Store>> NewTieredStore(const StoreOptions& options, std::unique_ptr<DiskTier> disk,
                                                std::unique_ptr<RemoteTier> remote) {
  if (disk && options.write_queue_limit > (1u << 20))
    return InvalidArgumentError("write_queue_limit must be at most 1048576 segments");
  auto store = std::make_unique<TieredStore>(options, std::move(disk), std::move(remote));
  KVAGENT_RETURN_IF_ERROR(store->OpenDevice());
  return std::unique_ptr<Store>(std::move(store));
}

}  // namespace kvagent
