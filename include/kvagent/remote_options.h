// Options of the remote (Redis) tier and its URL; kept apart from kvagent/remote_tier.h so
// StoreOptions can hold them. The tier itself is described in kvagent/remote_tier.h.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "kvagent/env.h"
#include "kvagent/status.h"

namespace kvagent {

// redis://[user:password@]host[:port][/db]. Host: a name, an IPv4 address or [IPv6]. Port
// defaults to 6379, db to 0. The password (and user) may be percent-encoded. Without
// credentials in the URL, KVAGENT_REDIS_USER / KVAGENT_REDIS_PASSWORD from the environment are
// used when set. rediss:// (TLS) is InvalidArgument: this build's hiredis has no TLS.
struct RedisUrl {
  std::string host;
  int port = 6379;
  std::string user;      // empty: the default user
  std::string password;  // empty: no AUTH
  int db = 0;

  static StatusOr<RedisUrl> Parse(std::string_view url);
  // The URL without the password (for messages and logs).
  std::string Redacted() const;
};

struct RemoteOptions {
  std::string url;             // see RedisUrl
  std::string ns = "default";  // tenant namespace: 1-64 of [A-Za-z0-9_.-]
  uint64_t chunk_bytes = 4ull << 20;  // payload chunk size, 4 KiB .. 256 MiB (Redis' bulk limit is 512 MB)
  uint64_t ttl_seconds = 0;           // 0 = keys never expire; else every key gets this TTL on write
  int connect_timeout_ms = 500;
  int command_timeout_ms = 2000;
  size_t write_queue_limit = 256;            // queued segment writes before new ones are dropped
  uint64_t write_queue_bytes = 1ull << 30;   // queued payload bytes before new writes are dropped
  int max_attempts = 8;                      // sends of a write before it is dropped
  Env* env = nullptr;                        // clock (backoff); nullptr = Env::Default()
};

}  // namespace kvagent
