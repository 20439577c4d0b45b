// Test helpers for the store tests: self-verifying segments and an in-memory DiskTier whose
// writes can be slowed, gated or made to fail.
#pragma once

#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "kvagent/disk_tier.h"
#include "kvagent/segment.h"
#include "kvagent/store.h"

namespace kvagent::testing {

inline Hash128 TestModel(int i = 0) { return HashString("test-model-" + std::to_string(i)); }
inline Hash128 TestKey(uint64_t id) { return HashString("key-" + std::to_string(id)); }

// Shape of segment `id`, varied over awkward sizes and all three dtypes.
inline SegmentLayout LayoutFor(uint64_t id, int scale = 1) {
  static constexpr int kTokens[] = {1, 3, 7, 16, 37};
  static constexpr int kDims[] = {1, 3, 8};
  static constexpr DType kTypes[] = {DType::kF32, DType::kF16, DType::kBF16};
  SegmentLayout l;
  l.num_layers = 1 + static_cast<int>(id % 3);
  l.num_kv_heads = 1 + static_cast<int>((id / 3) % 2);
  l.head_dim = kDims[(id / 7) % 3];
  l.num_tokens = kTokens[(id / 5) % 5] * scale;
  l.dtype = kTypes[id % 3];
  return l;
}

// Payload byte i of version `version` of a segment with key `key`.
inline std::byte PatternByte(const Hash128& key, int64_t version, size_t i) {
  uint64_t x = key.lo ^ (static_cast<uint64_t>(version) * 0x9e3779b97f4a7c15ULL) ^ (i * 0xbf58476d1ce4e5b9ULL);
  x ^= x >> 31;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 29;
  return static_cast<std::byte>(x & 0xff);
}

// A valid segment whose payload, tokens and meta.turn are a function of (key, version), so
// any segment read back can be checked on its own (CheckSegment).
inline std::shared_ptr<Segment> MakeSegment(const Hash128& key, int64_t version, const SegmentLayout& layout,
                                            const Hash128& model = TestModel()) {
  auto s = std::make_shared<Segment>();
  s->key = key;
  s->model = model;
  s->layout = layout;
  for (int t = 0; t < layout.num_tokens; ++t) {
    s->tokens.push_back(static_cast<int32_t>(version * 1000 + t));
    s->positions.push_back(100 + t);
  }
  s->meta.ns = "ns";
  s->meta.session = "s" + std::to_string(key.lo % 4);
  s->meta.turn = version;
  s->meta.text = "turn " + std::to_string(version);
  auto buf = Buffer::Allocate(layout.NumBytes());
  EXPECT_TRUE(buf.ok());
  s->payload = std::move(buf).value();
  for (size_t i = 0; i < layout.NumBytes(); ++i) s->payload->data()[i] = PatternByte(key, version, i);
  return s;
}

inline std::shared_ptr<Segment> MakeSegment(uint64_t id, int64_t version, const Hash128& model = TestModel()) {
  return MakeSegment(TestKey(id), version, LayoutFor(id), model);
}

// Empty string if `s` is internally consistent (payload/tokens match its key and meta.turn).
inline std::string CheckSegment(const Segment& s) {
  if (!s.Validate().ok()) return "invalid: " + s.Validate().ToString();
  const int64_t v = s.meta.turn;
  for (int t = 0; t < s.layout.num_tokens; ++t)
    if (s.tokens[t] != v * 1000 + t) return "token mismatch";
  for (size_t i = 0; i < s.PayloadBytes(); ++i)
    if (s.payload->data()[i] != PatternByte(s.key, v, i)) return "payload byte " + std::to_string(i) + " differs";
  return "";
}

// Storage of a FakeDiskTier that outlives it (a "reopen" makes a new tier on the same state).
struct FakeDiskState {
  std::mutex mu;
  std::condition_variable cv;
  std::map<Hash128, SegmentHandle> records;  // what is "on disk"
  std::atomic<bool> fail_writes{false};
  std::atomic<bool> gate_closed{false};  // Put and Delete wait while true...
  int permits = 0;                       // ...unless a permit lets one through (guarded by mu)
  std::atomic<int> puts{0};
  std::atomic<int> deletes{0};
  std::atomic<int> waiting{0};  // writes blocked at the gate
  std::atomic<int> syncs{0};

