// DiskTier: durable segment storage in append-only files with a SQLite catalog.
// The byte format and the crash-recovery argument are in docs/storage-format.md.
//
// Files: <dir>/segments-<000001>.kvs, records appended back to back. Each record: a fixed
// header (magic, format version, header length, key, model fingerprint, codec, layout, lengths
// of metadata and payload, checksums of header, metadata and payload), the serialised
// metadata (tokens, positions, SegmentMeta, summary), then the encoded payload, 64-byte
// aligned so payload reads can go straight into a caller's buffer. Delete, eviction and
// quarantine append a 128-byte tombstone record.
// Catalog: <dir>/catalog.sqlite (WAL) maps key -> (file, offset, lengths, metadata columns)
// when env->IsPosix(); other Envs get an in-memory catalog rebuilt by scanning at Open.
// The segment files are the source of truth: on Open, records past the catalog's known end
// of each file are scanned and re-indexed; torn tails are reported and cut, corrupt records
// skipped and counted (TierStats::corrupt_records, Recovery()).
//
// Durability: with options.sync, Put and Delete return only after their record is
// fdatasync'ed; after a crash (kill -9 or power loss) at any point, Open serves every record
// whose Put returned OK, keeps every acknowledged Delete, and never serves a torn or corrupt
// record. Without options.sync, records are durable after Sync() (or when their file rolls
// over); a clean close does not sync.
// Failed writes: when an append or sync fails (I/O error, short write, ENOSPC), the file is
// cut back and Put/Delete return the error with the tier unchanged.
//
// Keys: Put with an existing key replaces it (last writer wins; the old record becomes dead
// space). Segments are returned as fresh immutable copies; the tier keeps no handles.
//
// Reads: Get/ReadPayload check the model fingerprint first (FailedPrecondition, nothing
// read), then verify header, metadata and payload checksums on every read. A checksum failure
// is DataLoss; the record is quarantined (removed, counted in corrupt_records) so later calls
// see NotFound.
//
// Capacity: stored bytes are whole records (header + metadata + encoded payload + padding).
// When live bytes exceed capacity_bytes after a Put, the least recently used records (Put or
// successful Get/ReadPayload; never the one just written) are evicted: removed from the index
// and catalog and tombstoned. Space in the files is reclaimed by Compact, which also runs
// automatically inside Put/Delete when dead bytes exceed both compact_dead_ratio of the file
// bytes and compact_min_dead_bytes. Recency is in memory only: after a reopen it is write order.
//
// Thread-safety: all methods may be called concurrently. Writers (Put, Delete, Compact,
// Sync) are serialised by one mutex, which also guards the index; Get/ReadPayload/Verify hold
// it only to look up a location and do their file reads without it, so reads proceed in
// parallel with each other and with writes.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kvagent/codec.h"
#include "kvagent/env.h"
#include "kvagent/segment.h"
#include "kvagent/status.h"
#include "kvagent/store_types.h"

namespace kvagent {

struct DiskTierOptions {
  std::string dir;                         // created if missing
  uint64_t capacity_bytes = 0;             // 0 = unbounded
  uint64_t max_file_bytes = 256ull << 20;  // roll over to a new segment file
  bool sync = true;                        // fdatasync every record before Put returns
  CodecKind codec = CodecKind::kRaw;       // encoding of payloads written from now on
  // Write payloads of 4 MiB and more with direct I/O (O_DIRECT) where the file system allows it:
  // padded to start on a 4 KiB block in the file (record format version 2), they go from the
  // segment's memory to the device without the page cache's copy; batches of small records
  // (1 MiB and more together) are copied into one block-aligned buffer and written the same
  // way; other records and headers go through the page cache. Env::NewDirectWritableFile. The
  // direct writes are asynchronous (io_uring, several in flight; see SubmitBatch).
  bool direct_io = true;
  double compact_dead_ratio = 0.5;               // auto-compact when dead/total file bytes exceeds this
  uint64_t compact_min_dead_bytes = 1ull << 20;  // ...and at least this many bytes are dead
  Env* env = nullptr;                            // nullptr = Env::Default()
};

// What Open found while recovering (records past the catalog's known end of each file).
struct RecoveryReport {
  uint64_t files = 0;                 // segment files found
  uint64_t scanned_bytes = 0;         // bytes read by the recovery scan
  uint64_t records_indexed = 0;       // records (segments and tombstones) re-indexed by the scan
  uint64_t corrupt_records = 0;       // records skipped (bad checksum, bad header, catalog entry past EOF)
  uint64_t torn_tails = 0;            // incomplete tails cut off
  uint64_t torn_bytes = 0;            // bytes cut off
  bool catalog_rebuilt = false;       // the SQLite catalog was missing or unusable and was rebuilt
  std::vector<std::string> problems;  // one line per corrupt record or torn tail
};

class DiskTier {
 public:
  virtual ~DiskTier() = default;

