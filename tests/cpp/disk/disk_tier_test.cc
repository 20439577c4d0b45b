// DiskTier behaviour on both Envs: round trips, replace, delete, fingerprint checks, invalid
// input, locking, capacity eviction, compaction, verify, list filters, int8 codec.
#include "kvagent/disk_tier.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>

#include "disk/disk_test_util.h"

namespace kvagent {
namespace {

using testing::MakeSegment;
using testing::SameSegment;
using testing::TempDir;
using testing::TestKey;
using testing::TestModel;

class DiskTierTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    if (GetParam()) {
      env_ = Env::Default();
      dir_ = tmp_.path() + "/tier";
    } else {
      mem_ = NewMemEnv();
      env_ = mem_.get();
      dir_ = "/mem/tier";
    }
  }
  DiskTierOptions Options() const {
    DiskTierOptions o;
    o.dir = dir_;
    o.env = env_;
    o.max_file_bytes = 16 << 10;
    return o;
  }
  std::unique_ptr<DiskTier> OpenOrDie(const DiskTierOptions& o) {
    auto t = DiskTier::Open(o);
    EXPECT_TRUE(t.ok()) << t.status().ToString();
    return t.ok() ? std::move(t).value() : nullptr;
  }

  TempDir tmp_;
  std::unique_ptr<Env> mem_;
  Env* env_ = nullptr;
  std::string dir_;
};

TEST_P(DiskTierTest, PutGetReopenBitExact) {
  std::vector<Segment> segs;
  const SegmentLayout layouts[] = {
      {1, 1, 1, 1, DType::kF32}, {2, 3, 64, 7, DType::kBF16}, {3, 2, 80, 33, DType::kF16}, {1, 1, 128, 1, DType::kF32}};
  {
    auto t = OpenOrDie(Options());
    ASSERT_TRUE(t);
    for (int i = 0; i < 12; ++i) {
      segs.push_back(MakeSegment(i + 1, 100 + i, layouts[i % 4]));
      ASSERT_TRUE(t->Put(segs.back()).ok());
    }
    for (const auto& s : segs) {
      auto got = t->Get(s.key, s.model);
      ASSERT_TRUE(got.ok()) << got.status().ToString();
      EXPECT_TRUE(SameSegment(**got, s));
      EXPECT_EQ(reinterpret_cast<uintptr_t>((*got)->payload->data()) % 64, 0u);
    }
    EXPECT_EQ(t->Stats().segments, 12u);
    EXPECT_EQ(t->Stats().hits, 12u);
  }
  auto t = OpenOrDie(Options());
  ASSERT_TRUE(t);
  EXPECT_EQ(t->Recovery().corrupt_records, 0u);
  EXPECT_EQ(t->Recovery().torn_tails, 0u);
  for (const auto& s : segs) {
    auto got = t->Get(s.key, s.model);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    EXPECT_TRUE(SameSegment(**got, s));
    std::vector<std::byte> dst(s.PayloadBytes());
    ASSERT_TRUE(t->ReadPayload(s.key, s.model, dst).ok());
    EXPECT_EQ(std::memcmp(dst.data(), s.payload->data(), dst.size()), 0);
  }
  std::vector<std::byte> wrong(segs[0].PayloadBytes() + 1);
  EXPECT_EQ(t->ReadPayload(segs[0].key, segs[0].model, wrong).code(), StatusCode::kInvalidArgument);
}

