// The remote (Redis) tier through Store, against real redis-server processes: round trips,
// promotion, corrupt and foreign values, the fault matrix (down at open, kill -9 mid-write,
// restarted empty, paused, bounded queue) and tenancy through Redis ACLs.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "kvagent/remote_tier.h"
#include "kvagent/store.h"
#include "remote/redis_server.h"
#include "store/store_test_util.h"
#include "temp_dir.h"

namespace kvagent {
namespace {

using testing::CheckSegment;
using testing::MakeSegment;
using testing::RedisServer;
using testing::TempDir;
using testing::TestKey;
using testing::TestModel;

StoreOptions RemoteStore(const std::string& url, const std::string& ns = "test", const std::string& path = "") {
  StoreOptions o;
  o.path = path;
  o.remote.url = url;
  o.remote.ns = ns;
  o.remote.chunk_bytes = 4096;  // small: every test segment above 4 KiB spans several chunks
  o.remote.connect_timeout_ms = 200;
  o.remote.command_timeout_ms = 300;
  return o;
}

std::unique_ptr<Store> OpenOk(const StoreOptions& o) {
  StatusOr<std::unique_ptr<Store>> s = Store::Open(o);
  EXPECT_TRUE(s.ok()) << s.status().ToString();
  return s.ok() ? std::move(s).value() : nullptr;
}

// A segment of about `bytes` payload bytes (f32, 8 dims).
std::shared_ptr<Segment> Sized(uint64_t id, size_t bytes, int64_t version = 1) {
  return MakeSegment(TestKey(id), version, SegmentLayout{1, 1, 8, static_cast<int>(bytes / 64), DType::kF32});
}

// Polls `pred` for up to `ms` milliseconds.
template <typename Pred>
bool Eventually(Pred pred, int ms = 5000) {
  for (int i = 0; i < ms / 10; ++i) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return pred();
}

TEST(RemoteTierTest, AnotherStoreReadsWhatOneWroteAndPromotesIt) {
  RedisServer redis;
  auto a = OpenOk(RemoteStore(redis.url()));
  std::vector<std::shared_ptr<Segment>> segs;
  for (uint64_t id = 0; id < 12; ++id) segs.push_back(MakeSegment(id, 1));
  segs.push_back(Sized(100, 1 << 20));        // 256 chunks
  segs.push_back(Sized(101, 4096 * 3 + 64));  // a short last chunk
  for (auto& s : segs) ASSERT_TRUE(a->Put(s).ok());
  ASSERT_TRUE(a->FlushRemote(10000).ok());
  StoreStats as = a->Stats();
  EXPECT_TRUE(as.has_remote);
  EXPECT_TRUE(as.remote.connected);
  EXPECT_EQ(as.remote.tier.puts, segs.size());
  EXPECT_EQ(as.remote.queue_depth, 0u);

  auto b = OpenOk(RemoteStore(redis.url()));  // host tier only, empty
  for (auto& s : segs) {
    StatusOr<SegmentHandle> h = b->Get(s->key, s->model);
    ASSERT_TRUE(h.ok()) << h.status().ToString();
    EXPECT_EQ(CheckSegment(**h), "");
    EXPECT_EQ((*h)->meta, s->meta);
  }
  StoreStats bs = b->Stats();
  EXPECT_EQ(bs.remote.tier.hits, segs.size());
  EXPECT_EQ(bs.remote_promotions, segs.size());
  // Promoted: the second read is a host hit.
  ASSERT_TRUE(b->Get(segs[0]->key, segs[0]->model).ok());
  EXPECT_EQ(b->Stats().remote.tier.hits, segs.size());
  // Another model's reader is never served these segments: a mismatch with the promoted copy, a
  // miss remotely (the model is part of the remote key).
  EXPECT_EQ(b->Get(segs[1]->key, TestModel(1)).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(OpenOk(RemoteStore(redis.url()))->Get(segs[1]->key, TestModel(1)).status().code(), StatusCode::kNotFound);
  // The namespace's index rows, without payloads.
  auto c = OpenOk(RemoteStore(redis.url()));
  std::vector<SegmentInfo> rows = c->List(SegmentFilter{});
  EXPECT_EQ(rows.size(), segs.size());
  SegmentFilter one_session;
  one_session.session = segs[0]->meta.session;
  size_t expect = 0;
  for (auto& s : segs) expect += s->meta.session == one_session.session;
  EXPECT_EQ(c->List(one_session).size(), expect);
  // Info of a remote-only key: from the listed rows, and (a fresh store) found by SCAN.
  StatusOr<SegmentInfo> info = c->Info(segs[2]->key);
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  EXPECT_EQ(info->meta, segs[2]->meta);
  info = OpenOk(RemoteStore(redis.url()))->Info(segs[3]->key);
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  EXPECT_EQ(info->model, segs[3]->model);
  EXPECT_EQ(c->Info(TestKey(12345)).status().code(), StatusCode::kNotFound);
  // Another namespace sees nothing.
  EXPECT_TRUE(OpenOk(RemoteStore(redis.url(), "other"))->List(SegmentFilter{}).empty());
}

TEST(RemoteTierTest, WithDiskTierTheRemoteIsReadAfterADiskMiss) {
  RedisServer redis;
  TempDir da, db;
  auto a = OpenOk(RemoteStore(redis.url(), "test", da.path()));
  auto s = Sized(7, 64 << 10);
  ASSERT_TRUE(a->Put(s).ok());
  ASSERT_TRUE(a->FlushRemote(5000).ok());
  auto b = OpenOk(RemoteStore(redis.url(), "test", db.path()));
  StatusOr<SegmentHandle> h = b->Get(s->key, s->model);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_EQ(CheckSegment(**h), "");
  // Deleting in A removes the shared copy.
  ASSERT_TRUE(a->Delete(s->key).ok());
  ASSERT_TRUE(a->FlushRemote(5000).ok());
  EXPECT_EQ(OpenOk(RemoteStore(redis.url()))->Get(s->key, s->model).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(redis.Run({"DBSIZE"}), "INT:0");
}

TEST(RemoteTierTest, AQueuedDeleteHidesTheServersCopy) {
  RedisServer redis;
  auto a = OpenOk(RemoteStore(redis.url()));  // host tier only
  auto s = Sized(1, 16 << 10);
  ASSERT_TRUE(a->Put(s).ok());
  ASSERT_TRUE(a->FlushRemote(5000).ok());
  redis.Pause();  // the delete stays queued
  ASSERT_TRUE(a->Delete(s->key).ok());
  EXPECT_EQ(a->Get(s->key, s->model).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(a->Stats().host.segments, 0u);
  redis.Resume();
  ASSERT_TRUE(a->FlushRemote(10000).ok());
  EXPECT_EQ(redis.Run({"DBSIZE"}), "INT:0");
}

TEST(RemoteTierTest, CorruptAndForeignValuesAreDataLossNeverServed) {
  RedisServer redis;
  auto a = OpenOk(RemoteStore(redis.url()));
  auto s1 = Sized(1, 16 << 10), s2 = Sized(2, 16 << 10);
  ASSERT_TRUE(a->Put(s1).ok());
  ASSERT_TRUE(a->Put(s2).ok());
  ASSERT_TRUE(a->FlushRemote(5000).ok());
  // A flipped byte in a payload chunk.
  const std::string chunk = RemoteChunkKey("test", s1->model, s1->key, 2);
  ASSERT_EQ(redis.Run({"SETRANGE", chunk, "100", "X"}), "INT:4096");
  // A foreign value: s1's metadata copied under s2's key.
  const std::string m1 = redis.Run({"GET", RemoteMetaKey("test", s1->model, s1->key)});
  ASSERT_EQ(redis.Run({"SET", RemoteMetaKey("test", s2->model, s2->key), m1}), "OK");
  auto b = OpenOk(RemoteStore(redis.url()));
  EXPECT_EQ(b->Get(s1->key, s1->model).status().code(), StatusCode::kDataLoss);
  EXPECT_EQ(b->Get(s2->key, s2->model).status().code(), StatusCode::kDataLoss);
  // A missing chunk, and a value of the wrong type.
  auto s3 = Sized(3, 16 << 10);
  ASSERT_TRUE(a->Put(s3).ok());
  ASSERT_TRUE(a->FlushRemote(5000).ok());
  ASSERT_EQ(redis.Run({"DEL", RemoteChunkKey("test", s3->model, s3->key, 3)}), "INT:1");
  EXPECT_EQ(b->Get(s3->key, s3->model).status().code(), StatusCode::kDataLoss);
  ASSERT_EQ(redis.Run({"DEL", RemoteMetaKey("test", s3->model, s3->key)}), "INT:1");
  ASSERT_EQ(redis.Run({"LPUSH", RemoteMetaKey("test", s3->model, s3->key), "x"}), "INT:1");
  EXPECT_EQ(b->Get(s3->key, s3->model).status().code(), StatusCode::kDataLoss);
  EXPECT_EQ(b->Stats().remote.tier.corrupt_records, 4u);
  EXPECT_EQ(b->Stats().host.segments, 0u);  // nothing corrupt was promoted
  // The writer's local copies are untouched.
  for (auto& s : {s1, s2, s3}) EXPECT_EQ(CheckSegment(**a->Get(s->key, s->model)), "");
}

TEST(RemoteTierTest, ServerDownAtOpenThenUpLater) {
  RedisServer redis;
  redis.Kill();
  auto a = OpenOk(RemoteStore(redis.url()));
  ASSERT_NE(a, nullptr);
  EXPECT_FALSE(a->Stats().remote.connected);
  auto s = Sized(1, 32 << 10);
  ASSERT_TRUE(a->Put(s).ok());
  StatusOr<SegmentHandle> h = a->Get(s->key, s->model);
  ASSERT_TRUE(h.ok());
  // A miss is a plain NotFound while the server is away.
  EXPECT_EQ(a->Get(TestKey(99), TestModel()).status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(a->List(SegmentFilter{}).size() == 1);
  // The writer tried and failed (Open's connection attempt was the first error).
  ASSERT_TRUE(Eventually([&] { return a->Stats().remote.errors >= 2; }));
  redis.Start();
  // The queued write is retried once the server is back.
  ASSERT_TRUE(a->FlushRemote(10000).ok());
  StoreStats st = a->Stats();
  EXPECT_TRUE(st.remote.connected);
  EXPECT_GT(st.remote.errors, 0u);
  EXPECT_GT(st.remote.retries, 0u);
  EXPECT_EQ(st.remote.dropped, 0u);
  EXPECT_EQ(CheckSegment(**OpenOk(RemoteStore(redis.url()))->Get(s->key, s->model)), "");
}

TEST(RemoteTierTest, KillMinus9DuringAWriteBurstLosesNothingLocally) {
  RedisServer redis;
  TempDir dir;
  auto a = OpenOk(RemoteStore(redis.url(), "test", dir.path()));
  std::vector<std::shared_ptr<Segment>> segs;
  std::thread killer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    redis.Kill();
  });
  for (uint64_t id = 0; id < 200; ++id) {
    segs.push_back(Sized(id, 64 << 10));
    ASSERT_TRUE(a->Put(segs.back()).ok());  // never blocks on or fails for the remote
  }
  killer.join();
  for (auto& s : segs) {
    StatusOr<SegmentHandle> h = a->Get(s->key, s->model);
    ASSERT_TRUE(h.ok()) << h.status().ToString();
    EXPECT_EQ(CheckSegment(**h), "");
  }
  ASSERT_TRUE(a->Flush().ok());
  // Restarted empty: what is still queued goes out; everything acknowledged is still local.
  redis.Start();
  Status f = a->FlushRemote(20000);
  EXPECT_TRUE(f.ok() || f.code() == StatusCode::kUnavailable) << f.ToString();
  StoreStats st = a->Stats();
  EXPECT_EQ(st.remote.queue_depth, 0u);
  EXPECT_GT(st.remote.errors, 0u);
  auto late = OpenOk(RemoteStore(redis.url()));
  auto s = Sized(500, 64 << 10);
  ASSERT_TRUE(a->Put(s).ok());
  ASSERT_TRUE(a->FlushRemote(5000).ok());
  EXPECT_EQ(CheckSegment(**late->Get(s->key, s->model)), "");
  a.reset();
  auto reopened = OpenOk(RemoteStore(redis.url(), "test", dir.path()));
  for (auto& seg : segs) EXPECT_TRUE(reopened->Get(seg->key, seg->model).ok());
}

TEST(RemoteTierTest, RestartedEmptyIsAMissAndLocalTiersServe) {
  RedisServer redis;
  auto a = OpenOk(RemoteStore(redis.url()));
  auto b = OpenOk(RemoteStore(redis.url()));
  auto s = Sized(1, 16 << 10), t = Sized(2, 16 << 10);
  ASSERT_TRUE(a->Put(s).ok());
  ASSERT_TRUE(a->Put(t).ok());
  ASSERT_TRUE(a->FlushRemote(5000).ok());
  ASSERT_TRUE(b->Get(s->key, s->model).ok());  // b promotes s; t stays remote only
  redis.Restart();
  EXPECT_TRUE(b->Get(s->key, s->model).ok());
  EXPECT_EQ(b->Get(t->key, t->model).status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(a->Get(t->key, t->model).ok());
  // Reconnected: new writes reach the new server.
  auto u = Sized(3, 16 << 10);
  ASSERT_TRUE(a->Put(u).ok());
  ASSERT_TRUE(a->FlushRemote(5000).ok());
  EXPECT_TRUE(b->Get(u->key, u->model).ok());
}

TEST(RemoteTierTest, PausedServerTimesOutFastAndWritesCatchUp) {
  RedisServer redis;
  auto a = OpenOk(RemoteStore(redis.url()));
  auto s = Sized(1, 16 << 10);
  ASSERT_TRUE(a->Put(s).ok());
  ASSERT_TRUE(a->FlushRemote(5000).ok());
  redis.Pause();
  auto t = Sized(2, 16 << 10);
  auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(a->Put(t).ok());
  EXPECT_TRUE(a->Get(s->key, s->model).ok());
  EXPECT_EQ(a->Get(TestKey(99), TestModel()).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(a->Get(TestKey(98), TestModel()).status().code(), StatusCode::kNotFound);
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(ms, 1500);  // one command timeout (300 ms), then the backoff answers at once
  EXPECT_EQ(a->FlushRemote(200).code(), StatusCode::kDeadlineExceeded);
  redis.Resume();
  ASSERT_TRUE(a->FlushRemote(10000).ok());
  EXPECT_TRUE(OpenOk(RemoteStore(redis.url()))->Get(t->key, t->model).ok());
}

TEST(RemoteTierTest, FullQueueDropsRemoteWritesNeverLocalOnes) {
  RedisServer redis;
  StoreOptions o = RemoteStore(redis.url());
  o.remote.write_queue_limit = 4;
  o.remote.max_attempts = 2;
  auto a = OpenOk(o);
  redis.Pause();
  std::vector<std::shared_ptr<Segment>> segs;
  for (uint64_t id = 0; id < 20; ++id) {
    segs.push_back(Sized(id, 8 << 10));
    ASSERT_TRUE(a->Put(segs.back()).ok());
  }
  // At most the limit queued plus one batch the writer holds (a batch takes at most 4 here).
  StoreStats st = a->Stats();
  EXPECT_LE(st.remote.queue_depth, 8u);
  EXPECT_GE(st.remote.dropped, 12u);
  for (auto& s : segs) EXPECT_TRUE(a->Get(s->key, s->model).ok());
  redis.Resume();
  // Out of attempts or sent: either way the queue empties and every write is accounted for.
  Status f = a->FlushRemote(10000);
  EXPECT_TRUE(f.ok() || f.code() == StatusCode::kUnavailable) << f.ToString();
  st = a->Stats();
  EXPECT_EQ(st.remote.queue_depth, 0u);
  EXPECT_EQ(st.remote.tier.puts + st.remote.dropped, segs.size());
}

TEST(RemoteTierTest, TenantsAreSeparatedByRedisAcls) {
  RedisServer redis;
  for (const char* t : {"alice", "bob"})
    ASSERT_EQ(redis.Run({"ACL", "SETUSER", t, "on", std::string(">pw-") + t, "resetkeys", RedisAclPattern(t), "+@all"}),
              "OK");
  auto alice = OpenOk(RemoteStore(redis.url("alice:pw-alice"), "alice"));
  auto s = Sized(1, 16 << 10);
  ASSERT_TRUE(alice->Put(s).ok());
  ASSERT_TRUE(alice->FlushRemote(5000).ok());
  // Bob's credentials on Alice's namespace: refused at open, by Redis.
  StatusOr<std::unique_ptr<Store>> bob_as_alice = Store::Open(RemoteStore(redis.url("bob:pw-bob"), "alice"));
  ASSERT_FALSE(bob_as_alice.ok());
  EXPECT_EQ(bob_as_alice.status().code(), StatusCode::kPermissionDenied);
  EXPECT_NE(bob_as_alice.status().ToString().find("namespace"), std::string::npos);
  // Redis itself denies Bob reading or writing Alice's keys.
  auto bob = OpenOk(RemoteStore(redis.url("bob:pw-bob"), "bob"));
  EXPECT_EQ(bob->Get(s->key, s->model).status().code(), StatusCode::kNotFound);
  {
    redisContext* c = redisConnect("127.0.0.1", redis.port());
    ASSERT_TRUE(c && !c->err);
    auto* r = static_cast<redisReply*>(redisCommand(c, "AUTH bob pw-bob"));
    ASSERT_EQ(r->type, REDIS_REPLY_STATUS);
    freeReplyObject(r);
    const std::string meta = RemoteMetaKey("alice", s->model, s->key);
    r = static_cast<redisReply*>(redisCommand(c, "GET %s", meta.c_str()));
    ASSERT_EQ(r->type, REDIS_REPLY_ERROR);
    EXPECT_EQ(std::string(r->str).rfind("NOPERM", 0), 0u) << r->str;
    freeReplyObject(r);
    r = static_cast<redisReply*>(redisCommand(c, "SET %s x", meta.c_str()));
    ASSERT_EQ(r->type, REDIS_REPLY_ERROR);
    EXPECT_EQ(std::string(r->str).rfind("NOPERM", 0), 0u) << r->str;
    freeReplyObject(r);
    redisFree(c);
  }
  // Wrong password: a clear error at open that does not repeat the password.
  StatusOr<std::unique_ptr<Store>> wrong = Store::Open(RemoteStore(redis.url("alice:not-it"), "alice"));
  ASSERT_FALSE(wrong.ok());
  EXPECT_EQ(wrong.status().code(), StatusCode::kPermissionDenied);
  EXPECT_NE(wrong.status().ToString().find("credentials"), std::string::npos);
  EXPECT_EQ(wrong.status().ToString().find("not-it"), std::string::npos);
  // Alice's data is intact.
  EXPECT_EQ(CheckSegment(**OpenOk(RemoteStore(redis.url("alice:pw-alice"), "alice"))->Get(s->key, s->model)), "");
}

TEST(RemoteTierTest, BadRemoteOptionsFailAtOpen) {
  StoreOptions o = RemoteStore("redis://127.0.0.1:1", "a:b");
  EXPECT_EQ(Store::Open(o).status().code(), StatusCode::kInvalidArgument);
  o = RemoteStore("redis://127.0.0.1:1");
  o.remote.chunk_bytes = 100;
  EXPECT_EQ(Store::Open(o).status().code(), StatusCode::kInvalidArgument);
  o = RemoteStore("http://127.0.0.1:1");
  EXPECT_EQ(Store::Open(o).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvagent
