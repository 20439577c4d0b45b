// The Redis remote tier (kvagent/remote_tier.h) on hiredis' blocking API.
#include "kvagent/remote_tier.h"

#include <hiredis/hiredis.h>
#include <sys/time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace kvagent {

namespace {

struct ReplyDeleter {
  void operator()(redisReply* r) const { freeReplyObject(r); }
};
using Reply = std::unique_ptr<redisReply, ReplyDeleter>;

struct ContextDeleter {
  void operator()(redisContext* c) const { redisFree(c); }
};
using Context = std::unique_ptr<redisContext, ContextDeleter>;

timeval Millis(int ms) { return timeval{ms / 1000, (ms % 1000) * 1000}; }

// One command: arguments point into memory the caller keeps alive until the replies are read.
using Command = std::vector<std::string_view>;

bool IsError(const redisReply* r) { return r->type == REDIS_REPLY_ERROR; }
std::string_view Text(const redisReply* r) { return {r->str, r->len}; }

// The Status of an error reply. Redis' messages carry no credentials.
Status ReplyError(std::string_view err) {
  const std::string msg = "redis: " + std::string(err);
  if (err.starts_with("NOPERM") || err.starts_with("WRONGPASS") || err.starts_with("NOAUTH"))
    return PermissionDeniedError(msg);
  if (err.starts_with("OOM")) return ResourceExhaustedError(msg);
  if (err.starts_with("WRONGTYPE")) return DataLossError(msg + " (a foreign value under a kv-agent key)");
  if (err.starts_with("LOADING") || err.starts_with("BUSY") || err.starts_with("MASTERDOWN") ||
      err.starts_with("MOVED") || err.starts_with("ASK") || err.starts_with("TRYAGAIN") ||
      err.starts_with("CLUSTERDOWN"))
    return UnavailableError(msg);
  return InternalError(msg);
}

// Status of a MULTI ... EXEC exchange: its replies are OK, QUEUED..., then EXEC's array. An error
// while queueing names the cause (EXEC then answers EXECABORT).
Status TransactionStatus(std::span<const Reply> replies) {
  for (const Reply& r : replies.first(replies.size() - 1))
    if (IsError(r.get())) return ReplyError(Text(r.get()));
  const redisReply* exec = replies.back().get();
  if (IsError(exec)) return ReplyError(Text(exec));
  if (exec->type != REDIS_REPLY_ARRAY) return UnavailableError("redis: transaction aborted");
  for (size_t i = 0; i < exec->elements; ++i)
    if (IsError(exec->element[i])) return ReplyError(Text(exec->element[i]));
  return Status::Ok();
}

// Sends `commands` in one pipeline and reads every reply. Unavailable (connection broken or
// timed out) if any reply is missing; error replies are returned as replies.
Status Pipeline(redisContext* c, std::span<const Command> commands, std::vector<Reply>* replies) {
  std::vector<const char*> argv;
  std::vector<size_t> lens;
  for (const Command& cmd : commands) {
    argv.clear();
    lens.clear();
    for (std::string_view a : cmd) {
      argv.push_back(a.data());
      lens.push_back(a.size());
    }
    if (redisAppendCommandArgv(c, static_cast<int>(argv.size()), argv.data(), lens.data()) != REDIS_OK)
      return UnavailableError(std::string("redis: ") + c->errstr);
  }
  replies->clear();
  for (size_t i = 0; i < commands.size(); ++i) {
    void* r = nullptr;
    if (redisGetReply(c, &r) != REDIS_OK || r == nullptr) return UnavailableError(std::string("redis: ") + c->errstr);
    replies->emplace_back(static_cast<redisReply*>(r));
  }
  return Status::Ok();
}

// Connections with reconnect backoff; one connection per concurrent user.
class ConnectionPool {
 public:
  ConnectionPool(RedisUrl url, const RemoteOptions& options, Env* env)
      : url_(std::move(url)), options_(options), env_(env) {}

  struct Lease {
    Context context;
    bool reused = false;
  };