TEST_P(DiskTierTest, ReplaceAndDeleteSurviveReopen) {
  {
    auto t = OpenOrDie(Options());
    ASSERT_TRUE(t->Put(MakeSegment(1, 1)).ok());
    ASSERT_TRUE(t->Put(MakeSegment(2, 2)).ok());
    ASSERT_TRUE(t->Put(MakeSegment(1, 3)).ok());  // replaces key 1
    ASSERT_TRUE(t->Delete(TestKey(2)).ok());
    EXPECT_EQ(t->Delete(TestKey(2)).code(), StatusCode::kNotFound);
    EXPECT_FALSE(t->Contains(TestKey(2)));
  }
  auto t = OpenOrDie(Options());
  auto got = t->Get(TestKey(1), TestModel());
  ASSERT_TRUE(got.ok());
  EXPECT_TRUE(SameSegment(**got, MakeSegment(1, 3)));
  EXPECT_EQ(t->Get(TestKey(2), TestModel()).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(t->Stats().segments, 1u);
  EXPECT_GE(t->Stats().misses, 1u);
}

TEST_P(DiskTierTest, FingerprintMismatchIsFailedPrecondition) {
  auto t = OpenOrDie(Options());
  Segment s = MakeSegment(1, 1);
  ASSERT_TRUE(t->Put(s).ok());
  auto got = t->Get(s.key, TestModel(99));
  EXPECT_EQ(got.status().code(), StatusCode::kFailedPrecondition);
  std::vector<std::byte> dst(s.PayloadBytes());
  EXPECT_EQ(t->ReadPayload(s.key, TestModel(99), dst).code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(t->Get(s.key, s.model).ok());
}

TEST_P(DiskTierTest, InvalidSegmentWritesNothing) {
  auto t = OpenOrDie(Options());
  ASSERT_TRUE(t->Put(MakeSegment(1, 1)).ok());
  const uint64_t bytes_before = t->Stats().file_bytes;
  std::vector<Segment> bad;
  Segment s = MakeSegment(2, 2);
  s.tokens.pop_back();
  bad.push_back(s);
  s = MakeSegment(3, 3);
  s.payload = Buffer::Allocate(s.PayloadBytes() - 2).value();
  bad.push_back(s);
  s = MakeSegment(4, 4);
  s.layout.num_kv_heads = 0;
  bad.push_back(s);
  s = MakeSegment(5, 5);
  s.key = Hash128{};
  bad.push_back(s);
  s = MakeSegment(6, 6);
  s.payload.reset();
  bad.push_back(s);
  s = MakeSegment(7, 7);
  s.layout.dtype = DType::kI8;
  bad.push_back(s);
  for (const auto& b : bad) EXPECT_EQ(t->Put(b).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(t->Stats().file_bytes, bytes_before);
  EXPECT_EQ(t->Stats().segments, 1u);
  for (uint64_t k = 2; k <= 7; ++k) EXPECT_FALSE(t->Contains(TestKey(k)));
}

TEST_P(DiskTierTest, SecondOpenOfLockedDirFails) {
  auto t = OpenOrDie(Options());
  auto again = DiskTier::Open(Options());
  EXPECT_EQ(again.status().code(), StatusCode::kFailedPrecondition);
  t.reset();
  EXPECT_TRUE(DiskTier::Open(Options()).ok());
}

TEST_P(DiskTierTest, CapacityEvictsLeastRecentlyUsed) {
  DiskTierOptions o = Options();
  const uint64_t rec = 128 + 512 + 2 * 2 * 8 * 5 * 2;  // generous upper bound of one record
  o.capacity_bytes = 4 * rec;
  o.compact_min_dead_bytes = 1;
  {
    auto t = OpenOrDie(o);
    for (uint64_t k = 1; k <= 4; ++k) ASSERT_TRUE(t->Put(MakeSegment(k, k)).ok());
    ASSERT_TRUE(t->Get(TestKey(1), TestModel()).ok());  // 1 becomes most recent
    for (uint64_t k = 5; k <= 8; ++k) ASSERT_TRUE(t->Put(MakeSegment(k, k)).ok());
    TierStats st = t->Stats();
    EXPECT_LE(st.bytes, o.capacity_bytes);
    EXPECT_GT(st.evictions, 0u);
    EXPECT_FALSE(t->Contains(TestKey(2)));  // least recently used goes first
    EXPECT_TRUE(t->Contains(TestKey(8)));
    EXPECT_EQ(st.segments + st.evictions, 8u);
  }
  auto t = OpenOrDie(o);
  TierStats st = t->Stats();
  EXPECT_LE(st.bytes, o.capacity_bytes);
  EXPECT_FALSE(t->Contains(TestKey(2)));
  EXPECT_TRUE(t->Contains(TestKey(8)));
  // A segment larger than the whole tier is refused and changes nothing.
  Segment big = MakeSegment(99, 1, {4, 4, 64, 16, DType::kF32});
  EXPECT_EQ(t->Put(big).code(), StatusCode::kResourceExhausted);
  EXPECT_FALSE(t->Contains(big.key));
  EXPECT_EQ(t->Stats().segments, st.segments);
}

TEST_P(DiskTierTest, CompactReclaimsDeadSpaceAndKeepsLiveData) {
  DiskTierOptions o = Options();
  o.compact_dead_ratio = 1.0;  // manual only
  std::map<uint64_t, Segment> live;
  {
    auto t = OpenOrDie(o);
    for (uint64_t k = 1; k <= 40; ++k) {
      live[k] = MakeSegment(k, k, {2, 2, 16, 9, DType::kF32});
      ASSERT_TRUE(t->Put(live[k]).ok());
    }
    for (uint64_t k = 1; k <= 40; k += 2) {
      ASSERT_TRUE(t->Delete(TestKey(k)).ok());
      live.erase(k);
    }
    TierStats before = t->Stats();
    std::vector<uint64_t> seen;
    auto r = t->Compact([&](uint64_t done, uint64_t total) {
      EXPECT_LE(done, total);
      seen.push_back(done);
    });
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->records_moved, live.size());
    EXPECT_LT(r->bytes_after, r->bytes_before);
    EXPECT_EQ(r->bytes_after, before.bytes);
    EXPECT_EQ(seen.size(), live.size());
    EXPECT_EQ(t->Stats().file_bytes, t->Stats().bytes);
    for (const auto& [k, s] : live) {
      auto got = t->Get(s.key, s.model);
      ASSERT_TRUE(got.ok());
      EXPECT_TRUE(SameSegment(**got, s));
    }
    ASSERT_TRUE(t->Put(MakeSegment(100, 100)).ok());
    live[100] = MakeSegment(100, 100);
  }
  auto t = OpenOrDie(o);
  EXPECT_EQ(t->Stats().segments, live.size());
  for (const auto& [k, s] : live) {
    auto got = t->Get(s.key, s.model);
    ASSERT_TRUE(got.ok());
    EXPECT_TRUE(SameSegment(**got, s));
  }
  auto v = t->Verify(nullptr);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->ok, live.size());
  EXPECT_EQ(v->corrupt, 0u);
}

TEST_P(DiskTierTest, AutoCompactionBoundsDeadSpace) {
  DiskTierOptions o = Options();
  o.compact_dead_ratio = 0.5;
  o.compact_min_dead_bytes = 4096;
  auto t = OpenOrDie(o);
  for (int round = 0; round < 30; ++round)
    for (uint64_t k = 1; k <= 5; ++k) ASSERT_TRUE(t->Put(MakeSegment(k, round * 10 + k)).ok());
  TierStats st = t->Stats();
  EXPECT_EQ(st.segments, 5u);
  EXPECT_LE(st.file_bytes - st.bytes, std::max<uint64_t>(4096 + 2048, st.file_bytes / 2 + 2048));
  for (uint64_t k = 1; k <= 5; ++k) {
    auto got = t->Get(TestKey(k), TestModel());
    ASSERT_TRUE(got.ok());
    EXPECT_TRUE(SameSegment(**got, MakeSegment(k, 290 + k)));
  }
}

TEST_P(DiskTierTest, ListFiltersByMetadata) {
  auto t = OpenOrDie(Options());
  for (uint64_t k = 1; k <= 15; ++k)
    ASSERT_TRUE(t->Put(MakeSegment(k, k, {1, 1, 4, 2, DType::kF32}, TestModel(k % 2))).ok());
  EXPECT_EQ(t->List({}).size(), 15u);
  SegmentFilter f;
  f.ns = "ns1";
  for (const auto& i : t->List(f)) EXPECT_EQ(i.meta.ns, "ns1");
  EXPECT_EQ(t->List(f).size(), 5u);
  f = {};
  f.model = TestModel(0);
  EXPECT_EQ(t->List(f).size(), 7u);
  f = {};
  f.session = "s0";
  f.min_time_us = 1005;
  f.max_time_us = 1010;
  auto l = t->List(f);
  ASSERT_EQ(l.size(), 2u);  // keys 5 and 10
  EXPECT_EQ(l[0].key, TestKey(5));
  EXPECT_EQ(l[1].key, TestKey(10));
  auto info = t->Info(TestKey(3));
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->payload_bytes, MakeSegment(3, 3, {1, 1, 4, 2, DType::kF32}).PayloadBytes());
  EXPECT_GT(info->stored_bytes, info->payload_bytes);
  EXPECT_EQ(t->Info(TestKey(99)).status().code(), StatusCode::kNotFound);
}

