#include "kvagent/planner.h"

#include <gtest/gtest.h>

#include <random>

namespace kvagent {
namespace {

PlanInput In(int id, int tokens, double score = 0, int64_t order = 0) {
  return PlanInput{HashString("seg" + std::to_string(id)), tokens, score, order};
}

TEST(Planner, ContiguousPositionsInOriginalOrder) {
  auto plan = MakePlan({In(0, 10)}, {In(3, 7, 0.9, 30), In(1, 5, 0.1, 10), In(2, 6, 0.5, 20)}, {In(9, 4, 0, 90)}, 3, {});
  ASSERT_TRUE(plan.ok());
  const auto& s = plan->segments;
  ASSERT_EQ(s.size(), 5u);
  EXPECT_EQ(s[0].part, PlanPart::kPrefix);
  EXPECT_EQ(s[1].key, HashString("seg1"));  // order 10 first, whatever the score
  EXPECT_EQ(s[2].key, HashString("seg2"));
  EXPECT_EQ(s[3].key, HashString("seg3"));
  EXPECT_EQ(s[4].part, PlanPart::kRecent);
  int64_t pos = 0;
  for (const auto& seg : s) {
    EXPECT_EQ(seg.position, pos);
    EXPECT_EQ(seg.slot, pos);
    pos += seg.num_tokens;
  }
  EXPECT_EQ(plan->new_tokens_position, pos);
  EXPECT_EQ(plan->total_positions, pos + 3);
  EXPECT_EQ(plan->reused_tokens, 32);
  EXPECT_EQ(plan->recomputed_tokens, 3);
}

TEST(Planner, SinkRepairOnlyOnRetrieved) {
  PlanOptions o;
  o.sink_repair_tokens = 4;
  auto plan = MakePlan({In(0, 10)}, {In(1, 3, 1, 1), In(2, 8, 1, 2)}, {In(3, 5, 0, 3)}, 2, o);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->segments[0].recompute_tokens, 0);
  EXPECT_EQ(plan->segments[1].recompute_tokens, 3);  // shorter than the repair window
  EXPECT_EQ(plan->segments[2].recompute_tokens, 4);
  EXPECT_EQ(plan->segments[3].recompute_tokens, 0);
  EXPECT_EQ(plan->recomputed_tokens, 3 + 4 + 2);
  EXPECT_EQ(plan->reused_tokens, 10 + 0 + 4 + 5);
}

TEST(Planner, PageAlignedSlotsKeepPositionsContiguous) {
  PlanOptions o;
  o.page_size = 16;
  auto plan = MakePlan({In(0, 10)}, {In(1, 17, 1, 1)}, {}, 5, o);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->segments[1].position, 10);
  EXPECT_EQ(plan->segments[1].slot, 16);
  EXPECT_EQ(plan->new_tokens_position, 27);
  EXPECT_EQ(plan->new_tokens_slot, 48);
  EXPECT_EQ(plan->total_slots, 53);
  for (const auto& s : plan->segments) EXPECT_EQ(s.slot % 16, 0);
}

TEST(Planner, MaxContextDropsLowestScores) {
  PlanOptions o;
  o.max_context = 10 + 12 + 2;
  auto plan = MakePlan({In(0, 10)}, {In(1, 6, 0.9, 1), In(2, 6, 0.1, 2), In(3, 6, 0.5, 3)}, {}, 2, o);
  ASSERT_TRUE(plan.ok());
  ASSERT_EQ(plan->segments.size(), 3u);
  EXPECT_EQ(plan->segments[1].key, HashString("seg1"));
  EXPECT_EQ(plan->segments[2].key, HashString("seg3"));
  ASSERT_EQ(plan->dropped.size(), 1u);
  EXPECT_EQ(plan->dropped[0], HashString("seg2"));
  EXPECT_LE(plan->total_positions, o.max_context);
}

TEST(Planner, Errors) {
  PlanOptions o;
  o.max_context = 5;
  EXPECT_EQ(MakePlan({In(0, 10)}, {}, {}, 1, o).status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(MakePlan({In(0, 0)}, {}, {}, 1, {}).status().code(), StatusCode::kInvalidArgument);
  PlanOptions bad;
  bad.page_size = 0;
  EXPECT_EQ(MakePlan({}, {}, {}, 1, bad).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(MakePlan({}, {}, {}, -1, {}).status().code(), StatusCode::kInvalidArgument);
}

TEST(Planner, RandomPlansAreConsistent) {
  std::mt19937 rng(3);
  for (int iter = 0; iter < 500; ++iter) {
    std::vector<PlanInput> pre, ret, rec;
    int id = 0;
    for (int i = rng() % 3; i > 0; --i) pre.push_back(In(id++, 1 + rng() % 20));
    for (int i = rng() % 10; i > 0; --i) ret.push_back(In(id++, 1 + rng() % 50, (rng() % 100) / 100.0, rng() % 1000));
    for (int i = rng() % 3; i > 0; --i) rec.push_back(In(id++, 1 + rng() % 20, 0, rng() % 1000));
    PlanOptions o;
    o.page_size = 1 + rng() % 32;
    o.sink_repair_tokens = rng() % 8;
    int n = rng() % 40;
    o.max_context = (rng() % 2) ? 0 : 60 + rng() % 300;
    auto plan = MakePlan(pre, ret, rec, n, o);
    if (!plan.ok()) {
      EXPECT_EQ(plan.status().code(), StatusCode::kResourceExhausted);
      continue;
    }
    int64_t pos = 0, last_slot_end = 0;
    for (const auto& s : plan->segments) {
      EXPECT_EQ(s.position, pos);
      EXPECT_GE(s.slot, last_slot_end);
      EXPECT_EQ(s.slot % o.page_size, 0);
      pos += s.num_tokens;
      last_slot_end = s.slot + s.num_tokens;
    }
    EXPECT_EQ(plan->total_positions, pos + n);
    if (o.max_context > 0) EXPECT_LE(plan->total_positions, o.max_context);
    EXPECT_EQ(plan->reused_tokens + plan->recomputed_tokens, plan->total_positions);
    EXPECT_EQ(plan->segments.size() + plan->dropped.size(), pre.size() + ret.size() + rec.size());
  }
}

}  // namespace
}  // namespace kvagent
