// Fault injection through FaultInjectionEnv: failed writes, short writes, failed syncs and a
// full disk return errors, leave the tier unchanged and usable, and lose no acknowledged data;
// DropUnsyncedData + reopen simulates power loss.
#include <gtest/gtest.h>

#include <map>
#include <random>

#include "disk/disk_test_util.h"
#include "kvagent/disk_tier.h"
#include "kvagent/fault_injection_env.h"

namespace kvagent {
namespace {

using testing::MakeSegment;
using testing::SameSegment;
using testing::TempDir;
using testing::TestKey;
using testing::TestModel;

const SegmentLayout kLayout{2, 2, 16, 6, DType::kF16};

class FaultTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    if (GetParam()) {
      base_ = Env::Default();
      dir_ = tmp_.path() + "/tier";
    } else {
      mem_ = NewMemEnv();
      base_ = mem_.get();
      dir_ = "/fault/tier";
    }
    fenv_ = std::make_unique<FaultInjectionEnv>(base_);
  }
  DiskTierOptions Options() const {
    DiskTierOptions o;
    o.dir = dir_;
    o.env = fenv_.get();
    o.max_file_bytes = 8 << 10;
    o.compact_dead_ratio = 1.0;
    return o;
  }
  std::unique_ptr<DiskTier> Open() {
    auto t = DiskTier::Open(Options());
    EXPECT_TRUE(t.ok()) << t.status().ToString();
    return t.ok() ? std::move(t).value() : nullptr;
  }
  // Every acknowledged key is served bit-exact; every key known absent is absent.
  void CheckAcked(DiskTier* t) {
    for (const auto& [k, seed] : acked_) {
      auto got = t->Get(TestKey(k), TestModel());
      ASSERT_TRUE(got.ok()) << "acknowledged key " << k << ": " << got.status().ToString();
      ASSERT_TRUE(SameSegment(**got, MakeSegment(k, seed, kLayout))) << k;
    }
    for (uint64_t k : absent_) ASSERT_FALSE(t->Contains(TestKey(k))) << k;
  }
  void PutAcked(DiskTier* t, uint64_t k, uint64_t seed) {
    ASSERT_TRUE(t->Put(MakeSegment(k, seed, kLayout)).ok());
    acked_[k] = seed;
    absent_.erase(k);
  }

  TempDir tmp_;
  std::unique_ptr<Env> mem_;
  Env* base_ = nullptr;
  std::unique_ptr<FaultInjectionEnv> fenv_;
  std::string dir_;
  std::map<uint64_t, uint64_t> acked_;
  std::set<uint64_t> absent_;
};

TEST_P(FaultTest, FailedShortAndUnsyncedWritesLeaveTierUnchanged) {
  auto t = Open();
  for (uint64_t k = 1; k <= 5; ++k) PutAcked(t.get(), k, k);
  struct Case {
    const char* name;
    std::function<void()> arm;
    StatusCode code;
  };
  const Case cases[] = {
      {"failed write", [&] { fenv_->FailNextWrites(1); }, StatusCode::kInternal},
      {"failed second write", [&] { fenv_->FailNextWrites(2); }, StatusCode::kInternal},
      {"short write", [&] { fenv_->ShortNextWrite(77); }, StatusCode::kInternal},
      {"short write of 0 bytes", [&] { fenv_->ShortNextWrite(0); }, StatusCode::kInternal},
      {"failed sync", [&] { fenv_->FailNextSyncs(1); }, StatusCode::kInternal},
      {"disk full mid-record", [&] { fenv_->SetDiskBudget(300); }, StatusCode::kResourceExhausted},
  };
  uint64_t next = 100;
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const TierStats before = t->Stats();
    c.arm();
    Status s = t->Put(MakeSegment(next, next, kLayout));
    EXPECT_EQ(s.code(), c.code) << s.ToString();
    fenv_->ClearFaults();
    absent_.insert(next);
    EXPECT_EQ(t->Stats().file_bytes, before.file_bytes);
    EXPECT_EQ(t->Stats().segments, before.segments);
    CheckAcked(t.get());
    // Still usable.
    PutAcked(t.get(), next + 1, next + 1);
    next += 10;
  }
  // Failed tombstone: the key stays.
  fenv_->FailNextWrites(1);
  EXPECT_FALSE(t->Delete(TestKey(1)).ok());
  EXPECT_TRUE(t->Contains(TestKey(1)));
  t.reset();
  t = Open();
  EXPECT_EQ(t->Recovery().torn_tails, 0u);
  EXPECT_EQ(t->Recovery().corrupt_records, 0u);
  CheckAcked(t.get());
}