  void OpenGate() {
    std::lock_guard<std::mutex> l(mu);
    gate_closed = false;
    cv.notify_all();
  }
  // Lets `n` more writes through a closed gate.
  void Permit(int n) {
    std::lock_guard<std::mutex> l(mu);
    permits += n;
    cv.notify_all();
  }
  // Blocks until exactly `n` writes wait at the gate.
  void WaitForWaiting(int n) {
    std::unique_lock<std::mutex> l(mu);
    cv.wait(l, [&] { return waiting.load() == n; });
  }
};

class FakeDiskTier final : public DiskTier {
 public:
  explicit FakeDiskTier(std::shared_ptr<FakeDiskState> st) : st_(std::move(st)) {}

  Status Put(const Segment& segment) override {
    KVAGENT_RETURN_IF_ERROR(BeforeWrite());
    KVAGENT_RETURN_IF_ERROR(segment.Validate());
    auto copy = std::make_shared<Segment>(segment);
    KVAGENT_ASSIGN_OR_RETURN(copy->payload, Buffer::CopyOf(segment.payload->span()));
    std::lock_guard<std::mutex> l(st_->mu);
    st_->records[segment.key] = std::move(copy);
    ++st_->puts;
    return Status::Ok();
  }
  StatusOr<SegmentHandle> Get(const Hash128& key, const Hash128& model) override {
    std::lock_guard<std::mutex> l(st_->mu);
    auto it = st_->records.find(key);
    if (it == st_->records.end()) return NotFoundError("fake disk: no " + key.ToHex());
    KVAGENT_RETURN_IF_ERROR(CheckFingerprint(it->second->model, model));
    auto copy = std::make_shared<Segment>(*it->second);
    KVAGENT_ASSIGN_OR_RETURN(copy->payload, Buffer::CopyOf(it->second->payload->span()));
    return SegmentHandle(std::move(copy));
  }
  Status ReadPayload(const Hash128& key, const Hash128& model, std::span<std::byte> dst) override {
    KVAGENT_ASSIGN_OR_RETURN(SegmentHandle h, Get(key, model));
    if (dst.size() != h->PayloadBytes()) return InvalidArgumentError("size");
    std::memcpy(dst.data(), h->payload->data(), dst.size());
    return Status::Ok();
  }
  StatusOr<SegmentInfo> Info(const Hash128& key) override {
    std::lock_guard<std::mutex> l(st_->mu);
    auto it = st_->records.find(key);
    if (it == st_->records.end()) return NotFoundError("fake disk: no " + key.ToHex());
    return InfoOf(*it->second);
  }
  bool Contains(const Hash128& key) override {
    std::lock_guard<std::mutex> l(st_->mu);
    return st_->records.count(key) != 0;
  }
  Status Delete(const Hash128& key) override {
    KVAGENT_RETURN_IF_ERROR(BeforeWrite());
    std::lock_guard<std::mutex> l(st_->mu);
    ++st_->deletes;
    return st_->records.erase(key) ? Status::Ok() : NotFoundError("fake disk: no " + key.ToHex());
  }
  std::vector<SegmentInfo> List(const SegmentFilter& filter) override {
    std::lock_guard<std::mutex> l(st_->mu);
    std::vector<SegmentInfo> out;
    for (const auto& [k, s] : st_->records)
      if (filter.Matches(InfoOf(*s))) out.push_back(InfoOf(*s));
    return out;
  }
  Status Sync() override {
    ++st_->syncs;
    return Status::Ok();
  }
  TierStats Stats() override {
    std::lock_guard<std::mutex> l(st_->mu);
    TierStats t;
    t.segments = st_->records.size();
    return t;
  }
  StatusOr<VerifyReport> Verify(ProgressFn) override {
    std::lock_guard<std::mutex> l(st_->mu);
    VerifyReport r;
    r.records = r.ok = st_->records.size();
    return r;
  }
  StatusOr<CompactReport> Compact(ProgressFn) override { return CompactReport{}; }
  RecoveryReport Recovery() override { return RecoveryReport{}; }

 private:
  Status BeforeWrite() {
    {
      std::unique_lock<std::mutex> l(st_->mu);
      ++st_->waiting;
      st_->cv.notify_all();
      st_->cv.wait(l, [&] { return !st_->gate_closed.load() || st_->permits > 0; });
      if (st_->gate_closed.load()) --st_->permits;
      --st_->waiting;
      st_->cv.notify_all();
    }
    if (st_->fail_writes) return ResourceExhaustedError("fake disk: injected write failure");
    return Status::Ok();
  }
  std::shared_ptr<FakeDiskState> st_;
};

}  // namespace kvagent::testing
