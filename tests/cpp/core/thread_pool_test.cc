// ThreadPool (src/core/thread_pool.h): every range runs exactly once, the ranges tile [0, n),
// callers from several threads at once and nested calls complete (no deadlock), a pool without
// workers runs everything on the caller. Runs under TSan (make tsan).
#include "core/thread_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

namespace kvagent {
namespace {

void ExpectTiles(ThreadPool& pool, size_t n, int parts) {
  std::vector<std::atomic<int>> hits(n);
  std::vector<std::atomic<int>> part_runs(static_cast<size_t>(std::max(parts, 1)));
  pool.ParallelFor(n, parts, [&](size_t b, size_t e, int p) {
    ASSERT_LE(b, e);
    ASSERT_LE(e, n);
    ++part_runs[static_cast<size_t>(p)];
    for (size_t i = b; i < e; ++i) ++hits[i];
  });
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "n=" << n << " parts=" << parts << " i=" << i;
  const int want_parts = n == 0 ? 0 : static_cast<int>(std::min<size_t>(static_cast<size_t>(std::max(parts, 1)), n));
  for (int p = 0; p < static_cast<int>(part_runs.size()); ++p)
    EXPECT_EQ(part_runs[static_cast<size_t>(p)].load(), p < want_parts ? 1 : 0) << "part " << p;
}

TEST(ThreadPoolTest, RangesTileTheInputOnce) {
  ThreadPool pool(3);
  for (size_t n : {0, 1, 2, 7, 100, 1001})
    for (int parts : {0, 1, 2, 3, 4, 9, 64}) ExpectTiles(pool, n, parts);
}

TEST(ThreadPoolTest, NoWorkersRunsOnTheCaller) {
  ThreadPool pool(0);
  const auto caller = std::this_thread::get_id();
  std::atomic<int> elsewhere{0};
  pool.ParallelFor(50, 8, [&](size_t, size_t, int) { elsewhere += std::this_thread::get_id() != caller; });
  EXPECT_EQ(elsewhere.load(), 0);
  ExpectTiles(pool, 50, 8);
}

TEST(ThreadPoolTest, ConcurrentCallersAndNestedCalls) {
  ThreadPool pool(2);
  std::atomic<long> sum{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < 4; ++c) {
    callers.emplace_back([&] {
      for (int round = 0; round < 20; ++round) {
        pool.ParallelFor(16, 4, [&](size_t b, size_t e, int) {
          // Nested: every worker may be busy; the caller runs the inner ranges itself.
          pool.ParallelFor(e - b, 3, [&](size_t ib, size_t ie, int) { sum += static_cast<long>(ie - ib); });
        });
      }
    });
  }
  for (auto& t : callers) t.join();
  EXPECT_EQ(sum.load(), 4L * 20 * 16);
}

TEST(ThreadPoolTest, SharedPoolWorks) {
  ExpectTiles(ThreadPool::Shared(), 12345, 5);
  EXPECT_EQ(ThreadPool::Shared().workers(),
            std::max(1, static_cast<int>(std::thread::hardware_concurrency())) - 1);
}

}  // namespace
}  // namespace kvagent