  // Opens or creates the tier; recovers from a crash (see above). FailedPrecondition if
  // another process (or another open DiskTier in this process) holds the directory's lock;
  // InvalidArgument for bad options (empty dir, max_file_bytes < 256, ratio outside (0, 1]).
  static StatusOr<std::unique_ptr<DiskTier>> Open(const DiskTierOptions& options);

  // Appends `segment` and records it in the catalog. Replaces an existing key. InvalidArgument
  // if Segment::Validate fails (or, with the int8 codec, the payload holds NaN/Inf): nothing is
  // written. ResourceExhausted on a full disk or a record larger than capacity_bytes; other I/O
  // errors as returned by the Env. On any error the tier is unchanged. May evict (see above)
  // and may run an automatic compaction before returning.
  virtual Status Put(const Segment& segment) = 0;
  // Put for several segments at once, in order (SubmitBatch then FinishBatch), with one catalog
  // change per segment file they land in. Sets *written to
  // the number of leading segments stored. On an error the segments from *written on are not
  // stored (the tier holds exactly the first *written); a segment that fails Validate stops the
  // batch before anything is written. The default stores them one Put at a time.
  virtual Status PutBatch(std::span<const Segment* const> segments, size_t* written) {
    *written = 0;
    for (const Segment* s : segments) {
      KVAGENT_RETURN_IF_ERROR(Put(*s));
      ++*written;
    }
    return Status::Ok();
  }

  // PutBatch in two steps, for a writer that keeps the device busy (the store's write-behind
  // thread submits its next batch before it finishes the previous one): SubmitBatch encodes the
  // segments and starts writing their records; FinishBatch waits until they are written (synced
  // with options.sync) and makes them visible (index, catalog, eviction), returning what
  // PutBatch would have. Until then Get/Info/Contains/List do not see them. Tickets finish in
  // submission order: finishing one (or Delete, Sync, Compact, destroying the tier) finishes
  // every earlier one, and a failed write also fails the tickets submitted after it. The
  // segments and their payload memory must stay alive and unchanged until the ticket is finished;
  // a ticket destroyed unfinished is finished by its destructor. The tier must outlive its
  // tickets. The default writes everything in SubmitBatch.
  class WriteTicket {
   public:
    virtual ~WriteTicket() = default;
  };
  virtual std::unique_ptr<WriteTicket> SubmitBatch(std::span<const Segment* const> segments);
  virtual Status FinishBatch(std::unique_ptr<WriteTicket> ticket, size_t* written);
  // Reads and verifies the record; FailedPrecondition if it was produced by another model.
  virtual StatusOr<SegmentHandle> Get(const Hash128& key, const Hash128& model) = 0;
  // Get with the payload read into a buffer from `allocate` (called with the payload size; e.g.
  // the host tier's recycling pool, so large reads do not fault in fresh memory every time).
  using PayloadAllocator = std::function<StatusOr<std::shared_ptr<Buffer>>(size_t)>;
  virtual StatusOr<SegmentHandle> Get(const Hash128& key, const Hash128& model, const PayloadAllocator& allocate) {
    (void)allocate;
    return Get(key, model);
  }
  // Reads the decoded payload straight into `dst` (dst.size() == payload bytes, else
  // InvalidArgument); with the raw codec there is no intermediate copy. Checks the payload
  // checksum but not the metadata (use Get for the full record).
  virtual Status ReadPayload(const Hash128& key, const Hash128& model, std::span<std::byte> dst) = 0;
  // Metadata and sizes from the index (no file read). NotFound if absent.
  virtual StatusOr<SegmentInfo> Info(const Hash128& key) = 0;
  virtual bool Contains(const Hash128& key) = 0;
  // Appends a tombstone (synced with options.sync) and drops the key. NotFound if absent.
  virtual Status Delete(const Hash128& key) = 0;
  // Segments matching `filter`, in write order (oldest first).
  virtual std::vector<SegmentInfo> List(const SegmentFilter& filter) = 0;

  // Makes every record appended so far durable (for options.sync == false).
  virtual Status Sync() = 0;
  virtual TierStats Stats() = 0;
  // Reads every live record and checks all checksums; progress in record bytes. Corrupt
  // records are reported (one line each) and quarantined as Get does.
  virtual StatusOr<VerifyReport> Verify(ProgressFn progress) = 0;
  // Rewrites the live records into new files and removes the old ones (crash-safe; see
  // docs/storage-format.md); progress in live bytes. On error the old files stay in use.
  // Blocks writers for its duration; readers holding a location keep reading the old file.
  virtual StatusOr<CompactReport> Compact(ProgressFn progress) = 0;

  // What the last Open recovered (see RecoveryReport).
  virtual RecoveryReport Recovery() = 0;
};

}  // namespace kvagent