TEST_P(DiskTierTest, Int8CodecRoundTripWithinBound) {
  DiskTierOptions o = Options();
  o.codec = CodecKind::kInt8;
  Segment s = MakeSegment(1, 7, {2, 2, 64, 9, DType::kF32});
  {
    auto t = OpenOrDie(o);
    ASSERT_TRUE(t->Put(s).ok());
    EXPECT_LT(t->Info(s.key)->stored_bytes, s.PayloadBytes());
  }
  o.codec = CodecKind::kRaw;  // reading does not depend on the codec option
  auto t = OpenOrDie(o);
  auto got = t->Get(s.key, s.model);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  const SegmentLayout& l = s.layout;
  for (size_t p = 0; p < static_cast<size_t>(l.num_layers) * 2 * l.num_kv_heads; ++p)
    for (int d = 0; d < l.head_dim; ++d) {
      float amax = 0;
      for (int tk = 0; tk < l.num_tokens; ++tk)
        amax = std::max(amax,
                        std::fabs(LoadAsF32(s.payload->data(), l.dtype, p * l.PlaneElements() + tk * l.head_dim + d)));
      for (int tk = 0; tk < l.num_tokens; ++tk) {
        size_t i = p * l.PlaneElements() + tk * l.head_dim + d;
        float a = LoadAsF32(s.payload->data(), l.dtype, i), b = LoadAsF32((*got)->payload->data(), l.dtype, i);
        EXPECT_LE(std::fabs(a - b), amax / 127.0f * 0.5f * 1.0001f + 1e-30f);
      }
    }
  EXPECT_EQ((*got)->tokens, s.tokens);
}

