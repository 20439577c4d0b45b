// Random operation sequences (put / get / delete / capacity eviction / reopen / compact)
// checked step by step against a plain std::map model that also replays the LRU policy.
#include <gtest/gtest.h>

#include <list>
#include <map>
#include <random>

#include "disk/disk_test_util.h"
#include "kvagent/disk_tier.h"

namespace kvagent {
namespace {

using testing::MakeSegment;
using testing::SameSegment;
using testing::TempDir;
using testing::TestKey;
using testing::TestModel;

struct ModelEntry {
  uint64_t seed;
  SegmentLayout layout;
  Hash128 model;
  uint64_t record_len;
  uint64_t write_seq;
};

class Model {
 public:
  explicit Model(uint64_t capacity) : capacity_(capacity) {}

  void Put(uint64_t key, ModelEntry e) {
    e.write_seq = ++seq_;
    Erase(key);
    live_ += e.record_len;
    map_[key] = e;
    lru_.push_front(key);
    if (capacity_ == 0) return;
    while (live_ > capacity_ && !lru_.empty()) {  // the tier's policy: LRU, never the new key
      uint64_t victim = lru_.back();
      if (victim == key && lru_.size() == 1) break;
      if (victim == key) {
        lru_.splice(lru_.begin(), lru_, std::prev(lru_.end()));
        continue;
      }
      Erase(victim);
      ++evictions_;
    }
  }
  void Touch(uint64_t key) {
    lru_.remove(key);
    lru_.push_front(key);
  }
  bool Erase(uint64_t key) {
    auto it = map_.find(key);
    if (it == map_.end()) return false;
    live_ -= it->second.record_len;
    map_.erase(it);
    lru_.remove(key);
    return true;
  }
  // After a reopen the tier orders recency by write order.
  void Reopened() {
    std::vector<std::pair<uint64_t, uint64_t>> order;
    for (const auto& [k, e] : map_) order.emplace_back(e.write_seq, k);
    std::sort(order.begin(), order.end());
    lru_.clear();
    for (const auto& [s, k] : order) lru_.push_front(k);
  }

  const std::map<uint64_t, ModelEntry>& map() const { return map_; }
  uint64_t live() const { return live_; }
  uint64_t evictions() const { return evictions_; }

 private:
  uint64_t capacity_;
  std::map<uint64_t, ModelEntry> map_;
  std::list<uint64_t> lru_;
  uint64_t live_ = 0;
  uint64_t seq_ = 0;
  uint64_t evictions_ = 0;
};

void RunModel(Env* env, const std::string& dir, uint64_t seed, int steps, bool sync) {
  std::mt19937_64 rng(seed);
  const SegmentLayout layouts[] = {
      {1, 1, 4, 1, DType::kF32}, {2, 1, 8, 3, DType::kF16}, {1, 2, 16, 5, DType::kBF16}, {3, 1, 8, 7, DType::kF32}};
  DiskTierOptions o;
  o.dir = dir;
  o.env = env;
  o.sync = sync;
  o.max_file_bytes = 8 << 10;
  o.capacity_bytes = (seed % 2) ? 24 << 10 : 0;
  o.compact_dead_ratio = 0.6;
  o.compact_min_dead_bytes = 16 << 10;
  auto opened = DiskTier::Open(o);
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  std::unique_ptr<DiskTier> t = std::move(opened).value();
  Model model(o.capacity_bytes);
  const uint64_t kKeys = 60;
  uint64_t evictions_before_open = 0;
  for (int step = 0; step < steps; ++step) {
    const int op = static_cast<int>(rng() % 100);
    const uint64_t key = 1 + rng() % kKeys;
    SCOPED_TRACE("seed " + std::to_string(seed) + " step " + std::to_string(step) + " op " + std::to_string(op));
    if (op < 40) {
      ModelEntry e{rng(), layouts[rng() % 4], TestModel(rng() % 2), 0, 0};
      Segment s = MakeSegment(key, e.seed, e.layout, e.model);
      ASSERT_TRUE(t->Put(s).ok());
      auto info = t->Info(s.key);
      ASSERT_TRUE(info.ok());
      e.record_len = info->stored_bytes;
      model.Put(key, e);
    } else if (op < 75) {
      auto it = model.map().find(key);
      const bool wrong_model = rng() % 8 == 0;
      Hash128 want = it == model.map().end() ? TestModel(0) : it->second.model;
      if (wrong_model) want = TestModel(7);
      auto got = t->Get(TestKey(key), want);
      if (it == model.map().end()) {
        ASSERT_EQ(got.status().code(), StatusCode::kNotFound);
      } else if (wrong_model) {
        ASSERT_EQ(got.status().code(), StatusCode::kFailedPrecondition);
      } else {
        ASSERT_TRUE(got.ok()) << got.status().ToString();
        ASSERT_TRUE(SameSegment(**got, MakeSegment(key, it->second.seed, it->second.layout, it->second.model)));
        model.Touch(key);
      }
    } else if (op < 90) {
      bool present = model.Erase(key);
      ASSERT_EQ(t->Delete(TestKey(key)).code(), present ? StatusCode::kOk : StatusCode::kNotFound);
    } else if (op < 96) {
      evictions_before_open += t->Stats().evictions;
      t.reset();
      auto re = DiskTier::Open(o);
      ASSERT_TRUE(re.ok()) << re.status().ToString();
      t = std::move(re).value();
      ASSERT_EQ(t->Recovery().corrupt_records, 0u);
      ASSERT_EQ(t->Recovery().torn_tails, 0u);
      model.Reopened();
    } else {
      auto r = t->Compact(nullptr);
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      ASSERT_EQ(r->records_moved, model.map().size());
    }
    TierStats st = t->Stats();
    ASSERT_EQ(st.segments, model.map().size());
    ASSERT_EQ(st.bytes, model.live());
    ASSERT_EQ(evictions_before_open + st.evictions, model.evictions());
    if (o.capacity_bytes) {
      ASSERT_LE(st.bytes, o.capacity_bytes);
    }
    if (step % 50 == 0) {
      for (uint64_t k = 1; k <= kKeys; ++k) {
        ASSERT_EQ(t->Contains(TestKey(k)), model.map().count(k) > 0) << k;
      }
    }
  }
  auto v = t->Verify(nullptr);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->ok, model.map().size());
  EXPECT_EQ(v->corrupt, 0u);
}

TEST(DiskModelTest, MemEnvSeeds) {
  for (uint64_t seed : {1, 2, 3, 4}) {
    auto env = NewMemEnv();
    RunModel(env.get(), "/m/tier", seed, 3000, true);
    if (HasFatalFailure()) return;
  }
}

TEST(DiskModelTest, PosixSeeds) {
  for (uint64_t seed : {11, 12}) {
    TempDir tmp;
    RunModel(Env::Default(), tmp.path() + "/tier", seed, 1000, /*sync=*/false);
    if (HasFatalFailure()) return;
  }
}

TEST(DiskModelTest, PosixSyncedShortRun) {
  TempDir tmp;
  RunModel(Env::Default(), tmp.path() + "/tier", 21, 200, /*sync=*/true);
}

}  // namespace
}  // namespace kvagent
