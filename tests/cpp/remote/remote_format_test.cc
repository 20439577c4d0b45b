// Remote tier key schema, value format (golden) and URL parsing; no server needed.
#include <gtest/gtest.h>
#include <stdlib.h>

#include "kvagent/remote_tier.h"
#include "store/store_test_util.h"

namespace kvagent {
namespace {

using testing::MakeSegment;
using testing::TestKey;
using testing::TestModel;

TEST(RedisUrlTest, ParsesEveryPart) {
  StatusOr<RedisUrl> u = RedisUrl::Parse("redis://alice:p%40ss%2Fw@example.org:7000/3");
  ASSERT_TRUE(u.ok()) << u.status().ToString();
  EXPECT_EQ(u->host, "example.org");
  EXPECT_EQ(u->port, 7000);
  EXPECT_EQ(u->user, "alice");
  EXPECT_EQ(u->password, "p@ss/w");
  EXPECT_EQ(u->db, 3);
  EXPECT_EQ(u->Redacted(), "redis://alice:***@example.org:7000/3");
  EXPECT_EQ(u->Redacted().find("p@ss"), std::string::npos);

  u = RedisUrl::Parse("redis://[::1]:6380");
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->host, "::1");
  EXPECT_EQ(u->port, 6380);
  u = RedisUrl::Parse("redis://secret@h");
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->user, "");
  EXPECT_EQ(u->password, "secret");
  EXPECT_EQ(u->port, 6379);
}

TEST(RedisUrlTest, RejectsBadUrlsWithoutEchoingThem) {
  for (const char* bad : {"http://h:1", "redis://", "redis://h:0", "redis://h:70000", "redis://h:x", "redis://h/x",
                          "redis://[::1", "redis://u:pw%zz@h", "redis://h:", "rediss://h:1"}) {
    StatusOr<RedisUrl> u = RedisUrl::Parse(bad);
    ASSERT_FALSE(u.ok()) << bad;
    EXPECT_EQ(u.status().code(), StatusCode::kInvalidArgument) << bad;
  }
  StatusOr<RedisUrl> u = RedisUrl::Parse("redis://u:topsecret@h:bad");
  ASSERT_FALSE(u.ok());
  EXPECT_EQ(u.status().ToString().find("topsecret"), std::string::npos);
}

TEST(RedisUrlTest, CredentialsFromEnvironmentWhenTheUrlHasNone) {
  ::setenv("KVAGENT_REDIS_USER", "envuser", 1);
  ::setenv("KVAGENT_REDIS_PASSWORD", "envpw", 1);
  StatusOr<RedisUrl> u = RedisUrl::Parse("redis://h:1");
  StatusOr<RedisUrl> v = RedisUrl::Parse("redis://urluser:urlpw@h:1");
  ::unsetenv("KVAGENT_REDIS_USER");
  ::unsetenv("KVAGENT_REDIS_PASSWORD");
  ASSERT_TRUE(u.ok() && v.ok());
  EXPECT_EQ(u->user, "envuser");
  EXPECT_EQ(u->password, "envpw");
  EXPECT_EQ(v->user, "urluser");
  EXPECT_EQ(v->password, "urlpw");
}

TEST(RemoteKeysTest, SchemaIsVersionedTaggedAndTenantPrefixed) {
  const Hash128 key{0x1111, 0x2222}, model{0x3333, 0x4444};
  EXPECT_EQ(RemoteMetaKey("team-a", model, key),
            "kva:v1:team-a:00000000000044440000000000003333:{00000000000022220000000000001111}:m");
  EXPECT_EQ(RemoteChunkKey("team-a", model, key, 7),
            "kva:v1:team-a:00000000000044440000000000003333:{00000000000022220000000000001111}:p:7");
  EXPECT_EQ(RedisAclPattern("team-a"), "~kva:v1:team-a:*");
  EXPECT_TRUE(ValidateNamespace("Team_a.1-x").ok());
  for (const char* bad : {"", "a:b", "a*", "a{b}", "a b", "a?", "a[b]"})
    EXPECT_EQ(ValidateNamespace(bad).code(), StatusCode::kInvalidArgument) << bad;
  EXPECT_FALSE(ValidateNamespace(std::string(65, 'a')).ok());
}

// Golden: the bytes of a metadata value for a fixed segment. A change here breaks every
// segment already in Redis: bump the schema version (kva:v1) instead.
TEST(RemoteFormatTest, GoldenMetadataValue) {
  auto s = MakeSegment(TestKey(5), 2, SegmentLayout{2, 1, 4, 3, DType::kF16});
  s->summary = "compressed-keys";
  const std::string v = EncodeRemoteMeta(*s, 4096);
  EXPECT_EQ(v.size(), 285u);  // 128 header + 129 metadata + 28 chunk table (one chunk)
  EXPECT_EQ(Checksum64(std::as_bytes(std::span<const char>(v.data(), v.size()))), 0xae11b185b5f0ece7u) << std::hex
      << Checksum64(std::as_bytes(std::span<const char>(v.data(), v.size())));
}

TEST(RemoteFormatTest, RoundTripAndEveryCorruptionIsDataLoss) {
  auto s = MakeSegment(TestKey(9), 1, SegmentLayout{3, 2, 8, 37, DType::kBF16});
  s->summary = "ck";
  const std::string v = EncodeRemoteMeta(*s, 4096);
  Segment d;
  RemoteChunkTable t;
  ASSERT_TRUE(DecodeRemoteMeta(v, s->key, s->model, &d, &t).ok());
  EXPECT_EQ(d.tokens, s->tokens);
  EXPECT_EQ(d.positions, s->positions);
  EXPECT_EQ(d.meta, s->meta);
  EXPECT_EQ(d.summary, "ck");
  EXPECT_EQ(d.layout, s->layout);
  EXPECT_EQ(t.chunk_bytes, 4096u);
  EXPECT_EQ(t.checksums.size(), (s->PayloadBytes() + 4095) / 4096);
  // Foreign: another key's or another model's value.
  EXPECT_EQ(DecodeRemoteMeta(v, TestKey(10), s->model, &d, &t).code(), StatusCode::kDataLoss);
  EXPECT_EQ(DecodeRemoteMeta(v, s->key, TestModel(1), &d, &t).code(), StatusCode::kDataLoss);
  // Every flipped byte and every truncation is caught.
  for (size_t i = 0; i < v.size(); ++i) {
    std::string bad = v;
    bad[i] ^= 0x20;
    EXPECT_EQ(DecodeRemoteMeta(bad, s->key, s->model, &d, &t).code(), StatusCode::kDataLoss) << "byte " << i;
  }
  for (size_t n : {size_t{0}, size_t{100}, v.size() - 1})
    EXPECT_EQ(DecodeRemoteMeta(v.substr(0, n), s->key, s->model, &d, &t).code(), StatusCode::kDataLoss) << n;
  EXPECT_EQ(DecodeRemoteMeta(v + "x", s->key, s->model, &d, &t).code(), StatusCode::kDataLoss);
}

}  // namespace
}  // namespace kvagent