// Without options.sync the catalog is committed in batches (the files are the source of
// truth): Sync() brings it up to date, and rows a process never committed are recovered by the
// rescan past the catalog's end.
TEST(DiskTierCatalogTest, BatchedCatalogRowsAreRecoveredByTheScan) {
  TempDir tmp;
  DiskTierOptions o;
  o.dir = tmp.path() + "/tier";
  o.sync = false;
  {
    auto t = DiskTier::Open(o);
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    for (int i = 0; i < 20; ++i) ASSERT_TRUE((*t)->Put(MakeSegment(i, i)).ok());
    ASSERT_TRUE((*t)->Sync().ok());
  }
  {
    auto t = DiskTier::Open(o);
    ASSERT_TRUE(t.ok());
    EXPECT_EQ((*t)->Recovery().records_indexed, 0u);  // the catalog knew every record
    EXPECT_EQ((*t)->Stats().segments, 20u);
  }
  // A child writes more without Sync and exits without closing: no catalog commit happens
  // for those records, the bytes are in the files (page cache).
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    auto t = DiskTier::Open(o);
    if (!t.ok()) _exit(2);
    for (int i = 20; i < 25; ++i)
      if (!(*t)->Put(MakeSegment(i, 100 + i)).ok()) _exit(3);
    if (!(*t)->Delete(TestKey(3)).ok()) _exit(4);
    _exit(0);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  auto t = DiskTier::Open(o);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ((*t)->Recovery().records_indexed, 6u);  // 5 segments and 1 tombstone found by the scan
  EXPECT_EQ((*t)->Recovery().corrupt_records, 0u);
  EXPECT_EQ((*t)->Stats().segments, 24u);
  EXPECT_EQ((*t)->Get(TestKey(3), TestModel()).status().code(), StatusCode::kNotFound);
  for (int i = 0; i < 25; ++i) {
    if (i == 3) continue;
    auto got = (*t)->Get(TestKey(i), TestModel());
    ASSERT_TRUE(got.ok()) << i << ": " << got.status().ToString();
    EXPECT_TRUE(SameSegment(**got, MakeSegment(i, i < 20 ? i : 100 + i)));
  }
}