  // An idle connection, else a new one unless the last failure is more recent than the backoff
  // (Unavailable at once). PermissionDenied when the server rejects the credentials.
  StatusOr<Lease> Acquire() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!idle_.empty()) {
        Lease l{std::move(idle_.back()), true};
        idle_.pop_back();
        return l;
      }
      if (env_->NowMicros() < retry_at_us_)
        return UnavailableError("redis at " + url_.Redacted() + " unreachable (retrying after a backoff): " + last_error_);
    }
    StatusOr<Context> c = Connect();
    if (!c.ok()) {
      Failed(c.status().message());
      return c.status();
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      failures_ = 0;
    }
    connected_.store(true, std::memory_order_relaxed);
    return Lease{std::move(c).value(), false};
  }

  // Returns a connection: kept when healthy, else closed (the next Acquire reconnects).
  void Release(Lease lease, bool healthy) {
    if (healthy) {
      std::lock_guard<std::mutex> lock(mu_);
      idle_.push_back(std::move(lease.context));
      return;
    }
    Failed(lease.context->errstr);
    lease.context.reset();
    // A broken connection means the others (opened before the same fault) are likely stale.
    std::lock_guard<std::mutex> lock(mu_);
    idle_.clear();
  }

  void Clear() {
    std::lock_guard<std::mutex> lock(mu_);
    idle_.clear();
  }
  bool connected() const { return connected_.load(std::memory_order_relaxed); }
  uint64_t errors() const { return errors_.load(std::memory_order_relaxed); }
  uint64_t retry_at_us() {
    std::lock_guard<std::mutex> lock(mu_);
    return retry_at_us_;
  }
  const RedisUrl& url() const { return url_; }

 private:
  StatusOr<Context> Connect() {
    Context c(redisConnectWithTimeout(url_.host.c_str(), url_.port, Millis(options_.connect_timeout_ms)));
    if (!c) return ResourceExhaustedError("cannot allocate a redis context");
    if (c->err) return UnavailableError("cannot connect to redis at " + url_.Redacted() + ": " + c->errstr);
    redisSetTimeout(c.get(), Millis(options_.command_timeout_ms));
    redisEnableKeepAlive(c.get());
    std::vector<Command> setup;
    if (!url_.password.empty()) {
      if (url_.user.empty()) setup.push_back({"AUTH", url_.password});
      else setup.push_back({"AUTH", url_.user, url_.password});
    }
    const std::string db = std::to_string(url_.db);
    if (url_.db != 0) setup.push_back({"SELECT", db});
    std::vector<Reply> replies;
    for (const Command& cmd : setup) {
      const Status sent = Pipeline(c.get(), std::span<const Command>(&cmd, 1), &replies);
      if (!sent.ok()) return UnavailableError("redis at " + url_.Redacted() + ": " + std::string(sent.message()));
      if (IsError(replies[0].get())) {
        Status s = ReplyError(Text(replies[0].get()));
        if (cmd[0] == "AUTH")
          return PermissionDeniedError("redis at " + url_.Redacted() + " rejected the credentials: " + std::string(s.message()));
        return s;
      }
    }
    return c;
  }

  void Failed(std::string_view why) {
    errors_.fetch_add(1, std::memory_order_relaxed);
    connected_.store(false, std::memory_order_relaxed);
    std::lock_guard<std::mutex> lock(mu_);
    ++failures_;
    const uint64_t backoff = std::min<uint64_t>(50'000ull << std::min(failures_ - 1, 5), 1'000'000);
    retry_at_us_ = env_->NowMicros() + backoff;
    last_error_ = std::string(why);
  }

  const RedisUrl url_;
  const RemoteOptions options_;
  Env* const env_;
  std::mutex mu_;
  std::vector<Context> idle_;
  int failures_ = 0;
  uint64_t retry_at_us_ = 0;
  std::string last_error_;
  std::atomic<bool> connected_{false};
  std::atomic<uint64_t> errors_{0};
};

struct Op {
  SegmentHandle segment;  // null: a delete
  Hash128 key;
  Hash128 model;
  uint64_t seq = 0;
  int attempts = 0;
  uint64_t bytes() const { return segment ? segment->PayloadBytes() : 0; }
};

class RedisTier final : public RemoteTier {
 public:
  RedisTier(RedisUrl url, const RemoteOptions& options)
      : options_(options),
        env_(options.env ? options.env : Env::Default()),
        pool_(std::move(url), options, env_) {}
  ~RedisTier() override { Close(0).IgnoreError(); }

  // Connects once; an unreachable server is fine, a rejected user or namespace is not.
  Status Start() {
    StatusOr<ConnectionPool::Lease> lease = pool_.Acquire();
    if (lease.ok()) {
      // The user must be allowed this namespace's keys: ask for one (absent) key of it.
      const std::string probe = RemoteKeyPrefix(options_.ns) + "probe";
      std::vector<Command> cmd = {{"EXISTS", probe}};
      std::vector<Reply> replies;
      Status s = Pipeline(lease->context.get(), cmd, &replies);
      if (s.ok() && IsError(replies[0].get())) {
        Status e = ReplyError(Text(replies[0].get()));
        if (e.code() == StatusCode::kPermissionDenied)
          return PermissionDeniedError("redis at " + pool_.url().Redacted() + ": this user may not use namespace \"" +
                                       options_.ns + "\" (keys " + RemoteKeyPrefix(options_.ns) + "*): " +
                                       std::string(e.message()));
      }
      pool_.Release(std::move(lease).value(), s.ok());
    } else if (lease.status().code() == StatusCode::kPermissionDenied) {
      return lease.status();
    }
    writer_ = std::thread([this] { WriterLoop(); });
    return Status::Ok();
  }

  Status Put(const Segment& segment) override {
    KVAGENT_RETURN_IF_ERROR(segment.Validate());
    std::vector<const Segment*> one = {&segment};
    std::vector<Status> results;
    KVAGENT_RETURN_IF_ERROR(WriteBatch(one, &results));
    return results[0];
  }

  bool Enqueue(SegmentHandle segment) override {
    if (!segment) return false;
    const Hash128 key = segment->key, model = segment->model;
    return Push(Op{std::move(segment), key, model});
  }
  bool EnqueueDelete(const Hash128& key, const Hash128& model) override { return Push(Op{nullptr, key, model}); }

