// 8 threads of mixed operations on overlapping keys (run under TSan by the CI's thread job).
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kvagent/store.h"
#include "store/store_test_fixture.h"
#include "store/store_test_util.h"

namespace kvagent {
namespace {

using testing::CheckSegment;
using testing::MakeSegment;
using testing::StoreBackend;
using testing::StoreHarness;
using testing::TestKey;
using testing::TestModel;

constexpr int kThreads = 8;
constexpr uint64_t kKeys = 40;

// Version of key `id` right now: -1 if absent.
int64_t Snapshot(Store* store, uint64_t id) {
  auto got = store->Get(TestKey(id), TestModel());
  if (!got.ok()) {
    EXPECT_EQ(got.status().code(), StatusCode::kNotFound) << got.status().ToString();
    return -1;
  }
  EXPECT_EQ(CheckSegment(*got.value()), "");
  return got.value()->meta.turn;
}

void RunMixed(StoreBackend backend, bool write_behind, uint64_t host_capacity, int ops_per_thread) {
  StoreOptions o;
  o.write_behind = write_behind;
  o.write_queue_limit = 4;
  o.sync = false;
  o.host_capacity_bytes = host_capacity;
  StoreHarness h(backend, o);
  ASSERT_TRUE(h.Open().ok());
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(1234 + t);
      std::vector<SegmentHandle> held;
      Store* store = h.store();
      for (int i = 0; i < ops_per_thread; ++i) {
        const uint64_t id = rng() % kKeys;
        const uint32_t op = rng() % 100;
        if (op < 35) {
          const int64_t version = static_cast<int64_t>(t) * 100000 + i;
          Status s = store->Put(MakeSegment(id, version));
          // A host-only tier whose segments are all held by readers may be full.
          if (!s.ok() && s.code() != StatusCode::kResourceExhausted) ++failures;
        } else if (op < 75) {
          auto got = store->Get(TestKey(id), TestModel());
          if (got.ok()) {
            if (got.value()->key != TestKey(id) || !CheckSegment(*got.value()).empty()) ++failures;
            if (held.size() < 3 && op % 4 == 0) held.push_back(got.value());
          } else if (got.status().code() != StatusCode::kNotFound) {
            ++failures;
          }
        } else if (op < 85) {
          Status s = store->Delete(TestKey(id));
          if (!s.ok() && s.code() != StatusCode::kNotFound) ++failures;
        } else if (op < 92) {
          auto info = store->Info(TestKey(id));
          if (!info.ok() && info.status().code() != StatusCode::kNotFound) ++failures;
          (void)store->Contains(TestKey(id));
        } else if (op < 95) {
          for (const SegmentInfo& info : store->List(SegmentFilter{}))
            if (info.model != TestModel()) ++failures;
        } else if (op < 97) {
          if (!store->Flush().ok()) ++failures;
        } else {
          StoreStats st = store->Stats();
          if (host_capacity != 0 && st.host.bytes > host_capacity) ++failures;
          held.clear();
        }
      }
      for (const SegmentHandle& s : held)
        if (!CheckSegment(*s).empty()) ++failures;
    });
  }
  for (std::thread& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  StoreStats st = h.store()->Stats();
  EXPECT_EQ(st.write_errors, 0u);
  if (host_capacity != 0) {
    EXPECT_LE(st.host.bytes, host_capacity);
  }
  if (h.persistent()) {
    // The final state survives close and reopen exactly.
    std::map<uint64_t, int64_t> before;
    for (uint64_t id = 0; id < kKeys; ++id) before[id] = Snapshot(h.store(), id);
    ASSERT_TRUE(h.Reopen().ok());
    for (uint64_t id = 0; id < kKeys; ++id) EXPECT_EQ(Snapshot(h.store(), id), before[id]) << id;
  }
}

TEST(StoreConcurrencyTest, HostOnlyMixedOperations) { RunMixed(StoreBackend::kHostOnly, true, 48 << 10, 1500); }

TEST(StoreConcurrencyTest, HostOnlyUnbounded) { RunMixed(StoreBackend::kHostOnly, true, 0, 1000); }

// Buffer::SetHostAllocator may run while other threads allocate (a Store opening a device
// tier installs the pinned allocator at any time): every buffer is freed by the allocator that
// made it, and nothing races (this test runs under TSan).
TEST(StoreConcurrencyTest, HostAllocatorSwapUnderLoad) {
  static std::atomic<int64_t> live_a{0}, live_b{0};
  auto counting = [](std::atomic<int64_t>* live, const char* name) {
    Buffer::Allocator a;
    a.alloc = [live](size_t n) {
      ++*live;
      return std::malloc(n == 0 ? 1 : n);
    };
    a.free = [live](void* p) {
      --*live;
      std::free(p);
    };
    a.name = name;
    return a;
  };
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      std::vector<std::shared_ptr<Buffer>> held;
      while (!stop.load()) {
        auto b = Buffer::Allocate(4096);
        ASSERT_TRUE(b.ok());
        held.push_back(std::move(b).value());
        if (held.size() > 16) held.erase(held.begin());
      }
    });
  }
  for (int i = 0; i < 200; ++i) Buffer::SetHostAllocator(counting(i % 2 ? &live_a : &live_b, i % 2 ? "a" : "b"));
  stop = true;
  for (auto& t : threads) t.join();
  EXPECT_EQ(live_a.load(), 0);
  EXPECT_EQ(live_b.load(), 0);
  Buffer::SetHostAllocator({});  // the default again, for the other tests in this binary
  EXPECT_STREQ(Buffer::HostAllocatorName(), "aligned");
}

TEST(StoreConcurrencyTest, WriteBehindMixedOperations) {
  for (StoreBackend b : testing::AllBackends())
    if (b != StoreBackend::kHostOnly) RunMixed(b, true, 48 << 10, 1000);
}

TEST(StoreConcurrencyTest, WriteThroughMixedOperations) {
  for (StoreBackend b : testing::AllBackends())
    if (b != StoreBackend::kHostOnly) RunMixed(b, false, 48 << 10, 600);
}

}  // namespace
}  // namespace kvagent