INSTANTIATE_TEST_SUITE_P(Envs, DiskTierTest, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "Posix" : "MemEnv"; });

// Whether the POSIX Env gives direct I/O in `dir` (it falls back to buffered files elsewhere).
bool DirectIoAvailable(const std::string& dir) {
  bool direct = false;
  {
    auto probe = Env::Default()->NewDirectWritableFile(dir + "/probe", true);
    direct = probe.ok() && (*probe)->DirectIoAlignment() != 0;
  }
  std::filesystem::remove(dir + "/probe");
  return direct;
}

// Every segment reads back bit-exactly and Verify finds them all intact.
void ExpectAllReadable(DiskTier& t, const std::vector<Segment>& segs) {
  for (const Segment& s : segs) {
    auto got = t.Get(s.key, TestModel());
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    EXPECT_TRUE(SameSegment(**got, s));
  }
  auto v = t.Verify(nullptr);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->ok, segs.size());
  EXPECT_EQ(v->corrupt, 0u);
}

// Deletes every `stride`-th segment, compacts, and checks the rest survived bit-exactly.
void DeleteSomeCompactAndCheck(DiskTier& t, const std::vector<Segment>& segs, uint64_t stride) {
  for (uint64_t i = 0; i < segs.size(); i += stride) ASSERT_TRUE(t.Delete(segs[i].key).ok());
  ASSERT_TRUE(t.Compact(nullptr).ok());
  for (uint64_t i = 0; i < segs.size(); ++i) {
    auto got = t.Get(segs[i].key, TestModel());
    if (i % stride == 0) {
      EXPECT_EQ(got.status().code(), StatusCode::kNotFound) << i;
      continue;
    }
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    EXPECT_TRUE(SameSegment(**got, segs[i]));
  }
}