// Two-step puts with writes that fail on the device after they were queued (the env defers
// asynchronous appends to WaitAsync): records appear only when their ticket finishes, a failed
// write fails its ticket and every ticket submitted after it, and the tier is left as before.
TEST_P(FaultTest, PipelinedBatchesPublishInOrderAndFailTogether) {
  fenv_->SimulateAsyncDirectIo(true);
  DiskTierOptions o = Options();
  o.sync = false;
  o.max_file_bytes = 64 << 20;
  auto opened = DiskTier::Open(o);
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  auto t = std::move(opened).value();
  const SegmentLayout big{2, 2, 128, 64, DType::kBF16};  // 128 KiB payloads: batches are coalesced
  std::vector<Segment> segs;
  for (uint64_t k = 0; k < 40; ++k) segs.push_back(MakeSegment(1000 + k, k, big));
  auto batch = [&](size_t first) {
    std::vector<const Segment*> out;
    for (size_t i = first; i < first + 10; ++i) out.push_back(&segs[i]);
    return out;
  };
  auto b0 = batch(0), b1 = batch(10), b2 = batch(20), b3 = batch(30);
  auto t0 = t->SubmitBatch(b0);
  auto t1 = t->SubmitBatch(b1);
  EXPECT_FALSE(t->Contains(segs[0].key));  // written, not yet published
  size_t written = 99;
  ASSERT_TRUE(t->FinishBatch(std::move(t1), &written).ok());  // finishes t0 first
  EXPECT_EQ(written, 10u);
  for (size_t i = 0; i < 20; ++i) EXPECT_TRUE(t->Contains(segs[i].key)) << i;
  ASSERT_TRUE(t->FinishBatch(std::move(t0), &written).ok());
  EXPECT_EQ(written, 10u);
  auto got = t->Get(segs[15].key, TestModel());
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_TRUE(SameSegment(**got, segs[15]));

  const TierStats before = t->Stats();
  auto t2 = t->SubmitBatch(b2);
  fenv_->FailNextWrites(1);  // the device fails t2's queued write
  auto t3 = t->SubmitBatch(b3);
  EXPECT_FALSE(t->FinishBatch(std::move(t2), &written).ok());
  EXPECT_EQ(written, 0u);
  EXPECT_FALSE(t->FinishBatch(std::move(t3), &written).ok());
  EXPECT_EQ(written, 0u);
  fenv_->ClearFaults();
  EXPECT_EQ(t->Stats().segments, before.segments);
  EXPECT_EQ(t->Stats().file_bytes, before.file_bytes);
  for (size_t i = 20; i < 40; ++i) EXPECT_FALSE(t->Contains(segs[i].key)) << i;
  // Still usable, and a ticket dropped unfinished is finished by its destructor.
  { auto dropped = t->SubmitBatch(b2); }
  EXPECT_TRUE(t->Contains(segs[25].key));
  ASSERT_TRUE(t->Sync().ok());
  t.reset();
  opened = DiskTier::Open(o);
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  t = std::move(opened).value();
  EXPECT_EQ(t->Recovery().corrupt_records, 0u);
  EXPECT_EQ(t->Recovery().torn_tails, 0u);
  for (size_t i = 0; i < 30; ++i) EXPECT_TRUE(t->Contains(segs[i].key)) << i;
  for (size_t i = 30; i < 40; ++i) EXPECT_FALSE(t->Contains(segs[i].key)) << i;
}

TEST_P(FaultTest, DiskFullReturnsResourceExhaustedAndRecovers) {
  auto t = Open();
  fenv_->SetDiskBudget(20000);
  uint64_t k = 1;
  Status s;
  for (; k < 1000; ++k) {
    s = t->Put(MakeSegment(k, k, kLayout));
    if (!s.ok()) break;
    acked_[k] = k;
  }
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.ToString();
  EXPECT_GT(acked_.size(), 3u);
  absent_.insert(k);
  CheckAcked(t.get());
  EXPECT_EQ(t->Put(MakeSegment(k, k, kLayout)).code(), StatusCode::kResourceExhausted);
  fenv_->ClearDiskBudget();
  PutAcked(t.get(), k + 1, 5);
  t.reset();
  t = Open();
  CheckAcked(t.get());
}

TEST_P(FaultTest, CompactionFailuresKeepData) {
  auto t = Open();
  for (uint64_t k = 1; k <= 30; ++k) PutAcked(t.get(), k, k);
  for (uint64_t k = 1; k <= 30; k += 3) {
    ASSERT_TRUE(t->Delete(TestKey(k)).ok());
    acked_.erase(k);
    absent_.insert(k);
  }
  fenv_->FailNextWrites(1);
  EXPECT_FALSE(t->Compact(nullptr).ok());
  fenv_->ClearFaults();
  CheckAcked(t.get());
  fenv_->FailNextSyncs(2);
  EXPECT_FALSE(t->Compact(nullptr).ok());
  fenv_->ClearFaults();
  CheckAcked(t.get());
  PutAcked(t.get(), 77, 77);
  auto r = t->Compact(nullptr);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->records_moved, acked_.size());
  t.reset();
  ASSERT_TRUE(fenv_->DropUnsyncedData().ok());
  t = Open();
  CheckAcked(t.get());
  EXPECT_EQ(t->Stats().segments, acked_.size());
}

