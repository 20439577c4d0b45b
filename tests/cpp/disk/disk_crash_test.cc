// Crash test: a child process writes (and deletes, and compacts) in a loop with sync on and
// reports each acknowledged operation through a pipe; the parent kills it with SIGKILL at a
// random time, reopens the tier and checks that every acknowledged Put is served bit-exact,
// every acknowledged Delete stays deleted, and nothing torn or foreign is ever served.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <map>
#include <random>
#include <set>

#include "disk/disk_test_util.h"
#include "kvagent/disk_tier.h"
#include "store/record.h"

namespace kvagent {
namespace {

using testing::MakeSegment;
using testing::SameSegment;
using testing::TempDir;
using testing::TestKey;
using testing::TestModel;

SegmentLayout LayoutFor(uint64_t key) {
  // Every fifth record is large (~200 KiB), so kills also land inside a record's writes.
  if (key % 5 == 0) return SegmentLayout{2, 2, 128, 64 + static_cast<int>(key % 64), DType::kBF16};
  return SegmentLayout{1 + static_cast<int>(key % 2), 2, 32, 3 + static_cast<int>(key % 11), DType::kBF16};
}
Segment SegmentFor(uint64_t key) { return MakeSegment(key, key * 7 + 1, LayoutFor(key)); }

// Odd rounds run without fdatasync: a process kill keeps the page cache, so acknowledged
// records must survive it too, and the faster loop makes kills land inside appends.
DiskTierOptions CrashOptions(const std::string& dir, bool sync = true, bool batches = false) {
  DiskTierOptions o;
  o.dir = dir;
  o.sync = sync;
  // Many files, so rollover and compaction happen often; batch rounds need room for a 1 MiB+
  // batch in one file, or the disk tier never coalesces (direct I/O with padding records).
  o.max_file_bytes = batches ? (4 << 20) : (512 << 10);
  o.compact_dead_ratio = 0.5;
  o.compact_min_dead_bytes = 256 << 10;
  return o;
}

// Child: never returns. Acks are int64: +key after Put returned OK, -key after Delete did;
// key | kDeleteIntent just before a Delete (that key may then be present or not).
constexpr uint64_t kDeleteIntent = uint64_t{1} << 50;
// batches: Puts go in PutBatch calls of kBatch segments (acknowledged together after it returns);
// pipelined: as the store's writer does, batch k+1 is submitted (SubmitBatch) before batch k is
// finished (FinishBatch) and acknowledged, so a kill can land with two batches in flight.
constexpr uint64_t kBatch = 24;
struct InFlight {
  uint64_t first_key;
  std::vector<Segment> segs;
  std::unique_ptr<DiskTier::WriteTicket> ticket;
};
[[noreturn]] void ChildLoop(const std::string& dir, uint64_t first_key, int fd, uint64_t seed, bool sync,
                            bool batches, bool pipelined) {
  auto t = DiskTier::Open(CrashOptions(dir, sync, batches));
  if (!t.ok()) _exit(3);
  std::mt19937_64 rng(seed);
  std::vector<uint64_t> mine;
  std::unique_ptr<InFlight> in_flight;
  auto finish = [&] {
    if (!in_flight) return;
    size_t written = 0;
    if (!(*t)->FinishBatch(std::move(in_flight->ticket), &written).ok() || written != kBatch) _exit(6);
    for (uint64_t k = in_flight->first_key; k < in_flight->first_key + kBatch; ++k) {
      int64_t ack = static_cast<int64_t>(k);
      if (write(fd, &ack, sizeof(ack)) != sizeof(ack)) _exit(7);
      mine.push_back(k);
    }
    in_flight.reset();
  };
  for (uint64_t key = first_key;; ++key) {
    if (!mine.empty() && rng() % 4 == 0) {
      finish();  // a Delete finishes the tickets in flight anyway
      size_t i = rng() % mine.size();
      uint64_t victim = mine[i];
      mine.erase(mine.begin() + static_cast<long>(i));
      int64_t intent = static_cast<int64_t>(victim | kDeleteIntent);
      if (write(fd, &intent, sizeof(intent)) != sizeof(intent)) _exit(5);
      if (!(*t)->Delete(TestKey(victim)).ok()) _exit(4);
      int64_t ack = -static_cast<int64_t>(victim);
      if (write(fd, &ack, sizeof(ack)) != sizeof(ack)) _exit(5);
    }
    if (pipelined) {
      auto next = std::make_unique<InFlight>();
      next->first_key = key;
      for (uint64_t k = key; k < key + kBatch; ++k) next->segs.push_back(SegmentFor(k));
      std::vector<const Segment*> ptrs;
      for (const Segment& seg : next->segs) ptrs.push_back(&seg);
      next->ticket = (*t)->SubmitBatch(ptrs);
      finish();
      in_flight = std::move(next);
      key += kBatch - 1;
    } else if (batches) {
      std::vector<Segment> segs;
      std::vector<const Segment*> ptrs;
      for (uint64_t k = key; k < key + kBatch; ++k) segs.push_back(SegmentFor(k));
      for (const Segment& seg : segs) ptrs.push_back(&seg);
      size_t written = 0;
      if (!(*t)->PutBatch(ptrs, &written).ok() || written != ptrs.size()) _exit(6);
      for (uint64_t k = key; k < key + kBatch; ++k) {
        int64_t ack = static_cast<int64_t>(k);
        if (write(fd, &ack, sizeof(ack)) != sizeof(ack)) _exit(7);
        mine.push_back(k);
      }
      key += kBatch - 1;
    } else {
      if (!(*t)->Put(SegmentFor(key)).ok()) _exit(6);
      int64_t ack = static_cast<int64_t>(key);
      if (write(fd, &ack, sizeof(ack)) != sizeof(ack)) _exit(7);
      mine.push_back(key);
    }
    if (rng() % 30 == 0) {
      finish();
      if (!(*t)->Compact(nullptr).ok()) _exit(8);
    }
  }
}

TEST(DiskCrashTest, SigkillAtRandomTimes) {
  TempDir tmp;
  const std::string dir = tmp.path() + "/tier";
  std::mt19937_64 rng(2024);
  std::map<uint64_t, bool> acked;  // key -> alive
  uint64_t next_key = 1;
  uint64_t torn_seen = 0;
  const int kRounds = 24;
  for (int round = 0; round < kRounds; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    int fds[2];
    ASSERT_EQ(pipe(fds), 0);
    const uint64_t first = next_key;
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      close(fds[0]);
      // Rounds alternate sync / no sync; every third round writes in batches, every other of
      // those pipelined.
      ChildLoop(dir, first, fds[1], rng(), round % 2 == 0, round % 3 == 2, round % 6 == 5);
    }
    close(fds[1]);
    usleep(static_cast<useconds_t>(20000 + rng() % 180000));
    ASSERT_EQ(kill(pid, SIGKILL), 0);
    int wstatus = 0;
    ASSERT_EQ(waitpid(pid, &wstatus, 0), pid);
    ASSERT_TRUE(WIFSIGNALED(wstatus)) << "child exited early with status " << WEXITSTATUS(wstatus);
    int64_t ack;
    uint64_t max_key = first;
    std::set<uint64_t> in_doubt;  // a Delete was under way at the kill
    while (read(fds[0], &ack, sizeof(ack)) == sizeof(ack)) {
      if (ack > 0 && (static_cast<uint64_t>(ack) & kDeleteIntent)) {
        in_doubt.insert(static_cast<uint64_t>(ack) & ~kDeleteIntent);
      } else if (ack > 0) {
        acked[static_cast<uint64_t>(ack)] = true;
        max_key = std::max(max_key, static_cast<uint64_t>(ack));
      } else {
        acked[static_cast<uint64_t>(-ack)] = false;
        in_doubt.erase(static_cast<uint64_t>(-ack));
      }
    }
    close(fds[0]);
    next_key = max_key + 2 * kBatch + 1;  // skips the Puts or batches that may have been in flight

    auto t = DiskTier::Open(CrashOptions(dir));
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    torn_seen += (*t)->Recovery().torn_tails;
    EXPECT_EQ((*t)->Recovery().corrupt_records, 0u) << ::testing::PrintToString((*t)->Recovery().problems);
    for (uint64_t key : in_doubt) acked[key] = (*t)->Contains(TestKey(key));
    for (const auto& [key, alive] : acked) {
      auto got = (*t)->Get(TestKey(key), TestModel());
      if (alive) {
        if (!got.ok()) {
          auto names = Env::Default()->GetChildren(dir).value();
          for (const auto& name : names) {
            if (name.find(".kvs") == std::string::npos && name != "COMPACTED") continue;
            std::string bytes = ReadFileToString(Env::Default(), dir + "/" + name).value();
            std::printf("%s %zu %s\n", name.c_str(), bytes.size(), name == "COMPACTED" ? bytes.c_str() : "");
            for (size_t off = 0; off + 128 <= bytes.size(); off += 64) {
              disk::RecordHeader h;
              if (disk::DecodeHeader(std::as_bytes(std::span<const char>(bytes.data() + off, 128)), &h).ok() &&
                  h.key == TestKey(key))
                std::printf("  key at %zu kind %d\n", off, static_cast<int>(h.kind));
            }
          }
        }
        ASSERT_TRUE(got.ok()) << "acknowledged key " << key << " lost: " << got.status().ToString() << " "
                              << ::testing::PrintToString((*t)->Recovery().problems) << " files "
                              << (*t)->Recovery().files << " indexed " << (*t)->Recovery().records_indexed;
        ASSERT_TRUE(SameSegment(**got, SegmentFor(key))) << key;
      } else {
        ASSERT_EQ(got.status().code(), StatusCode::kNotFound) << "acknowledged delete of " << key << " undone";
      }
    }
    // Whatever else is served (the Put in flight at the kill) is whole and correct.
    for (const auto& info : (*t)->List({})) {
      auto got = (*t)->Get(info.key, info.model);
      ASSERT_TRUE(got.ok()) << got.status().ToString();
      ASSERT_TRUE(SameSegment(**got, SegmentFor(static_cast<uint64_t>((*got)->key.hi))));
    }
    auto v = (*t)->Verify(nullptr);
    ASSERT_TRUE(v.ok());
    EXPECT_EQ(v->corrupt, 0u);
  }
  size_t alive = 0;
  for (const auto& [k, a] : acked) alive += a;
  EXPECT_GT(alive, static_cast<size_t>(kRounds));  // the children got real work done
  std::printf("crash test: %zu acknowledged keys (%zu alive), %llu torn tails cut over %d rounds\n", acked.size(),
              alive, static_cast<unsigned long long>(torn_seen), kRounds);
}

}  // namespace
}  // namespace kvagent