// Direct I/O on the POSIX Env: payloads of 4 MiB and more go to the device without the page
// cache, starting on a 4 KiB boundary in the file (record format version 2); small records are
// buffered. Everything reads back exactly, through the catalog and through the recovery scan
// alone, and compaction keeps it.
TEST(DiskTierDirectTest, LargeRecordsAreBlockAlignedAndRecover) {
  TempDir tmp(".");  // the build directory's file system (/tmp may be tmpfs, without O_DIRECT)
  DiskTierOptions o;
  o.dir = tmp.path() + "/tier";
  o.sync = false;
  o.max_file_bytes = 24 << 20;
  const SegmentLayout big{2, 4, 128, 512, DType::kF32};  // 4 MiB payload
  const SegmentLayout small{2, 2, 64, 9, DType::kBF16};
  std::vector<Segment> segs;
  for (uint64_t i = 0; i < 24; ++i) segs.push_back(MakeSegment(i, 1000 + i, i % 4 == 0 ? big : small));
  {
    auto t = DiskTier::Open(o);
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    std::vector<const Segment*> batch;
    for (size_t i = 0; i < segs.size(); ++i) {
      if (i < 8) {
        ASSERT_TRUE((*t)->Put(segs[i]).ok());
      } else {
        batch.push_back(&segs[i]);
      }
    }
    size_t written = 0;
    ASSERT_TRUE((*t)->PutBatch(batch, &written).ok());
    EXPECT_EQ(written, batch.size());
    ExpectAllReadable(**t, segs);
  }
  // Where the big payloads landed: find each one's first bytes in the segment files.
  size_t aligned = 0, big_count = 0;
  for (const auto& e : std::filesystem::directory_iterator(o.dir)) {
    if (e.path().extension() != ".kvs") continue;
    std::ifstream in(e.path(), std::ios::binary);
    std::string file((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    for (const Segment& s : segs) {
      if (s.layout.num_tokens != big.num_tokens) continue;
      std::string_view head(reinterpret_cast<const char*>(s.payload->data()), 256);
      size_t at = file.find(head);
      if (at == std::string::npos) continue;
      ++big_count;
      if (at % 4096 == 0) ++aligned;
    }
  }
  EXPECT_EQ(big_count, 6u);
  if (DirectIoAvailable(o.dir)) {
    EXPECT_EQ(aligned, big_count);
  }

  // The scan alone (no catalog) finds every record; compaction keeps them.
  std::filesystem::remove(o.dir + "/catalog.sqlite");
  auto t = DiskTier::Open(o);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_TRUE((*t)->Recovery().catalog_rebuilt);
  EXPECT_EQ((*t)->Recovery().corrupt_records, 0u);
  DeleteSomeCompactAndCheck(**t, segs, 2);
  EXPECT_EQ((*t)->Stats().segments, 12u);
}

// Direct I/O for batches of small records: PutBatch writes them as one block-aligned buffer
// ended by a padding record (format version 2), after a padding record that moves the file to a
// block boundary. Reads, Verify, the recovery scan alone and compaction all see exactly the
// records (padding is never indexed, never reported as corrupt).
TEST(DiskTierDirectTest, SmallRecordBatchesAreCoalesced) {
  TempDir tmp(".");
  DiskTierOptions o;
  o.dir = tmp.path() + "/tier";
  o.sync = false;
  o.max_file_bytes = 4 << 20;
  const SegmentLayout small{2, 2, 64, 37, DType::kBF16};  // ~38 KiB payload, odd size
  std::vector<Segment> segs;
  for (uint64_t i = 0; i < 150; ++i) segs.push_back(MakeSegment(i, 500 + i, small));
  {
    auto t = DiskTier::Open(o);
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    ASSERT_TRUE((*t)->Put(segs[0]).ok());  // leaves the file off a block boundary
    for (size_t b = 1; b < segs.size(); b += 50) {
      std::vector<const Segment*> batch;
      for (size_t i = b; i < std::min(segs.size(), b + 50); ++i) batch.push_back(&segs[i]);
      size_t written = 0;
      ASSERT_TRUE((*t)->PutBatch(batch, &written).ok());
      EXPECT_EQ(written, batch.size());
    }
    ExpectAllReadable(**t, segs);
    EXPECT_EQ((*t)->Stats().segments, segs.size());
    // Padding records are the only bytes not in a live record (nothing was deleted yet).
    const TierStats st = (*t)->Stats();
    if (DirectIoAvailable(o.dir)) {
      EXPECT_GT(st.file_bytes, st.bytes);
    } else {
      EXPECT_EQ(st.file_bytes, st.bytes);
    }
  }
  std::filesystem::remove(o.dir + "/catalog.sqlite");
  auto t = DiskTier::Open(o);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ((*t)->Recovery().corrupt_records, 0u);
  EXPECT_EQ((*t)->Recovery().torn_tails, 0u);
  EXPECT_EQ((*t)->Recovery().records_indexed, segs.size());  // padding records are not indexed
  DeleteSomeCompactAndCheck(**t, segs, 3);
}

}  // namespace
}  // namespace kvagent
