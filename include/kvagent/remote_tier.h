// RemoteTier: segments in Redis (or Valkey), shared by every process that opens the same
// server and namespace. Used by Store as the tier below host (and disk): Put writes it behind
// the local tiers, Get falls through to it and promotes what it finds into the host tier.
//
// Key schema (version 1; docs/multi-agent.md). For namespace N, model fingerprint M and segment
// key K (32 hex digits each for M and K):
//   kva:v1:N:M:{K}:m     metadata value: disk record prefix (header with key, model, layout and
//                        checksums; tokens, positions, SegmentMeta, compressed keys) + chunk table
//   kva:v1:N:M:{K}:p:<i> payload chunk i (raw bytes, at most chunk_bytes)
// The hash tag {K} puts a segment's keys in one cluster slot, so its writes are one MULTI/EXEC
// (a reader sees all of a segment or none of it). Every key starts with "kva:v1:N:", so a Redis
// ACL user with the key pattern ~kva:v1:N:* is one tenant (RedisAclPattern).
//
// Value format (EncodeRemoteMeta): the disk record prefix (kvagent/src/store/record.h; the header
// checksum, metadata checksum) followed by the chunk table: u32 magic "KVRT", u32 chunk_bytes,
// u32 chunk count, chunk count x u64 xxh3 of each chunk, u64 xxh3 of the table. Every value read
// is checked: a value whose header names another key or model (foreign), a bad checksum or a
// malformed table is DataLoss, counted in corrupt_records, and never returned.
//
// Writes are asynchronous: Enqueue puts a segment (or a delete) on a bounded queue
// (write_queue_limit segments, write_queue_bytes payload bytes); when the queue is full the new
// write is dropped and counted (dropped). A writer thread sends queued writes in pipelined
// batches; a failed batch is retried with capped exponential backoff, up to max_attempts times,
// then dropped and counted. The local tiers hold everything acknowledged, so a dropped remote
// write loses only the shared copy.
//
// Connection faults (server down, killed, restarted empty, paused, slow): every command has
// connect_timeout_ms / command_timeout_ms; a failed connection is dropped and re-opened on a
// later call, no sooner than a backoff (50 ms doubling to 1 s) after the failure, so calls made
// while the server is away fail fast with Unavailable instead of waiting for a timeout each.
//
// Errors: Open: InvalidArgument (bad URL or namespace), PermissionDenied (the server rejects the
// credentials, or the user may not use this namespace's keys); a server that cannot be reached
// at Open is not an error (Connected() is false; the tier reconnects later). Get: NotFound,
// DataLoss, Unavailable (no connection), PermissionDenied.
//
// Thread-safety: all methods may be called concurrently (a pool of connections, one per
// concurrent caller; the writer thread has its own).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvagent/env.h"
#include "kvagent/remote_options.h"
#include "kvagent/segment.h"
#include "kvagent/status.h"
#include "kvagent/store.h"

namespace kvagent {

// Key-schema pieces (exposed for tests, tools and ACL setup).
std::string RemoteKeyPrefix(std::string_view ns);  // "kva:v1:<ns>:"
std::string RemoteMetaKey(std::string_view ns, const Hash128& model, const Hash128& key);
std::string RemoteChunkKey(std::string_view ns, const Hash128& model, const Hash128& key, uint32_t chunk);
std::string RedisAclPattern(std::string_view ns);  // "~kva:v1:<ns>:*"
// InvalidArgument unless `ns` is 1-64 characters of [A-Za-z0-9_.-].
Status ValidateNamespace(std::string_view ns);

// The metadata value of `s` for payload chunks of `chunk_bytes` (see "Value format").
std::string EncodeRemoteMeta(const Segment& s, uint64_t chunk_bytes);
// Decodes a metadata value read from key (key, model): fills `s` (everything but the payload)
// and the per-chunk checksums. DataLoss on any mismatch or malformed input.
struct RemoteChunkTable {
  uint32_t chunk_bytes = 0;
  std::vector<uint64_t> checksums;
};
Status DecodeRemoteMeta(std::string_view value, const Hash128& key, const Hash128& model, Segment* s,
                        RemoteChunkTable* table);

class RemoteTier {
 public:
  virtual ~RemoteTier() = default;

  // Connects (see Errors above) and starts the writer thread.
  static StatusOr<std::unique_ptr<RemoteTier>> Open(const RemoteOptions& options);

  // Writes `segment` now (one MULTI/EXEC), bypassing the queue. InvalidArgument if it fails
  // Validate; Unavailable / PermissionDenied from the server.
  virtual Status Put(const Segment& segment) = 0;
  // Queues an asynchronous write of `segment` (kept alive by the handle). Never blocks; returns
  // false when the write was dropped because the queue is full.
  virtual bool Enqueue(SegmentHandle segment) = 0;
  // Queues an asynchronous delete of the segment (key, model).
  virtual bool EnqueueDelete(const Hash128& key, const Hash128& model) = 0;
  // Waits until every write queued before the call is acknowledged or dropped, at most
  // timeout_ms. DeadlineExceeded on timeout; Unavailable if writes were dropped meanwhile.
  virtual Status Flush(int timeout_ms) = 0;

  // Reads the segment; the payload goes into a buffer from `allocate` (nullptr: Buffer::Allocate).
  using PayloadAllocator = std::function<StatusOr<std::shared_ptr<Buffer>>(size_t)>;
  virtual StatusOr<SegmentHandle> Get(const Hash128& key, const Hash128& model, const PayloadAllocator& allocate) = 0;
  // Index rows (metadata with compressed keys, no payload) of the namespace's segments that
  // match `filter`, found with SCAN. Corrupt values are skipped and counted.
  virtual StatusOr<std::vector<SegmentInfo>> List(const SegmentFilter& filter) = 0;
  // The index row of `key` under any model: from the rows List and Put have seen, else found with
  // SCAN (slow: meant for the rare key no List has shown). NotFound, DataLoss, Unavailable.
  virtual StatusOr<SegmentInfo> Info(const Hash128& key) = 0;

  virtual RemoteStats Stats() = 0;
  virtual const RemoteOptions& options() const = 0;
  // Stops the writer after it has tried to send what is queued (at most timeout_ms).
  virtual Status Close(int timeout_ms) = 0;
};

}  // namespace kvagent
