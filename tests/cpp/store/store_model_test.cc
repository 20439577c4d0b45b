// Random operation sequences against a std::map model, over host-only and tiered stores.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <map>
#include <random>
#include <string>

#include "kvagent/host_tier.h"
#include "kvagent/store.h"
#include "store/store_test_fixture.h"
#include "store/store_test_util.h"

namespace kvagent {
namespace {

using testing::CheckSegment;
using testing::LayoutFor;
using testing::MakeSegment;
using testing::StoreBackend;
using testing::StoreHarness;
using testing::TestKey;
using testing::TestModel;

constexpr uint64_t kKeys = 48;

struct ModelCase {
  StoreBackend backend;
  bool write_behind;
  bool bounded_host;  // host tier holds only a few segments (evictions)
  uint32_t seed;
  int steps;
};

std::string CaseName(const ::testing::TestParamInfo<ModelCase>& info) {
  const ModelCase& c = info.param;
  return std::string(testing::BackendName(c.backend)) + (c.write_behind ? "_behind" : "_through") +
         (c.bounded_host ? "_small" : "_big") + "_seed" + std::to_string(c.seed);
}

class StoreModelTest : public ::testing::TestWithParam<ModelCase> {};

TEST_P(StoreModelTest, RandomOperationsMatchMapModel) {
  const ModelCase& c = GetParam();
  StoreOptions options;
  options.write_behind = c.write_behind;
  options.write_queue_limit = 8;
  options.sync = false;  // durability is exercised by the disk tier's own crash tests
  // All 48 test segments together take about 37 KB, the largest 7 KB: 12 KiB forces evictions.
  options.host_capacity_bytes = c.bounded_host ? 12 << 10 : 64 << 20;
  StoreHarness harness(c.backend, options);
  ASSERT_TRUE(harness.Open().ok());

  // Host-only with a bounded tier loses evicted segments: the model is then an upper bound.
  const bool lossy = c.backend == StoreBackend::kHostOnly && c.bounded_host;
  std::map<uint64_t, int64_t> model;  // id -> version
  std::mt19937 rng(c.seed);
  int64_t next_version = 1;
  int found_after_put = 0;
  uint64_t evictions = 0;  // summed over reopens (stats restart with each store)

  for (int step = 0; step < c.steps; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    Store* store = harness.store();
    const uint64_t id = rng() % kKeys;
    const Hash128 key = TestKey(id);
    const uint32_t op = rng() % 100;
    if (op < 35) {
      const int64_t v = next_version++;
      ASSERT_TRUE(store->Put(MakeSegment(id, v)).ok());
      model[id] = v;
    } else if (op < 70) {
      auto got = store->Get(key, TestModel());
      auto it = model.find(id);
      if (it == model.end()) {
        ASSERT_EQ(got.status().code(), StatusCode::kNotFound) << got.status().ToString();
      } else if (got.ok()) {
        ASSERT_EQ(got.value()->meta.turn, it->second);
        ASSERT_EQ(CheckSegment(*got.value()), "");
        ++found_after_put;
      } else {
        ASSERT_TRUE(lossy) << got.status().ToString();
        ASSERT_EQ(got.status().code(), StatusCode::kNotFound);
      }
    } else if (op < 82) {
      Status s = store->Delete(key);
      if (model.erase(id) != 0) {
        if (!lossy) {
          ASSERT_TRUE(s.ok()) << s.ToString();
        }
      } else {
        ASSERT_EQ(s.code(), StatusCode::kNotFound) << s.ToString();
      }
    } else if (op < 88) {
      auto info = store->Info(key);
      const bool has = store->Contains(key);
      auto it = model.find(id);
      if (it == model.end()) {
        ASSERT_FALSE(has);
        ASSERT_EQ(info.status().code(), StatusCode::kNotFound);
      } else if (info.ok()) {
        ASSERT_EQ(info->meta.turn, it->second);
        ASSERT_EQ(info->layout, LayoutFor(id));
      } else {
        ASSERT_TRUE(lossy);
      }
    } else if (op < 92) {
      ASSERT_TRUE(store->Flush().ok());
    } else if (op < 96) {
      // List must be exactly the model (or a subset when the host tier may drop segments).
      std::vector<SegmentInfo> all = store->List(SegmentFilter{});
      std::map<uint64_t, int64_t> listed;
      for (const SegmentInfo& i : all) {
        uint64_t found_id = kKeys;
        for (uint64_t k = 0; k < kKeys; ++k)
          if (TestKey(k) == i.key) found_id = k;
        ASSERT_LT(found_id, kKeys);
        listed[found_id] = i.meta.turn;
      }
      if (!lossy) {
        ASSERT_EQ(listed, model);
      } else {
        for (const auto& [k, v] : listed) ASSERT_EQ(model.at(k), v);
      }
    } else if (harness.persistent()) {
      evictions += store->Stats().host.evictions;
      ASSERT_TRUE(harness.Reopen().ok());
    } else {
      // Evict by pressure: a burst of puts of fresh versions.
      for (int i = 0; i < 4; ++i) {
        const uint64_t burst = rng() % kKeys;
        const int64_t v = next_version++;
        ASSERT_TRUE(harness.store()->Put(MakeSegment(burst, v)).ok());
        model[burst] = v;
      }
    }
    StoreStats st = harness.store()->Stats();
    ASSERT_LE(st.host.bytes, options.host_capacity_bytes);
    ASSERT_LE(st.write_queue_depth, options.write_queue_limit);
    ASSERT_EQ(st.write_errors, 0u);
  }
  EXPECT_GT(found_after_put, c.steps / 20);
  evictions += harness.store()->Stats().host.evictions;
  if (c.bounded_host) {
    EXPECT_GT(evictions, 0u);
  }
  // Everything written survives a final close and reopen.
  if (harness.persistent()) {
    ASSERT_TRUE(harness.Reopen().ok());
    for (uint64_t id = 0; id < kKeys; ++id) {
      auto got = harness.store()->Get(TestKey(id), TestModel());
      auto it = model.find(id);
      if (it == model.end()) {
        EXPECT_EQ(got.status().code(), StatusCode::kNotFound) << id;
      } else {
        ASSERT_TRUE(got.ok()) << id << " " << got.status().ToString();
        EXPECT_EQ(got.value()->meta.turn, it->second);
      }
    }
  }
  ASSERT_TRUE(harness.store()->Close().ok());
}

std::vector<ModelCase> AllCases() {
  std::vector<ModelCase> cases;
  for (StoreBackend b : testing::AllBackends()) {
    for (bool behind : {true, false}) {
      if (b == StoreBackend::kHostOnly && !behind) continue;  // no disk: nothing to write through
      for (bool small : {false, true}) {
        for (uint32_t seed : {1u, 2u, 3u}) {
          if (b == StoreBackend::kPosixDisk && seed == 3) continue;  // keeps the executable well under 60 s
          cases.push_back({b, behind, small, seed, testing::StepsFor(b)});
        }
      }
    }
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Seeds, StoreModelTest, ::testing::ValuesIn(AllCases()), CaseName);

}  // namespace
}  // namespace kvagent
