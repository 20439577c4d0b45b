// Concurrent Add/Remove/Search on one LatentIndex (run under TSan by `make tsan`).
#include <gtest/gtest.h>

#include <atomic>
#include <random>
#include <thread>

#include "index_test_util.h"
#include "kvagent/index.h"

namespace kvagent {
namespace {

TEST(LatentIndexConcurrency, WritersAndReaders) {
  ModelSpec spec = testing_index::Spec(2, 4, 2, 16);
  IndexOptions o;
  o.num_threads = 2;
  auto idx = LatentIndex::Create(spec, o).value();
  std::mt19937 rng(21);
  std::vector<KeySummary> sums;
  for (int i = 0; i < 64; ++i) {
    auto k = testing_index::RandomKeys(rng, 2, 2, 4, 16);
    sums.push_back(KeySummary::FromKeys(k.data(), DType::kF32, 2, 2, 4, 16).value());
  }
  auto q = testing_index::RandomQuery(rng, 2, 4, 3, 16);
  std::atomic<bool> stop{false};
  std::atomic<int> searches{0};
  auto writer = [&](int id) {
    for (int round = 0; round < 30; ++round) {
      for (int i = id; i < 64; i += 2) {
        IndexEntry e;
        e.key = MemoryKey("ns", "s", i, round);
        e.num_tokens = 4;
        ASSERT_TRUE(idx->Add(e, sums[i]).ok());
      }
      for (int i = id; i < 64; i += 2) ASSERT_TRUE(idx->Remove(MemoryKey("ns", "s", i, round)).ok());
    }
  };
  auto reader = [&] {
    QueryView v{q.data(), DType::kF32, 2, 4, 3, 16};
    while (!stop.load()) {
      SearchRequest r;
      auto hits = idx->Search(v, r);
      ASSERT_TRUE(hits.ok());
      EXPECT_LE(hits->size(), 5u);
      searches.fetch_add(1);
    }
  };
  std::thread r1(reader), r2(reader);
  std::thread w1(writer, 0), w2(writer, 1);
  w1.join();
  w2.join();
  stop = true;
  r1.join();
  r2.join();
  EXPECT_EQ(idx->size(), 0u);
  EXPECT_GT(searches.load(), 0);
}

}  // namespace
}  // namespace kvagent