  Status Flush(int timeout_ms) override {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t target = next_seq_ - 1;
    const uint64_t dropped_before = dropped_;
    const bool done = cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms), [&] { return OldestPendingLocked() > target; });
    if (!done)
      return DeadlineExceededError("remote writes still queued after " + std::to_string(timeout_ms) + " ms (" +
                                   std::to_string(queue_.size() + in_flight_) + " pending)");
    if (dropped_ != dropped_before)
      return UnavailableError(std::to_string(dropped_ - dropped_before) + " remote writes were dropped");
    return Status::Ok();
  }

  StatusOr<SegmentHandle> Get(const Hash128& key, const Hash128& model, const PayloadAllocator& allocate) override {
    // A delete of the key not yet applied hides the server's copy (no resurrection).
    if (DeletePending(key)) return NotFoundError("segment " + key.ToHex() + " was deleted");
    StatusOr<SegmentHandle> r = WithConnection<SegmentHandle>(
        [&](redisContext* c) { return ReadSegment(c, key, model, allocate); });
    if (r.ok()) {
      hits_.fetch_add(1, std::memory_order_relaxed);
      bytes_read_.fetch_add((*r)->PayloadBytes(), std::memory_order_relaxed);
    } else {
      misses_.fetch_add(1, std::memory_order_relaxed);
      if (r.status().code() == StatusCode::kDataLoss) corrupt_.fetch_add(1, std::memory_order_relaxed);
    }
    return r;
  }

  StatusOr<std::vector<SegmentInfo>> List(const SegmentFilter& filter) override {
    const std::string models = filter.model ? filter.model->ToHex() : std::string("*");
    return WithConnection<std::vector<SegmentInfo>>(
        [&](redisContext* c) { return ListWith(c, filter, models + ":*:m"); });
  }

  StatusOr<SegmentInfo> Info(const Hash128& key) override {
    {
      std::lock_guard<std::mutex> lock(rows_mu_);
      auto it = rows_.find(key);
      if (it != rows_.end()) return it->second;
    }
    SegmentFilter any;
    StatusOr<std::vector<SegmentInfo>> found = WithConnection<std::vector<SegmentInfo>>(
        [&](redisContext* c) { return ListWith(c, any, "*:{" + key.ToHex() + "}:m"); });
    KVAGENT_RETURN_IF_ERROR(found.status());
    if (found->empty()) return NotFoundError("segment " + key.ToHex() + " not in the remote tier");
    return found->front();
  }

  RemoteStats Stats() override {
    RemoteStats s;
    s.tier.hits = hits_.load(std::memory_order_relaxed);
    s.tier.misses = misses_.load(std::memory_order_relaxed);
    s.tier.corrupt_records = corrupt_.load(std::memory_order_relaxed);
    s.bytes_read = bytes_read_.load(std::memory_order_relaxed);
    s.errors = pool_.errors();
    s.connected = pool_.connected();
    std::lock_guard<std::mutex> lock(mu_);
    s.tier.puts = puts_;
    s.tier.bytes = bytes_written_;
    s.queue_depth = queue_.size() + in_flight_;
    s.dropped = dropped_;
    s.retries = retries_;
    return s;
  }

  const RemoteOptions& options() const override { return options_; }

  Status Close(int timeout_ms) override {
    Status flushed;
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (!writer_.joinable()) return Status::Ok();
    }
    if (timeout_ms > 0) flushed = Flush(timeout_ms);
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      dropped_ += queue_.size();
      queue_.clear();
      queued_bytes_ = 0;
      cv_.notify_all();
    }
    writer_.join();
    pool_.Clear();
    return flushed;
  }

 private:
  // Runs `fn` on a pooled connection. A reused connection that fails at once (a server restart
  // closed it) is replaced by a fresh one and `fn` runs once more.
  template <typename T, typename Fn>
  StatusOr<T> WithConnection(Fn fn) {
    for (int attempt = 0; attempt < 2; ++attempt) {
      KVAGENT_ASSIGN_OR_RETURN(ConnectionPool::Lease lease, pool_.Acquire());
      const bool reused = lease.reused;
      const uint64_t start = env_->NowMicros();
      StatusOr<T> r = fn(lease.context.get());
      const bool broken = lease.context->err != 0;
      pool_.Release(std::move(lease), !broken);
      if (!broken) return r;
      // A timeout is not retried: the server is slow or paused, and a retry would wait as long.
      const bool fast = env_->NowMicros() - start < static_cast<uint64_t>(options_.command_timeout_ms) * 500;
      if (!reused || !fast) return r;
    }
    return UnavailableError("redis: connection lost");
  }

  StatusOr<SegmentHandle> ReadSegment(redisContext* c, const Hash128& key, const Hash128& model,
                                      const PayloadAllocator& allocate) {
    const std::string meta_key = RemoteMetaKey(options_.ns, model, key);
    std::vector<Command> cmd = {{"GET", meta_key}};
    std::vector<Reply> replies;
    KVAGENT_RETURN_IF_ERROR(Pipeline(c, cmd, &replies));
    const redisReply* m = replies[0].get();
    if (m->type == REDIS_REPLY_NIL) return NotFoundError("segment " + key.ToHex() + " not in the remote tier");
    if (IsError(m)) return ReplyError(Text(m));
    if (m->type != REDIS_REPLY_STRING) return DataLossError("remote metadata of " + key.ToHex() + " is not a string");
    auto s = std::make_shared<Segment>();
    RemoteChunkTable table;
    KVAGENT_RETURN_IF_ERROR(
        DecodeRemoteMeta(Text(m), key, model, s.get(), &table).WithContext("remote segment " + key.ToHex()));
    const size_t total = s->PayloadBytes();
    StatusOr<std::shared_ptr<Buffer>> buf = allocate ? allocate(total) : Buffer::Allocate(total);
    KVAGENT_RETURN_IF_ERROR(buf.status());
    std::vector<std::string> chunk_keys;
    cmd.clear();
    for (uint32_t i = 0; i < table.checksums.size(); ++i)
      chunk_keys.push_back(RemoteChunkKey(options_.ns, model, key, i));
    for (const std::string& k : chunk_keys) cmd.push_back({"GET", k});
    KVAGENT_RETURN_IF_ERROR(Pipeline(c, cmd, &replies));
    for (uint32_t i = 0; i < replies.size(); ++i) {
      const redisReply* r = replies[i].get();
      if (IsError(r)) return ReplyError(Text(r));
      const size_t at = static_cast<size_t>(i) * table.chunk_bytes;
      const size_t want = std::min<size_t>(table.chunk_bytes, total - at);
      if (r->type != REDIS_REPLY_STRING || r->len != want ||
          Checksum64(std::as_bytes(std::span<const char>(r->str, r->len))) != table.checksums[i])
        return DataLossError("remote segment " + key.ToHex() + ": payload chunk " + std::to_string(i) +
                             (r->type == REDIS_REPLY_NIL ? " missing" : " corrupt (length or checksum)"));
      std::memcpy((*buf)->data() + at, r->str, want);
    }
    s->payload = std::move(buf).value();
    return SegmentHandle(std::move(s));
  }

  // Rows of the metadata keys matching RemoteKeyPrefix + `pattern` (remembered for Info).
  StatusOr<std::vector<SegmentInfo>> ListWith(redisContext* c, const SegmentFilter& filter, const std::string& pattern) {
    const std::string match = RemoteKeyPrefix(options_.ns) + pattern;
    std::vector<SegmentInfo> out;
    std::string cursor = "0";
    std::vector<Reply> replies;
    do {
      std::vector<Command> scan = {{"SCAN", cursor, "MATCH", match, "COUNT", "1000"}};
      KVAGENT_RETURN_IF_ERROR(Pipeline(c, scan, &replies));
      const redisReply* r = replies[0].get();
      if (IsError(r)) return ReplyError(Text(r));
      if (r->type != REDIS_REPLY_ARRAY || r->elements != 2) return InternalError("redis: unexpected SCAN reply");
      cursor = std::string(Text(r->element[0]));
      std::vector<std::string> keys;
      for (size_t i = 0; i < r->element[1]->elements; ++i) keys.emplace_back(Text(r->element[1]->element[i]));
      std::vector<Command> gets;
      for (const std::string& k : keys) gets.push_back({"GET", k});
      KVAGENT_RETURN_IF_ERROR(Pipeline(c, gets, &replies));
      for (size_t i = 0; i < keys.size(); ++i) {
        const redisReply* v = replies[i].get();
        if (v->type == REDIS_REPLY_NIL) continue;  // deleted since SCAN saw it
        if (IsError(v)) return ReplyError(Text(v));
        // kva:v1:<ns>:<model hex>:{<key hex>}:m
        const std::string_view name = std::string_view(keys[i]).substr(RemoteKeyPrefix(options_.ns).size());
        StatusOr<Hash128> model = name.size() == 32 + 2 + 32 + 3 ? Hash128::FromHex(name.substr(0, 32))
                                                                  : StatusOr<Hash128>(DataLossError("bad key"));
        StatusOr<Hash128> key = model.ok() ? Hash128::FromHex(name.substr(34, 32)) : model;
        Segment s;
        RemoteChunkTable table;
        if (!key.ok() || v->type != REDIS_REPLY_STRING || !DecodeRemoteMeta(Text(v), *key, *model, &s, &table).ok()) {
          corrupt_.fetch_add(1, std::memory_order_relaxed);
          continue;
        }
        SegmentInfo info = InfoOf(s);
        Remember(info);
        if (filter.Matches(info)) out.push_back(std::move(info));
      }
    } while (cursor != "0");
    return out;
  }

  // Sends `segments` as one pipeline of MULTI/EXEC blocks; results[i] is segment i's outcome.
  // Returns Unavailable (results unset) when the connection failed.
  Status WriteBatch(std::span<const Segment* const> segments, std::vector<Status>* results) {
    std::vector<std::string> names;  // keys and values the commands point into
    std::vector<size_t> ends;        // replies of segment i end before ends[i]
    names.reserve(segments.size() * 8);
    std::vector<Command> cmds;
    const std::string ttl = std::to_string(options_.ttl_seconds);
    // Every key, value and the TTL are owned here; `names` must not reallocate while commands point into it.
    size_t need = 0;
    for (const Segment* s : segments)
      need += 2 + (s->PayloadBytes() + options_.chunk_bytes - 1) / options_.chunk_bytes;
    names.reserve(need);
    auto set = [&](std::string_view k, std::string_view v) {
      if (options_.ttl_seconds > 0) cmds.push_back({"SET", k, v, "EX", ttl});
      else cmds.push_back({"SET", k, v});
    };
    for (const Segment* s : segments) {
      const std::string_view payload(reinterpret_cast<const char*>(s->payload->data()), s->PayloadBytes());
      cmds.push_back({"MULTI"});
      uint32_t i = 0;
      for (size_t at = 0; at < payload.size(); at += options_.chunk_bytes, ++i) {
        names.push_back(RemoteChunkKey(options_.ns, s->model, s->key, i));
        set(names.back(), payload.substr(at, options_.chunk_bytes));
      }
      names.push_back(RemoteMetaKey(options_.ns, s->model, s->key));
      names.push_back(EncodeRemoteMeta(*s, options_.chunk_bytes));
      set(names[names.size() - 2], names.back());
      cmds.push_back({"EXEC"});
      ends.push_back(cmds.size());
    }
    StatusOr<bool> sent = WithConnection<bool>([&](redisContext* c) -> StatusOr<bool> {
      std::vector<Reply> replies;
      KVAGENT_RETURN_IF_ERROR(Pipeline(c, cmds, &replies));
      results->clear();
      size_t begin = 0;
      for (size_t i = 0; i < segments.size(); ++i) {
        results->push_back(TransactionStatus(std::span<const Reply>(replies).subspan(begin, ends[i] - begin)));
        begin = ends[i];
      }
      return true;
    });
    if (!sent.ok()) return sent.status();
    for (size_t i = 0; i < segments.size(); ++i)
      if ((*results)[i].ok()) Remember(InfoOf(*segments[i]));
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < segments.size(); ++i) {
      if (!(*results)[i].ok()) continue;
      ++puts_;
      bytes_written_ += segments[i]->PayloadBytes();
    }
    return Status::Ok();
  }

  // Deletes the segment's metadata and chunks (the chunk count comes from its metadata).
  Status DeleteSegment(const Hash128& key, const Hash128& model) {
    StatusOr<bool> r = WithConnection<bool>([&](redisContext* c) -> StatusOr<bool> {
      const std::string meta_key = RemoteMetaKey(options_.ns, model, key);
      std::vector<Command> cmd = {{"GET", meta_key}};
      std::vector<Reply> replies;
      KVAGENT_RETURN_IF_ERROR(Pipeline(c, cmd, &replies));
      if (IsError(replies[0].get())) return ReplyError(Text(replies[0].get()));
      if (replies[0]->type == REDIS_REPLY_NIL) return true;
      Segment s;
      RemoteChunkTable table;
      // A corrupt metadata value still goes; its chunks (count unknown) expire or stay as garbage.
      const bool known = replies[0]->type == REDIS_REPLY_STRING &&
                         DecodeRemoteMeta(Text(replies[0].get()), key, model, &s, &table).ok();
      std::vector<std::string> keys = {meta_key};
      if (known)
        for (uint32_t i = 0; i < table.checksums.size(); ++i) keys.push_back(RemoteChunkKey(options_.ns, model, key, i));
      Command del = {"DEL"};
      for (const std::string& k : keys) del.push_back(k);
      std::vector<Command> tx = {{"MULTI"}, del, {"EXEC"}};
      KVAGENT_RETURN_IF_ERROR(Pipeline(c, tx, &replies));
      KVAGENT_RETURN_IF_ERROR(TransactionStatus(replies));
      return true;
    });
    if (r.ok()) {
      std::lock_guard<std::mutex> lock(rows_mu_);
      rows_.erase(key);
    }
    return r.status();
  }

  bool DeletePending(const Hash128& key) {
    std::lock_guard<std::mutex> lock(mu_);
    if (in_flight_delete_ && *in_flight_delete_ == key) return true;
    for (auto it = queue_.rbegin(); it != queue_.rend(); ++it)
      if (it->key == key) return it->segment == nullptr;
    return false;
  }

  void Remember(SegmentInfo info) {
    std::lock_guard<std::mutex> lock(rows_mu_);
    rows_.insert_or_assign(info.key, std::move(info));
  }

  bool Push(Op op) {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_ || queue_.size() >= options_.write_queue_limit ||
        queued_bytes_ + op.bytes() > options_.write_queue_bytes) {
      ++dropped_;
      return false;
    }
    op.seq = next_seq_++;
    queued_bytes_ += op.bytes();
    queue_.push_back(std::move(op));
    cv_.notify_all();
    return true;
  }

  // Seq of the oldest write not yet acknowledged or dropped (the queue is in seq order; failed
  // batches go back to its front).
  uint64_t OldestPendingLocked() const {
    if (in_flight_ > 0) return in_flight_first_seq_;
    return queue_.empty() ? next_seq_ : queue_.front().seq;
  }

  void WriterLoop() {
    constexpr size_t kBatchOps = 64;
    constexpr uint64_t kBatchBytes = 64ull << 20;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      // Waits out a connection backoff before sending (a failed send counts as an attempt).
      const uint64_t now = env_->NowMicros(), retry_at = pool_.retry_at_us();
      if (now < retry_at) {
        cv_.wait_for(lock, std::chrono::microseconds(retry_at - now), [&] { return stop_; });
        if (stop_) return;
      }
      std::vector<Op> batch;
      uint64_t bytes = 0;
      // Consecutive puts form a batch; a delete goes alone.
      while (!queue_.empty() && batch.size() < kBatchOps && (batch.empty() || bytes < kBatchBytes)) {
        if (!queue_.front().segment && !batch.empty()) break;
        bytes += queue_.front().bytes();
        batch.push_back(std::move(queue_.front()));
        queue_.pop_front();
        if (!batch.back().segment) break;
      }
      queued_bytes_ -= bytes;
      in_flight_ = batch.size();
      in_flight_first_seq_ = batch.front().seq;
      if (!batch.front().segment) in_flight_delete_ = batch.front().key;
      lock.unlock();
      std::vector<Status> results;
      Status sent;
      if (batch.front().segment) {
        std::vector<const Segment*> segments;
        for (const Op& op : batch) segments.push_back(op.segment.get());
        sent = WriteBatch(segments, &results);
      } else {
        sent = DeleteSegment(batch.front().key, batch.front().model);
        results.push_back(sent);
        if (sent.code() == StatusCode::kUnavailable) results.clear();
      }
      lock.lock();
      // Retry what failed for a reason that may pass (connection, server busy or out of memory),
      // in order, at the queue's front; a refusal (permission, bad data) is dropped at once.
      std::vector<Op> again;
      for (size_t i = 0; i < batch.size(); ++i) {
        Status s = results.empty() ? sent : results[i];
        if (s.ok()) continue;
        const bool transient = s.code() == StatusCode::kUnavailable || s.code() == StatusCode::kResourceExhausted;
        if (transient && ++batch[i].attempts < options_.max_attempts) {
          again.push_back(std::move(batch[i]));
        } else {
          ++dropped_;
          last_drop_ = s;
        }
      }
      if (!again.empty()) ++retries_;
      for (auto it = again.rbegin(); it != again.rend(); ++it) {
        queued_bytes_ += it->bytes();
        queue_.push_front(std::move(*it));
      }
      in_flight_ = 0;
      in_flight_delete_.reset();
      cv_.notify_all();
    }
  }

  const RemoteOptions options_;
  Env* const env_;
  ConnectionPool pool_;

  std::atomic<uint64_t> hits_{0}, misses_{0}, corrupt_{0}, bytes_read_{0};

  std::mutex rows_mu_;
  std::unordered_map<Hash128, SegmentInfo, Hash128Hasher> rows_;  // index rows seen (List, Put)

  std::mutex mu_;  // guards everything below
  std::condition_variable cv_;
  std::deque<Op> queue_;
  uint64_t queued_bytes_ = 0;
  uint64_t next_seq_ = 1;
  size_t in_flight_ = 0;
  uint64_t in_flight_first_seq_ = 0;
  std::optional<Hash128> in_flight_delete_;  // the key of the delete being sent
  uint64_t puts_ = 0, bytes_written_ = 0, dropped_ = 0, retries_ = 0;
  Status last_drop_;
  bool stop_ = false;
  std::thread writer_;
};

}  // namespace

StatusOr<std::unique_ptr<RemoteTier>> RemoteTier::Open(const RemoteOptions& options) {
  KVAGENT_ASSIGN_OR_RETURN(RedisUrl url, RedisUrl::Parse(options.url));
  KVAGENT_RETURN_IF_ERROR(ValidateNamespace(options.ns));
  if (options.chunk_bytes < 4096 || options.chunk_bytes > (256ull << 20))
    return InvalidArgumentError("remote chunk_bytes must be 4 KiB .. 256 MiB");
  if (options.connect_timeout_ms <= 0 || options.command_timeout_ms <= 0)
    return InvalidArgumentError("remote timeouts must be positive");
  if (options.write_queue_limit == 0 || options.max_attempts <= 0)
    return InvalidArgumentError("remote write_queue_limit and max_attempts must be positive");
  auto tier = std::make_unique<RedisTier>(std::move(url), options);
  KVAGENT_RETURN_IF_ERROR(tier->Start());
  return std::unique_ptr<RemoteTier>(std::move(tier));
}

}  // namespace kvagent
