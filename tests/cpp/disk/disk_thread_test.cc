// 8 threads of mixed DiskTier operations (put / get / read payload / delete / list / compact /
// verify) on both Envs; each thread owns a key range, so every result it sees is checkable.
// Runs under TSan in the thread-sanitizer build (name matches 'thread').
#include <gtest/gtest.h>

#include <atomic>
#include <map>
#include <random>
#include <thread>

#include "disk/disk_test_util.h"
#include "kvagent/disk_tier.h"

namespace kvagent {
namespace {

using testing::MakeSegment;
using testing::SameSegment;
using testing::TempDir;
using testing::TestKey;
using testing::TestModel;

void Hammer(Env* env, const std::string& dir, int ops_per_thread) {
  DiskTierOptions o;
  o.dir = dir;
  o.env = env;
  o.sync = false;
  o.max_file_bytes = 16 << 10;
  o.compact_dead_ratio = 0.5;
  o.compact_min_dead_bytes = 32 << 10;
  auto opened = DiskTier::Open(o);
  ASSERT_TRUE(opened.ok());
  DiskTier* t = opened->get();
  const SegmentLayout layout{1, 2, 16, 5, DType::kF16};
  constexpr int kThreads = 8;
  std::atomic<int> failures{0};
  std::vector<std::map<uint64_t, uint64_t>> owned(kThreads);
  std::vector<std::thread> threads;
  for (int id = 0; id < kThreads; ++id) {
    threads.emplace_back([&, id] {
      std::mt19937_64 rng(id + 1);
      auto& mine = owned[id];
      for (int i = 0; i < ops_per_thread; ++i) {
        uint64_t key = static_cast<uint64_t>(id) * 1000 + rng() % 20;
        int op = static_cast<int>(rng() % 100);
        if (op < 40) {
          uint64_t seed = rng();
          if (!t->Put(MakeSegment(key, seed, layout)).ok()) ++failures;
          mine[key] = seed;
        } else if (op < 75) {
          auto got = t->Get(TestKey(key), TestModel());
          auto it = mine.find(key);
          if (it == mine.end()) {
            if (got.status().code() != StatusCode::kNotFound) ++failures;
          } else if (!got.ok() || !SameSegment(**got, MakeSegment(key, it->second, layout))) {
            ++failures;
          }
        } else if (op < 85) {
          bool had = mine.erase(key) > 0;
          if (t->Delete(TestKey(key)).code() != (had ? StatusCode::kOk : StatusCode::kNotFound)) ++failures;
        } else if (op < 92) {
          auto it = mine.find(key);
          if (it != mine.end()) {
            std::vector<std::byte> dst(layout.NumBytes());
            Segment want = MakeSegment(key, it->second, layout);
            if (!t->ReadPayload(TestKey(key), TestModel(), dst).ok() ||
                std::memcmp(dst.data(), want.payload->data(), dst.size()) != 0)
              ++failures;
          }
        } else if (op < 96) {
          t->List({});
          t->Stats();
        } else if (op < 98) {
          if (!t->Compact(nullptr).ok()) ++failures;
        } else {
          auto v = t->Verify(nullptr);
          if (!v.ok() || v->corrupt != 0) ++failures;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  size_t total = 0;
  for (const auto& m : owned) total += m.size();
  EXPECT_EQ(t->Stats().segments, total);
  ASSERT_TRUE(t->Sync().ok());
  opened->reset();
  auto re = DiskTier::Open(o);
  ASSERT_TRUE(re.ok());
  EXPECT_EQ((*re)->Stats().segments, total);
  for (const auto& m : owned)
    for (const auto& [k, seed] : m) {
      auto got = (*re)->Get(TestKey(k), TestModel());
      ASSERT_TRUE(got.ok());
      EXPECT_TRUE(SameSegment(**got, MakeSegment(k, seed, layout)));
    }
}

TEST(DiskThreadTest, EightThreadsMemEnv) {
  auto env = NewMemEnv();
  Hammer(env.get(), "/t/tier", 400);
}

TEST(DiskThreadTest, EightThreadsPosix) {
  TempDir tmp;
  Hammer(Env::Default(), tmp.path() + "/tier", 150);
}

}  // namespace
}  // namespace kvagent
