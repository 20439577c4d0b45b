#include "kvagent/host_tier.h"

#include <gtest/gtest.h>

#include <set>
#include <vector>

#include "store/store_test_util.h"

namespace kvagent {
namespace {

using testing::CheckSegment;
using testing::LayoutFor;
using testing::MakeSegment;
using testing::TestKey;

// A segment of exactly `payload` bytes of payload (f32, 1 layer, 1 head, dim 1 => 8 bytes/token).
std::shared_ptr<Segment> SizedSegment(uint64_t id, int tokens, int64_t version = 1) {
  SegmentLayout l{1, 1, 1, tokens, DType::kF32};
  return MakeSegment(TestKey(id), version, l);
}

TEST(HostTierTest, PutCopiesPayloadAndGetReturnsIt) {
  HostTier tier(0);
  auto s = MakeSegment(7, 3);
  auto stored = tier.Put(*s);
  ASSERT_TRUE(stored.ok()) << stored.status().ToString();
  EXPECT_NE(stored.value()->payload->data(), s->payload->data());
  // The caller may scribble over its buffer after Put.
  std::memset(s->payload->data(), 0, s->payload->size());
  SegmentHandle h = tier.Get(TestKey(7));
  ASSERT_NE(h, nullptr);
  EXPECT_EQ(CheckSegment(*h), "");
  EXPECT_EQ(tier.Get(TestKey(8)), nullptr);
  TierStats st = tier.Stats();
  EXPECT_EQ(st.hits, 1u);
  EXPECT_EQ(st.misses, 1u);
  EXPECT_EQ(st.puts, 1u);
  EXPECT_EQ(st.segments, 1u);
  EXPECT_EQ(st.bytes, HostTier::ChargeOf(*s));
}

TEST(HostTierTest, InvalidSegmentRejectedTierUnchanged) {
  HostTier tier(0);
  ASSERT_TRUE(tier.Put(*MakeSegment(1, 1)).ok());
  const TierStats before = tier.Stats();
  auto bad = MakeSegment(2, 1);
  bad->tokens.pop_back();
  EXPECT_EQ(tier.Put(*bad).status().code(), StatusCode::kInvalidArgument);
  auto no_payload = MakeSegment(3, 1);
  no_payload->payload.reset();
  EXPECT_EQ(tier.Put(*no_payload).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(tier.Adopt(nullptr).code(), StatusCode::kInvalidArgument);
  const TierStats after = tier.Stats();
  EXPECT_EQ(after.segments, before.segments);
  EXPECT_EQ(after.bytes, before.bytes);
  EXPECT_FALSE(tier.Contains(TestKey(2)));
}

TEST(HostTierTest, EvictsLeastRecentlyUsedWithinCapacity) {
  // Each segment: 10 tokens * 8 B payload + 10 * 4 token ids + 10 * 8 positions + strings.
  const uint64_t charge = HostTier::ChargeOf(*SizedSegment(0, 10));
  HostTier tier(charge * 3);
  for (uint64_t id = 0; id < 3; ++id) ASSERT_TRUE(tier.Put(*SizedSegment(id, 10)).ok());
  ASSERT_NE(tier.Get(TestKey(0)), nullptr);  // order now (MRU first): 0, 2, 1
  ASSERT_TRUE(tier.Put(*SizedSegment(3, 10)).ok());
  EXPECT_FALSE(tier.Contains(TestKey(1)));
  EXPECT_TRUE(tier.Contains(TestKey(0)));
  EXPECT_TRUE(tier.Contains(TestKey(2)));
  EXPECT_TRUE(tier.Contains(TestKey(3)));
  TierStats st = tier.Stats();
  EXPECT_EQ(st.evictions, 1u);
  EXPECT_EQ(st.bytes, charge * 3);
  EXPECT_LE(st.bytes, st.capacity_bytes);
}

TEST(HostTierTest, OversizedSegmentIsResourceExhausted) {
  const uint64_t charge = HostTier::ChargeOf(*SizedSegment(0, 10));
  HostTier tier(charge);
  ASSERT_TRUE(tier.Put(*SizedSegment(0, 10)).ok());
  EXPECT_EQ(tier.Put(*SizedSegment(1, 11)).status().code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(tier.Contains(TestKey(0)));
  EXPECT_EQ(tier.Stats().evictions, 0u);
}

TEST(HostTierTest, EvictionNeverFreesAnInUseHandle) {
  const uint64_t charge = HostTier::ChargeOf(*SizedSegment(0, 64));
  HostTier tier(charge * 4);
  std::vector<SegmentHandle> held;
  for (uint64_t id = 0; id < 4; ++id) {
    ASSERT_TRUE(tier.Put(*SizedSegment(id, 64)).ok());
    if (id % 2 == 0) held.push_back(tier.Get(TestKey(id)));  // 0 and 2 in use
  }
  // Overflow the tier many times: only 1 and 3 (and newcomers) may go.
  for (uint64_t id = 4; id < 40; ++id) {
    ASSERT_TRUE(tier.Put(*SizedSegment(id, 64)).ok());
    TierStats st = tier.Stats();
    ASSERT_LE(st.bytes, st.capacity_bytes);
    ASSERT_TRUE(tier.Contains(TestKey(0)));
    ASSERT_TRUE(tier.Contains(TestKey(2)));
  }
  for (const SegmentHandle& h : held) EXPECT_EQ(CheckSegment(*h), "");
  // With both remaining slots in use as well, nothing can be evicted: the Put fails cleanly.
  held.push_back(tier.Get(TestKey(38)));
  held.push_back(tier.Get(TestKey(39)));
  const TierStats before = tier.Stats();
  EXPECT_EQ(tier.Put(*SizedSegment(99, 64)).status().code(), StatusCode::kResourceExhausted);
  const TierStats after = tier.Stats();
  EXPECT_EQ(after.bytes, before.bytes);
  EXPECT_EQ(after.segments, before.segments);
  EXPECT_EQ(after.evictions, before.evictions);
  // Released handles become evictable again.
  held.clear();
  EXPECT_TRUE(tier.Put(*SizedSegment(99, 64)).ok());
}

TEST(HostTierTest, EraseAndReplaceUnlinkButHandlesStayValid) {
  HostTier tier(0);
  ASSERT_TRUE(tier.Put(*MakeSegment(5, 1)).ok());
  SegmentHandle v1 = tier.Get(TestKey(5));
  ASSERT_TRUE(tier.Put(*MakeSegment(5, 2)).ok());
  EXPECT_EQ(tier.Stats().segments, 1u);
  EXPECT_EQ(tier.Stats().bytes, HostTier::ChargeOf(*MakeSegment(5, 2)));
  EXPECT_EQ(tier.Get(TestKey(5))->meta.turn, 2);
  EXPECT_TRUE(tier.Erase(TestKey(5)));
  EXPECT_FALSE(tier.Erase(TestKey(5)));
  EXPECT_EQ(tier.Stats().bytes, 0u);
  EXPECT_EQ(v1->meta.turn, 1);
  EXPECT_EQ(CheckSegment(*v1), "");
}

TEST(HostTierTest, ReplacingAKeyMayUseItsOwnSpace) {
  const uint64_t charge = HostTier::ChargeOf(*SizedSegment(0, 10));
  HostTier tier(charge);
  ASSERT_TRUE(tier.Put(*SizedSegment(0, 10, 1)).ok());
  SegmentHandle old = tier.Get(TestKey(0));  // in use: still replaceable (unlinked)
  ASSERT_TRUE(tier.Put(*SizedSegment(0, 10, 2)).ok());
  EXPECT_EQ(tier.Get(TestKey(0))->meta.turn, 2);
  EXPECT_EQ(old->meta.turn, 1);
  EXPECT_EQ(tier.Stats().bytes, charge);
}

TEST(HostTierTest, AwkwardLayoutsRoundTripAndAccountingMatches) {
  HostTier tier(0);
  uint64_t expected = 0;
  for (uint64_t id = 0; id < 90; ++id) {
    auto s = MakeSegment(id, static_cast<int64_t>(id));
    expected += HostTier::ChargeOf(*s);
    ASSERT_TRUE(tier.Put(*s).ok());
  }
  EXPECT_EQ(tier.Stats().bytes, expected);
  std::vector<SegmentHandle> all = tier.Snapshot();
  ASSERT_EQ(all.size(), 90u);
  EXPECT_EQ(all.front()->key, TestKey(89));  // most recently used first
  for (const SegmentHandle& h : all) EXPECT_EQ(CheckSegment(*h), "");
  tier.Clear();
  EXPECT_EQ(tier.Stats().bytes, 0u);
  EXPECT_EQ(tier.Stats().segments, 0u);
}

TEST(HostTierTest, LargePayloadBuffersAreRecycledWithinThePoolLimit) {
  // 16384 tokens * 8 B = 128 KiB payloads: pooled. Capacity for 8, so the pool may keep one.
  const uint64_t charge = HostTier::ChargeOf(*SizedSegment(0, 16384));
  HostTier tier(charge * 8);
  ASSERT_GE(HostTier::PoolLimit(charge * 8), 128u << 10);
  std::set<const std::byte*> seen;
  int reused = 0;
  for (uint64_t id = 0; id < 64; ++id) {
    auto stored = tier.Put(*SizedSegment(id, 16384, static_cast<int64_t>(id)));
    ASSERT_TRUE(stored.ok());
    if (!seen.insert(stored.value()->payload->data()).second) ++reused;
    ASSERT_EQ(CheckSegment(*stored.value()), "");  // a recycled buffer is fully overwritten
    ASSERT_LE(tier.pooled_bytes(), HostTier::PoolLimit(charge * 8));
  }
  EXPECT_GT(reused, 40);
  for (const SegmentHandle& h : tier.Snapshot()) EXPECT_EQ(CheckSegment(*h), "");
  // Buffers outlive the tier (their pool is reached through a weak pointer).
  SegmentHandle survivor = tier.Get(TestKey(63));
  {
    HostTier gone(0);
    ASSERT_TRUE(gone.Put(*SizedSegment(1, 16384)).ok());
  }
  EXPECT_EQ(CheckSegment(*survivor), "");
}

}  // namespace
}  // namespace kvagent
