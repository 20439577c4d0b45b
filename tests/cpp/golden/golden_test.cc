// Golden compatibility tests: the files in tests/cpp/golden/ were written by golden_gen (from
// golden_inputs.h) with the code of their time. Today's code must read every one of them to the
// same values, and must still write the current versions byte for byte; a format or hashing change
// fails here instead of orphaning stored data.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "golden_inputs.h"
#include "kvagent/disk_tier.h"
#include "kvagent/env.h"
#include "store/catalog.h"
#include "store/record.h"
#include "temp_dir.h"

namespace kvagent {
namespace {

namespace fs = std::filesystem;
const fs::path kDir = KVAGENT_GOLDEN_DIR;

std::string ReadGolden(const std::string& name) {
  std::ifstream f(kDir / name, std::ios::binary);
  EXPECT_TRUE(f) << "missing golden file " << (kDir / name);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void ExpectSameInfo(const SegmentInfo& a, const SegmentInfo& b) {
  EXPECT_EQ(a.key, b.key);
  EXPECT_EQ(a.model, b.model);
  EXPECT_EQ(a.parent, b.parent);
  EXPECT_EQ(a.layout, b.layout);
  EXPECT_EQ(a.pre_rope, b.pre_rope);
  EXPECT_EQ(a.meta, b.meta);
  EXPECT_EQ(a.payload_bytes, b.payload_bytes);
  EXPECT_EQ(a.summary, b.summary);
}

// Everything but the payload, bit-exact; the payload within `tol` per element (0 = bit-exact).
void ExpectSegment(const Segment& got, const Segment& want, float tol) {
  ExpectSameInfo(InfoOf(got), InfoOf(want));
  EXPECT_EQ(got.tokens, want.tokens);
  EXPECT_EQ(got.positions, want.positions);
  ASSERT_TRUE(got.payload && got.payload->size() == want.payload->size());
  if (tol == 0) {
    EXPECT_EQ(0, std::memcmp(got.payload->data(), want.payload->data(), want.payload->size()));
    return;
  }
  for (size_t i = 0; i < want.layout.NumElements(); ++i) {
    ASSERT_NEAR(LoadAsF32(got.payload->data(), got.layout.dtype, i), LoadAsF32(want.payload->data(), want.layout.dtype, i),
                tol)
        << "element " << i;
  }
}

TEST(GoldenTest, ModelSpec) {
  const std::string bytes = ReadGolden("model_spec.bin");
  auto spec = ModelSpec::Deserialize(bytes);
  ASSERT_TRUE(spec.ok()) << spec.status().ToString();
  EXPECT_EQ(*spec, golden::Spec());
  EXPECT_EQ(golden::Spec().Serialize(), bytes);
}

TEST(GoldenTest, KeySummary) {
  for (auto [name, dtype] : {std::pair{"key_summary_f16.bin", DType::kF16}, std::pair{"key_summary_f32.bin", DType::kF32}}) {
    SCOPED_TRACE(name);
    const std::string bytes = ReadGolden(name);
    auto summary = KeySummary::Deserialize(bytes);
    ASSERT_TRUE(summary.ok()) << summary.status().ToString();
    EXPECT_EQ(*summary, golden::Summary());
    EXPECT_EQ(golden::Summary().Serialize(dtype), bytes);
  }
}

TEST(GoldenTest, SegmentInfo) {
  const std::string bytes = ReadGolden("segment_info.bin");
  SegmentInfo info;
  ASSERT_TRUE(disk::DecodeInfo(bytes, &info).ok());
  const SegmentInfo want = golden::Info(1);
  ExpectSameInfo(info, want);
  EXPECT_EQ(info.stored_bytes, want.stored_bytes);
  EXPECT_EQ(info.codec, want.codec);
  EXPECT_EQ(disk::EncodeInfo(want), bytes);
}

TEST(GoldenTest, Hashes) {
  std::map<std::string, std::string> file;
  std::istringstream in(ReadGolden("hashes.txt"));
  std::string name, hex;
  while (in >> name >> hex) file[name] = hex;
  const auto want = golden::Hashes();
  EXPECT_EQ(file.size(), want.size());
  for (const auto& [n, h] : want) EXPECT_EQ(file[n], h.ToHex()) << n;
  // Spot values in the source too, so regenerating hashes.txt alone cannot hide a change.
  EXPECT_EQ(file["memory_key"], "926226ed7a3644cec34a765f42c74d6a");
  EXPECT_EQ(file["prefix_key_first"], "30eec76213fa18c86a4637015bb4c697");
}

class GoldenRecordsTest : public ::testing::TestWithParam<int> {};

TEST_P(GoldenRecordsTest, ReadWithTodaysCode) {
  const int version = GetParam();
  const std::string bytes = ReadGolden("records_v" + std::to_string(version) + ".kvs");
  {
    disk::RecordHeader h;
    ASSERT_TRUE(disk::DecodeHeader(std::as_bytes(std::span<const char>(bytes.data(), disk::kHeaderSize)), &h).ok());
    uint16_t v;
    std::memcpy(&v, bytes.data() + 4, 2);
    EXPECT_EQ(v, version);
  }
  auto env = NewMemEnv();
  ASSERT_TRUE(env->CreateDirs("/g").ok());
  ASSERT_TRUE(WriteStringToFile(env.get(), bytes, "/g/segments-000001.kvs", false).ok());
  DiskTierOptions o;
  o.dir = "/g";
  o.env = env.get();
  auto tier = DiskTier::Open(o);
  ASSERT_TRUE(tier.ok()) << tier.status().ToString();
  RecoveryReport rep = (*tier)->Recovery();
  EXPECT_EQ(rep.corrupt_records, 0u);
  EXPECT_EQ(rep.torn_tails, 0u);
  std::vector<Hash128> keys;
  for (const SegmentInfo& i : (*tier)->List({})) keys.push_back(i.key);
  const Segment s0 = golden::MakeSegment(0), s1 = golden::MakeSegment(1, DType::kF16, 5),
                s2 = golden::MakeSegment(2, DType::kBF16);
  EXPECT_EQ(keys, (std::vector<Hash128>{s0.key, s1.key, s2.key}));
  EXPECT_FALSE((*tier)->Contains(golden::MakeSegment(golden::kDeletedSegment).key));
  for (auto [want, tol] : {std::pair{&s0, 0.0f}, std::pair{&s1, 0.02f}, std::pair{&s2, 0.0f}}) {
    auto got = (*tier)->Get(want->key, golden::kModel);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    ExpectSegment(**got, *want, tol);
  }
  auto info = (*tier)->Info(s1.key);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->codec, static_cast<uint8_t>(CodecKind::kInt8));
  // Today's encoder still produces these bytes (the version field aside, for version 1).
  EXPECT_TRUE(golden::RecordsFile(static_cast<uint16_t>(version)) == bytes);
}

INSTANTIATE_TEST_SUITE_P(Versions, GoldenRecordsTest, ::testing::Values(1, 2));

// A POSIX disk tier with its SQLite catalog: Open must take the records from the catalog (no
// rescan) and serve them.
TEST(GoldenTest, StoreWithCatalog) {
  testing::TempDir dir;
  for (const char* name : {"catalog.sqlite", "segments-000001.kvs"})
    fs::copy_file(kDir / "store" / name, fs::path(dir.path()) / name);
  {
    auto cat = disk::Catalog::Open(dir.path() + "/catalog.sqlite");
    ASSERT_TRUE(cat.ok()) << cat.status().ToString();
    std::vector<disk::CatalogEntry> entries;
    std::map<uint64_t, uint64_t> ends;
    ASSERT_TRUE((*cat)->Load(&entries, &ends).ok());
    ASSERT_EQ(entries.size(), 2u);
    std::map<Hash128, SegmentInfo> by_key;
    for (const auto& e : entries) {
      by_key[e.info.key] = e.info;
      EXPECT_EQ(e.loc.file_no, 1u);
      EXPECT_EQ(e.loc.codec, CodecKind::kRaw);
    }
    for (int n : {0, 2}) ExpectSameInfo(by_key[golden::MakeSegment(n).key], InfoOf(golden::MakeSegment(n)));
    EXPECT_EQ(ends.at(1), fs::file_size(kDir / "store" / "segments-000001.kvs"));
  }
  DiskTierOptions o;
  o.dir = dir.path();
  auto tier = DiskTier::Open(o);
  ASSERT_TRUE(tier.ok()) << tier.status().ToString();
  RecoveryReport rep = (*tier)->Recovery();
  EXPECT_FALSE(rep.catalog_rebuilt);
  EXPECT_EQ(rep.records_indexed, 0u);
  EXPECT_EQ(rep.corrupt_records, 0u);
  std::vector<Hash128> keys;
  for (const SegmentInfo& i : (*tier)->List({})) keys.push_back(i.key);
  EXPECT_EQ(keys, (std::vector<Hash128>{golden::MakeSegment(0).key, golden::MakeSegment(2).key}));
  EXPECT_FALSE((*tier)->Contains(golden::MakeSegment(4).key));
  for (int n : {0, 2}) {
    auto got = (*tier)->Get(golden::MakeSegment(n).key, golden::kModel);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    ExpectSegment(**got, golden::MakeSegment(n), 0);
  }
}

}  // namespace
}  // namespace kvagent