TEST_P(FaultTest, DropUnsyncedDataKeepsSyncedRecords) {
  DiskTierOptions o = Options();
  o.sync = false;
  std::map<uint64_t, uint64_t> maybe;
  {
    auto t = DiskTier::Open(o);
    ASSERT_TRUE(t.ok());
    for (uint64_t k = 1; k <= 10; ++k) PutAcked(t->get(), k, k);
    ASSERT_TRUE((*t)->Sync().ok());  // 1..10 durable
    for (uint64_t k = 11; k <= 20; ++k) {
      ASSERT_TRUE((*t)->Put(MakeSegment(k, k, kLayout)).ok());
      maybe[k] = k;
    }
  }
  ASSERT_TRUE(fenv_->DropUnsyncedData().ok());
  auto t = DiskTier::Open(o);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  CheckAcked(t->get());
  for (const auto& [k, seed] : maybe) {
    auto got = (*t)->Get(TestKey(k), TestModel());
    if (got.ok()) {
      EXPECT_TRUE(SameSegment(**got, MakeSegment(k, seed, kLayout)));
    }
  }
  EXPECT_LT((*t)->Stats().segments, 20u);  // the unsynced tail really was dropped
}

TEST_P(FaultTest, RandomFaultScheduleThenPowerLoss) {
  std::mt19937_64 rng(GetParam() ? 5 : 6);
  auto t = Open();
  const int steps = GetParam() ? 150 : 600;
  for (int step = 0; step < steps; ++step) {
    SCOPED_TRACE(step);
    switch (rng() % 6) {
      case 0:
        fenv_->FailNextWrites(1);
        break;
      case 1:
        fenv_->ShortNextWrite(rng() % 2000);
        break;
      case 2:
        fenv_->FailNextSyncs(1);
        break;
      case 3:
        fenv_->SetDiskBudget(rng() % 3000);
        break;
      default:
        break;
    }
    const uint64_t k = 1 + rng() % 40;
    if (rng() % 4 == 0) {
      Status s = t->Delete(TestKey(k));
      if (s.ok()) {
        acked_.erase(k);
        absent_.insert(k);
      }
    } else {
      uint64_t seed = rng();
      Status s = t->Put(MakeSegment(k, seed, kLayout));
      if (s.ok()) {
        acked_[k] = seed;
        absent_.erase(k);
      } else {
        // A failed Put leaves the previous value (or absence) in place.
        ASSERT_TRUE(s.code() == StatusCode::kInternal || s.code() == StatusCode::kResourceExhausted) << s.ToString();
      }
    }
    fenv_->ClearFaults();
    if (step % 25 == 0) CheckAcked(t.get());
    if (HasFatalFailure()) return;
  }
  CheckAcked(t.get());
  t.reset();
  ASSERT_TRUE(fenv_->DropUnsyncedData().ok());
  t = Open();
  CheckAcked(t.get());
  EXPECT_EQ(t->Stats().segments, acked_.size());
}

INSTANTIATE_TEST_SUITE_P(Envs, FaultTest, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "OverPosix" : "OverMemEnv"; });

TEST(MemEnvCapacityTest, FullInMemoryDiskIsResourceExhausted) {
  auto env = NewMemEnv(MemEnvOptions{64 << 10});
  DiskTierOptions o;
  o.dir = "/cap/tier";
  o.env = env.get();
  auto t = DiskTier::Open(o);
  ASSERT_TRUE(t.ok());
  std::map<uint64_t, uint64_t> acked;
  Status s;
  for (uint64_t k = 1; k < 1000 && s.ok(); ++k) {
    s = (*t)->Put(MakeSegment(k, k, kLayout));
    if (s.ok()) acked[k] = k;
  }
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
  for (const auto& [k, seed] : acked) {
    auto got = (*t)->Get(TestKey(k), TestModel());
    ASSERT_TRUE(got.ok());
    EXPECT_TRUE(SameSegment(**got, MakeSegment(k, seed, kLayout)));
  }
  // Reopening a full store works and serves everything.
  t->reset();
  auto again = DiskTier::Open(o);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ((*again)->Stats().segments, acked.size());
}

}  // namespace
}  // namespace kvagent
