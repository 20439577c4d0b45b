// Store behaviour: fingerprints, validation, write-behind (back-pressure, errors, ordering),
// promotion, close.
#include "kvagent/store.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "kvagent/host_tier.h"
#include "store/store_test_fixture.h"
#include "store/store_test_util.h"
#include "store/tiered_store.h"

namespace kvagent {
namespace {

using testing::CheckSegment;
using testing::MakeSegment;
using testing::StoreBackend;
using testing::StoreHarness;
using testing::TestKey;
using testing::TestModel;

// Spins (yielding, no clock) until `cond` holds or `done` is set; returns cond(). For state that
// another thread reaches without a notification to wait on (Stats()).
template <typename F>
bool SpinUntil(F cond, const std::atomic<bool>& done) {
  while (!cond() && !done.load()) std::this_thread::yield();
  return cond();
}

class StoreBackendsTest : public ::testing::TestWithParam<StoreBackend> {};

TEST_P(StoreBackendsTest, FingerprintMismatchIsFailedPreconditionOnEveryPath) {
  StoreOptions o;
  StoreHarness h(GetParam(), o);
  ASSERT_TRUE(h.Open().ok());
  ASSERT_TRUE(h.store()->Put(MakeSegment(1, 1, TestModel(0))).ok());
  auto got = h.store()->Get(TestKey(1), TestModel(1));
  EXPECT_EQ(got.status().code(), StatusCode::kFailedPrecondition) << got.status().ToString();
  EXPECT_TRUE(h.store()->Get(TestKey(1), TestModel(0)).ok());
  if (h.persistent()) {
    // From disk (fresh host tier after reopen), then promoted.
    ASSERT_TRUE(h.Reopen().ok());
    EXPECT_EQ(h.store()->Get(TestKey(1), TestModel(1)).status().code(), StatusCode::kFailedPrecondition);
    EXPECT_EQ(h.store()->Stats().promotions, 0u);
    EXPECT_TRUE(h.store()->Get(TestKey(1), TestModel(0)).ok());
    EXPECT_EQ(h.store()->Stats().promotions, 1u);
    EXPECT_EQ(h.store()->Get(TestKey(1), TestModel(1)).status().code(), StatusCode::kFailedPrecondition);
  }
}

TEST_P(StoreBackendsTest, InvalidSegmentsRejectedStoreUnchanged) {
  StoreOptions o;
  StoreHarness h(GetParam(), o);
  ASSERT_TRUE(h.Open().ok());
  ASSERT_TRUE(h.store()->Put(MakeSegment(1, 1)).ok());
  ASSERT_TRUE(h.store()->Flush().ok());
  const StoreStats before = h.store()->Stats();

  std::vector<std::shared_ptr<Segment>> bad;
  bad.push_back(MakeSegment(2, 1));
  bad.back()->positions.pop_back();
  bad.push_back(MakeSegment(2, 1));
  bad.back()->payload.reset();
  bad.push_back(MakeSegment(2, 1));
  bad.back()->layout.num_tokens += 1;
  bad.push_back(MakeSegment(2, 1));
  bad.back()->model = Hash128{};
  bad.push_back(MakeSegment(1, 2));  // an existing key: the old version must survive
  bad.back()->key = TestKey(1);
  bad.back()->layout.head_dim = 0;
  for (const auto& s : bad) EXPECT_EQ(h.store()->Put(s).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(h.store()->Put(nullptr).code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(h.store()->Flush().ok());

  const StoreStats after = h.store()->Stats();
  EXPECT_EQ(after.host.segments, before.host.segments);
  EXPECT_EQ(after.host.bytes, before.host.bytes);
  EXPECT_EQ(after.host.puts, before.host.puts);
  EXPECT_FALSE(h.store()->Contains(TestKey(2)));
  auto got = h.store()->Get(TestKey(1), TestModel());
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got.value()->meta.turn, 1);
  EXPECT_EQ(h.store()->List(SegmentFilter{}).size(), 1u);
  if (h.fake_disk()) {
    EXPECT_EQ(h.fake().puts.load(), 1);
  }
}

TEST_P(StoreBackendsTest, PutCopiesSoCallerMayReuseItsBuffer) {
  StoreOptions o;
  StoreHarness h(GetParam(), o);
  ASSERT_TRUE(h.Open().ok());
  auto s = MakeSegment(3, 5);
  ASSERT_TRUE(h.store()->Put(s).ok());
  std::memset(s->payload->data(), 0xAB, s->payload->size());
  auto got = h.store()->Get(TestKey(3), TestModel());
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(CheckSegment(*got.value()), "");
  ASSERT_TRUE(h.store()->Flush().ok());
  if (h.persistent()) {
    ASSERT_TRUE(h.Reopen().ok());
    got = h.store()->Get(TestKey(3), TestModel());
    ASSERT_TRUE(got.ok());
    EXPECT_EQ(CheckSegment(*got.value()), "");
  }
}

TEST_P(StoreBackendsTest, CloseThenEverythingFailsPrecondition) {
  StoreOptions o;
  StoreHarness h(GetParam(), o);
  ASSERT_TRUE(h.Open().ok());
  ASSERT_TRUE(h.store()->Put(MakeSegment(1, 1)).ok());
  ASSERT_TRUE(h.store()->Close().ok());
  EXPECT_TRUE(h.store()->Close().ok());  // idempotent
  EXPECT_EQ(h.store()->Put(MakeSegment(2, 1)).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(h.store()->Get(TestKey(1), TestModel()).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(h.store()->Delete(TestKey(1)).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(h.store()->Flush().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(h.store()->Info(TestKey(1)).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_FALSE(h.store()->Contains(TestKey(1)));
  EXPECT_TRUE(h.store()->List(SegmentFilter{}).empty());
}

TEST_P(StoreBackendsTest, ListMergesTiersAndFilters) {
  StoreOptions o;
  StoreHarness h(GetParam(), o);
  ASSERT_TRUE(h.Open().ok());
  for (uint64_t id = 0; id < 12; ++id) ASSERT_TRUE(h.store()->Put(MakeSegment(id, 1)).ok());
  ASSERT_TRUE(h.store()->Flush().ok());
  if (h.persistent()) {
    ASSERT_TRUE(h.Reopen().ok());  // now only on disk
    for (uint64_t id = 12; id < 16; ++id) ASSERT_TRUE(h.store()->Put(MakeSegment(id, 1)).ok());
    ASSERT_TRUE(h.store()->Get(TestKey(0), TestModel()).ok());  // promoted: in both tiers
    ASSERT_TRUE(h.store()->Delete(TestKey(1)).ok());
  } else {
    for (uint64_t id = 12; id < 16; ++id) ASSERT_TRUE(h.store()->Put(MakeSegment(id, 1)).ok());
    ASSERT_TRUE(h.store()->Delete(TestKey(1)).ok());
  }
  EXPECT_EQ(h.store()->List(SegmentFilter{}).size(), 15u);
  SegmentFilter f;
  f.session = "s" + std::to_string(TestKey(0).lo % 4);
  size_t expect = 0;
  for (uint64_t id = 0; id < 16; ++id)
    if (id != 1 && TestKey(id).lo % 4 == TestKey(0).lo % 4) ++expect;
  std::vector<SegmentInfo> some = h.store()->List(f);
  EXPECT_EQ(some.size(), expect);
  for (const SegmentInfo& i : some) EXPECT_EQ(i.meta.session, f.session);
  f.model = TestModel(9);
  EXPECT_TRUE(h.store()->List(f).empty());
}

INSTANTIATE_TEST_SUITE_P(Backends, StoreBackendsTest, ::testing::ValuesIn(testing::AllBackends()),
                         [](const auto& info) { return std::string(testing::BackendName(info.param)); });

TEST(StoreHostOnlyTest, EvictionSkipsHandlesInUseAndFullTierIsResourceExhausted) {
  const uint64_t charge = HostTier::ChargeOf(*MakeSegment(TestKey(0), 1, SegmentLayout{2, 2, 8, 32, DType::kF16}));
  StoreOptions o;
  o.host_capacity_bytes = charge * 3;
  StoreHarness h(StoreBackend::kHostOnly, o);
  ASSERT_TRUE(h.Open().ok());
  auto seg = [](uint64_t id) { return MakeSegment(TestKey(id), 1, SegmentLayout{2, 2, 8, 32, DType::kF16}); };
  std::vector<SegmentHandle> held;
  for (uint64_t id = 0; id < 3; ++id) {
    ASSERT_TRUE(h.store()->Put(seg(id)).ok());
    auto got = h.store()->Get(TestKey(id), TestModel());
    ASSERT_TRUE(got.ok());
    held.push_back(got.value());
  }
  const StoreStats before = h.store()->Stats();
  EXPECT_EQ(h.store()->Put(seg(3)).code(), StatusCode::kResourceExhausted);
  const StoreStats after = h.store()->Stats();
  EXPECT_EQ(after.host.bytes, before.host.bytes);
  EXPECT_EQ(after.host.evictions, 0u);
  for (const SegmentHandle& s : held) EXPECT_EQ(CheckSegment(*s), "");
  held.pop_back();  // release key 2: it becomes the only evictable entry
  ASSERT_TRUE(h.store()->Put(seg(3)).ok());
  EXPECT_FALSE(h.store()->Contains(TestKey(2)));
  EXPECT_TRUE(h.store()->Contains(TestKey(0)));
  EXPECT_EQ(h.store()->Stats().host.evictions, 1u);
  for (const SegmentHandle& s : held) EXPECT_EQ(CheckSegment(*s), "");
  EXPECT_EQ(h.store()->Verify(nullptr).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(h.store()->Compact(nullptr).status().code(), StatusCode::kFailedPrecondition);
}

TEST(StoreWriteBehindTest, PutBlocksWhenQueueIsFullAndFlushDrains) {
  StoreOptions o;
  o.write_queue_limit = 3;
  StoreHarness h(StoreBackend::kFakeDisk, o);
  ASSERT_TRUE(h.Open().ok());
  h.fake().gate_closed = true;
  // One write is taken by the writer (blocked at the gate), three wait in the queue.
  ASSERT_TRUE(h.store()->Put(MakeSegment(0, 1)).ok());
  h.fake().WaitForWaiting(1);
  for (uint64_t id = 1; id < 4; ++id) ASSERT_TRUE(h.store()->Put(MakeSegment(id, 1)).ok());
  EXPECT_EQ(h.store()->Stats().write_queue_depth, 3u);

  std::atomic<bool> done{false};
  std::thread blocked([&] {
    EXPECT_TRUE(h.store()->Put(MakeSegment(4, 1)).ok());
    done = true;
  });
  // The fifth Put waits for a queue slot (and only that: it has not returned).
  EXPECT_TRUE(SpinUntil([&] { return h.store()->Stats().blocked_puts == 1; }, done))
      << "Put did not block on a full write-behind queue";
  EXPECT_FALSE(done.load());
  // Reads are not blocked by back-pressure, including of queued segments.
  auto got = h.store()->Get(TestKey(2), TestModel());
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(CheckSegment(*got.value()), "");
  h.fake().OpenGate();
  blocked.join();
  EXPECT_TRUE(done.load());
  ASSERT_TRUE(h.store()->Flush().ok());
  EXPECT_EQ(h.store()->Stats().write_queue_depth, 0u);
  EXPECT_EQ(h.fake().records.size(), 5u);
  EXPECT_GE(h.fake().syncs.load(), 1);
}

TEST(StoreWriteBehindTest, SlowDiskThrottlesPutsToDiskSpeed) {
  StoreOptions o;
  o.write_queue_limit = 2;
  StoreHarness h(StoreBackend::kFakeDisk, o);
  ASSERT_TRUE(h.Open().ok());
  // The disk writes one record per permit; Puts may run ahead of it by at most the queue (2) and
  // what the writer has taken (the fake tier writes in SubmitBatch, so one batch is being written
  // and the next waits for it: 2).
  h.fake().gate_closed = true;
  constexpr int kPuts = 10;
  std::atomic<int> returned{0};
  std::atomic<bool> done{false};
  std::thread putter([&] {
    for (uint64_t id = 0; id < kPuts; ++id) {
      EXPECT_TRUE(h.store()->Put(MakeSegment(id, 1)).ok());
      ++returned;
    }
    done = true;
  });
  int blocked = 0;
  while (!done.load()) {
    if (!SpinUntil([&] { return h.store()->Stats().blocked_puts == 1; }, done)) break;
    ++blocked;
    const int acknowledged = returned.load();  // before the writes: both only grow
    const int written = h.fake().puts.load();
    EXPECT_LE(acknowledged - written, 4) << "Puts ran ahead of the disk";
    EXPECT_LE(h.store()->Stats().write_queue_depth, 2u);
    h.fake().Permit(1);
  }
  putter.join();
  EXPECT_GE(blocked, 1) << "no Put ever waited for the disk";
  EXPECT_GE(h.fake().puts.load(), kPuts - 4);
  h.fake().OpenGate();
  ASSERT_TRUE(h.store()->Flush().ok());
  EXPECT_EQ(h.fake().puts.load(), kPuts);
}

TEST(StoreWriteBehindTest, QueuedSegmentIsReadableBeforeItReachesDisk) {
  StoreOptions o;
  o.host_capacity_bytes = 64;  // too small for any segment: only the queue holds it
  StoreHarness h(StoreBackend::kFakeDisk, o);
  ASSERT_TRUE(h.Open().ok());
  h.fake().gate_closed = true;
  ASSERT_TRUE(h.store()->Put(MakeSegment(9, 4)).ok());
  EXPECT_EQ(h.store()->Stats().host.segments, 0u);
  EXPECT_TRUE(h.store()->Contains(TestKey(9)));
  auto info = h.store()->Info(TestKey(9));
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->meta.turn, 4);
  auto got = h.store()->Get(TestKey(9), TestModel());
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got.value()->meta.turn, 4);
  EXPECT_EQ(h.store()->Get(TestKey(9), TestModel(3)).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(h.store()->List(SegmentFilter{}).size(), 1u);
  h.fake().OpenGate();
  ASSERT_TRUE(h.store()->Flush().ok());
  EXPECT_TRUE(h.store()->Get(TestKey(9), TestModel()).ok());
}

TEST(StoreWriteBehindTest, DeleteCancelsQueuedWriteAndOlderDiskCopy) {
  StoreOptions o;
  StoreHarness h(StoreBackend::kFakeDisk, o);
  ASSERT_TRUE(h.Open().ok());
  ASSERT_TRUE(h.store()->Put(MakeSegment(1, 1)).ok());
  ASSERT_TRUE(h.store()->Flush().ok());  // version 1 on disk
  h.fake().gate_closed = true;
  ASSERT_TRUE(h.store()->Put(MakeSegment(2, 1)).ok());  // taken by the writer, waits at the gate
  h.fake().WaitForWaiting(1);
  ASSERT_TRUE(h.store()->Put(MakeSegment(1, 2)).ok());  // queued behind it
  ASSERT_TRUE(h.store()->Delete(TestKey(1)).ok());
  EXPECT_FALSE(h.store()->Contains(TestKey(1)));
  EXPECT_EQ(h.store()->Get(TestKey(1), TestModel()).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(h.store()->Delete(TestKey(1)).code(), StatusCode::kNotFound);
  h.fake().OpenGate();
  ASSERT_TRUE(h.store()->Flush().ok());
  EXPECT_EQ(h.fake().puts.load(), 2);  // version 1 and key 2; the queued version 2 was skipped
  ASSERT_TRUE(h.Reopen().ok());
  EXPECT_EQ(h.store()->Get(TestKey(1), TestModel()).status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(h.store()->Get(TestKey(2), TestModel()).ok());
}

TEST(StoreWriteBehindTest, LastWriterWinsThroughTheQueue) {
  StoreOptions o;
  StoreHarness h(StoreBackend::kFakeDisk, o);
  ASSERT_TRUE(h.Open().ok());
  h.fake().gate_closed = true;
  for (int64_t v = 1; v <= 5; ++v) ASSERT_TRUE(h.store()->Put(MakeSegment(7, v)).ok());
  ASSERT_TRUE(h.store()->Delete(TestKey(7)).ok());
  ASSERT_TRUE(h.store()->Put(MakeSegment(7, 6)).ok());
  h.fake().OpenGate();
  ASSERT_TRUE(h.Reopen().ok());  // Close drains the queue
  auto got = h.store()->Get(TestKey(7), TestModel());
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got.value()->meta.turn, 6);
}

TEST(StoreWriteBehindTest, WriteErrorsAreCountedSurfacedAndRetried) {
  StoreOptions o;
  o.write_queue_limit = 4;
  StoreHarness h(StoreBackend::kFakeDisk, o);
  ASSERT_TRUE(h.Open().ok());
  h.fake().fail_writes = true;
  ASSERT_TRUE(h.store()->Put(MakeSegment(1, 1)).ok());  // acknowledged into memory
  Status f = h.store()->Flush();
  EXPECT_EQ(f.code(), StatusCode::kUnavailable) << f.ToString();
  EXPECT_NE(f.message().find("injected write failure"), std::string::npos) << f.ToString();
  StoreStats st = h.store()->Stats();
  EXPECT_GE(st.write_errors, 1u);
  EXPECT_EQ(st.write_queue_depth, 1u);
  // Still served from memory and listed.
  auto got = h.store()->Get(TestKey(1), TestModel());
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(CheckSegment(*got.value()), "");
  EXPECT_EQ(h.store()->List(SegmentFilter{}).size(), 1u);

  // Failed writes fill the queue: Put reports the error instead of blocking forever.
  for (uint64_t id = 2; id <= 3; ++id) ASSERT_TRUE(h.store()->Put(MakeSegment(id, 1)).ok());
  size_t acked = 3;
  Status full;
  for (uint64_t id = 4; id < 10 && full.ok(); ++id) {
    full = h.store()->Put(MakeSegment(id, 1));
    if (full.ok()) ++acked;
  }
  EXPECT_EQ(full.code(), StatusCode::kUnavailable) << full.ToString();

  // The disk recovers: the next Flush writes everything that was acknowledged.
  h.fake().fail_writes = false;
  ASSERT_TRUE(h.store()->Flush().ok());
  EXPECT_EQ(h.store()->Stats().write_queue_depth, 0u);
  EXPECT_EQ(h.fake().records.size(), acked);
  ASSERT_TRUE(h.Reopen().ok());
  EXPECT_EQ(h.store()->List(SegmentFilter{}).size(), acked);
}

TEST(StoreWriteBehindTest, CloseReportsWritesThatNeverReachedDisk) {
  StoreOptions o;
  StoreHarness h(StoreBackend::kFakeDisk, o);
  ASSERT_TRUE(h.Open().ok());
  h.fake().fail_writes = true;
  ASSERT_TRUE(h.store()->Put(MakeSegment(1, 1)).ok());
  Status c = h.store()->Close();
  EXPECT_EQ(c.code(), StatusCode::kUnavailable) << c.ToString();
}

TEST(StoreWriteThroughTest, DiskErrorFailsThePutAndLeavesStoreUnchanged) {
  StoreOptions o;
  o.write_behind = false;
  StoreHarness h(StoreBackend::kFakeDisk, o);
  ASSERT_TRUE(h.Open().ok());
  ASSERT_TRUE(h.store()->Put(MakeSegment(1, 1)).ok());
  EXPECT_EQ(h.fake().puts.load(), 1);  // on disk when Put returns
  h.fake().fail_writes = true;
  EXPECT_EQ(h.store()->Put(MakeSegment(1, 2)).code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(h.store()->Put(MakeSegment(2, 1)).code(), StatusCode::kResourceExhausted);
  EXPECT_FALSE(h.store()->Contains(TestKey(2)));
  EXPECT_EQ(h.store()->Get(TestKey(1), TestModel()).value()->meta.turn, 1);
  EXPECT_EQ(h.store()->Delete(TestKey(1)).code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(h.store()->Contains(TestKey(1)));
  EXPECT_EQ(h.store()->Stats().write_errors, 0u);
}

TEST(StoreTieredTest, PromotionOnDiskHitThenHostHit) {
  StoreOptions o;
  StoreHarness h(StoreBackend::kFakeDisk, o);
  ASSERT_TRUE(h.Open().ok());
  for (uint64_t id = 0; id < 4; ++id) ASSERT_TRUE(h.store()->Put(MakeSegment(id, 1)).ok());
  ASSERT_TRUE(h.Reopen().ok());
  EXPECT_EQ(h.store()->Stats().host.segments, 0u);
  auto got = h.store()->Get(TestKey(2), TestModel());
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(CheckSegment(*got.value()), "");
  StoreStats st = h.store()->Stats();
  EXPECT_EQ(st.promotions, 1u);
  EXPECT_EQ(st.host.segments, 1u);
  EXPECT_EQ(st.host.misses, 1u);
  ASSERT_TRUE(h.store()->Get(TestKey(2), TestModel()).ok());
  st = h.store()->Stats();
  EXPECT_EQ(st.host.hits, 1u);
  EXPECT_EQ(st.promotions, 1u);
  EXPECT_TRUE(st.has_disk);
  EXPECT_EQ(st.disk.segments, 4u);
  EXPECT_EQ(h.store()->Get(TestKey(99), TestModel()).status().code(), StatusCode::kNotFound);
}

}  // namespace
}  // namespace kvagent
