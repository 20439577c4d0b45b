// The DiskTier implementation class, shared by disk_tier.cc (reads and writes),
// disk_tier_open.cc (recovery) and disk_tier_compact.cc (compaction).
#pragma once

#include <atomic>
#include <cstdlib>
#include <deque>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "kvagent/disk_tier.h"
#include "store/catalog.h"
#include "store/record.h"

namespace kvagent::disk {

class DiskTierImpl final : public DiskTier {
 public:
  static StatusOr<std::unique_ptr<DiskTier>> OpenImpl(const DiskTierOptions& options);
  ~DiskTierImpl() override;

  Status Put(const Segment& segment) override;
  Status PutBatch(std::span<const Segment* const> segments, size_t* written) override;
  std::unique_ptr<WriteTicket> SubmitBatch(std::span<const Segment* const> segments) override;
  Status FinishBatch(std::unique_ptr<WriteTicket> ticket, size_t* written) override;
  StatusOr<SegmentHandle> Get(const Hash128& key, const Hash128& model) override;
  StatusOr<SegmentHandle> Get(const Hash128& key, const Hash128& model, const PayloadAllocator& allocate) override;
  Status ReadPayload(const Hash128& key, const Hash128& model, std::span<std::byte> dst) override;
  StatusOr<SegmentInfo> Info(const Hash128& key) override;
  bool Contains(const Hash128& key) override;
  Status Delete(const Hash128& key) override;
  std::vector<SegmentInfo> List(const SegmentFilter& filter) override;
  Status Sync() override;
  TierStats Stats() override;
  StatusOr<VerifyReport> Verify(ProgressFn progress) override;
  StatusOr<CompactReport> Compact(ProgressFn progress) override;
  RecoveryReport Recovery() override;

 private:
  struct FileInfo {
    std::string path;
    std::shared_ptr<RandomAccessFile> reader;
    uint64_t size = 0;
    bool sealed = false;  // never append (holds bytes a failed append could not cut)
  };
  struct Entry {
    RecordLocation loc;
    SegmentInfo info;
    std::list<Hash128>::iterator lru;
  };
  // What a reader needs, copied out under the lock so the read itself runs unlocked.
  struct ReadTicket {
    RecordLocation loc;
    SegmentInfo info;
    std::shared_ptr<RandomAccessFile> reader;
  };

  struct FreeDeleter {
    void operator()(std::byte* p) const { std::free(p); }
  };
  struct AlignedBuffer {
    std::unique_ptr<std::byte, FreeDeleter> data;
    uint64_t capacity = 0;
  };
  // A segment ready to append: encoded payload, record prefix (checksums computed), info.
  struct Prepared {
    const Segment* segment = nullptr;
    std::vector<std::byte> encoded;  // codec output (the raw codec uses the segment's memory)
    std::span<const std::byte> payload;
    EncodedRecord rec;
    SegmentInfo info;
  };
  class Ticket;
  // A run of one ticket's records appended together to one file. Chunks are published (indexed,
  // cataloged) in submission order once their writes are done; a chunk whose write failed cuts
  // its file back to `start`, which also cuts every later chunk of that file.
  struct Chunk {
    Ticket* ticket = nullptr;
    size_t first = 0, last = 0;  // the ticket's records [first, last)
    uint64_t file_no = 0;
    uint64_t start = 0;             // file offset of the chunk's first byte
    std::vector<uint64_t> offsets;  // record offsets in the file
    uint64_t async_id = 0;          // last asynchronous append still to wait for (0: none)
    bool async = false;             // some of it was appended asynchronously
    Status io;                      // the writes' result once waited for
    bool cut = false;               // cut back with an earlier failed chunk
    AlignedBuffer buffer;           // coalesced records' copied bytes, kept until written
    std::vector<std::span<const std::byte>> gather;  // the coalesced records' pieces
  };

  explicit DiskTierImpl(const DiskTierOptions& options);

  // Validates and encodes `segments` (no lock): checksums and record prefixes.
  Status Prepare(std::span<const Segment* const> segments, std::vector<Prepared>* prep) const;
  // Appends the ticket's records as chunks (asynchronously where the file allows).
  void SubmitLocked(Ticket* t);
  // Waits for and publishes (or fails) submitted chunks in order until `t` has none left
  // (nullptr: until none is left). Re-entrant: publishing may roll a file over, which completes
  // the remaining chunks first.
  void CompleteLocked(const Ticket* t);
  void PublishLocked(const Chunk& c);
  // Waits for the active file's asynchronous appends, recording each chunk's result.
  void DrainIoLocked();

  std::string FilePath(uint64_t file_no) const;

  // --- recovery (disk_tier_open.cc) ---
  Status Recover();
  Status LoadCatalog(std::vector<CatalogEntry>* entries, std::map<uint64_t, uint64_t>* ends);
  // Scans `file_no` from `start`, applying records to the index; cuts a torn tail.
  Status ScanFile(uint64_t file_no, uint64_t start);
  void ApplyScanned(const RecordHeader& h, uint64_t file_no, uint64_t offset, const Segment* meta);

  // --- writing (disk_tier.cc), all with mu_ held ---
  // One record to append: prefix, payload, then zero padding up to record_len bytes.
  struct AppendPiece {
    std::span<const std::byte> prefix;
    std::span<const std::byte> payload;
    uint64_t record_len;
    // Instead of prefix and payload: record_len bytes in these pieces, appended with one
    // gathering direct write where the file allows (WritableFile::AppendAsyncV).
    std::span<const std::span<const std::byte>> gather = {};
  };
  // Appends the records back to back to the active file (rolled over first if they do not
  // fit), makes them visible to readers and, with options.sync, durable. All or nothing: on any
  // error the file is cut back to its previous length, so the tier is unchanged. *file_no and
  // *offsets (one per piece) say where they went.
  // With `async_id`, block-aligned payloads are appended asynchronously (WritableFile::AppendAsync)
  // and *async_id is the last such append (0: none); the caller waits for it, syncs with
  // options.sync, and cuts the file back on failure (see Chunk). The records are not visible to
  // readers before that.
  Status AppendLocked(std::span<const AppendPiece> pieces, uint64_t* file_no, std::vector<uint64_t>* offsets,
                      uint64_t* async_id = nullptr);
  Status EnsureActiveLocked(uint64_t record_len);
  // Direct I/O for a batch of small records: when `recs` (every payload below
  // kCoalesceMaxPayload) add up to kCoalesceMinBytes or more, replaces `pieces` with [padding to
  // the next block boundary,] one gathering piece that holds the records and a trailing padding
  // record and ends on a block boundary. A payload whose memory and size are multiples of the
  // file's DirectIoGranularity() is written from the segment's memory (its record padded so the
  // payload starts on such a boundary in the file); everything else (headers, metadata, other
  // payloads, padding) is copied into c->buffer (from a small pool, kept until the write is done).
  // *offsets then holds each record's file offset. Otherwise leaves `pieces` alone and *offsets empty.
  Status CoalesceLocked(size_t block, std::span<Prepared> recs, std::vector<AppendPiece>* pieces,
                        std::vector<uint64_t>* offsets, Chunk* c);
  // Opens the active segment file (direct I/O when options.direct_io).
  StatusOr<std::unique_ptr<WritableFile>> OpenActiveLocked(const std::string& path, bool truncate);
  // Cuts file `file_no` back to `old_size` (closing it if active, after its asynchronous appends)
  // and marks every submitted chunk at or past that offset as cut.
  void RollbackActiveLocked(uint64_t file_no, uint64_t old_size);
  Status WriteTombstonesLocked(const std::vector<Hash128>& keys);
  void InsertLocked(const Hash128& key, const RecordLocation& loc, const SegmentInfo& info);
  void EraseLocked(const Hash128& key);
  // Evicts least recently used records until live bytes fit the capacity.
  void EvictLocked(const Hash128& keep);
  // Records catalog changes for `upserts` (rows from the index) and `removes`. With
  // options.sync they are committed at once; without, they are batched (see
  // FlushCatalogLocked) because the segment files, not the catalog, are the source of truth:
  // Open rescans every file past the catalog's known end, so a row not yet committed only
  // costs a longer scan. `bytes` is the record bytes the change covers.
  void CommitCatalogLocked(const std::vector<Hash128>& upserts, const std::vector<Hash128>& removes,
                           uint64_t bytes = 0);
  // Persists every pending catalog change in one transaction; on failure the catalog is left
  // behind (the next Open rescans) and stops being updated for this session.
  void FlushCatalogLocked();
  void MaybeAutoCompactLocked();
  StatusOr<CompactReport> CompactLocked(const ProgressFn& progress);

  // --- reading (disk_tier.cc), without mu_ ---
  StatusOr<ReadTicket> TicketFor(const Hash128& key, const Hash128* model);
  // One read from the record's start (RandomAccessFile::ReadV): header and metadata, verified
  // against the ticket and decoded into `seg`, then the payload, verified and decoded into `dst`
  // (canonical bytes). With a null `seg`, the payload alone.
  Status ReadRecordInto(const ReadTicket& t, Segment* seg, std::span<std::byte> dst) const;
  // Verifies header and metadata bytes (payload_offset of them) against the ticket; fills `seg`.
  Status ParseMeta(const ReadTicket& t, std::string_view buf, Segment* seg) const;
  // Drops a record found corrupt from the index (and writes a tombstone, best effort).
  void Quarantine(const Hash128& key, const RecordLocation& loc, const Status& why);

  DiskTierOptions opts_;
  Env* env_;
  std::string dir_;
  std::unique_ptr<FileLock> lock_;

  std::mutex mu_;
  std::unique_ptr<Catalog> catalog_;
  bool catalog_ok_ = true;
  std::map<uint64_t, FileInfo> files_;
  std::map<uint64_t, uint64_t> pending_ends_;  // files appended to since the last catalog commit
  // Keys whose catalog row is stale (upsert if indexed, else remove) and the record bytes
  // written since the last catalog commit. Bounded so the rescan at Open stays short.
  std::unordered_set<Hash128, Hash128Hasher> catalog_dirty_;
  uint64_t catalog_dirty_bytes_ = 0;
  static constexpr size_t kCatalogBatchRecords = 512;
  static constexpr uint64_t kCatalogBatchBytes = 256ull << 20;
  std::unique_ptr<WritableFile> active_;
  // Payloads at least this large and block-aligned in memory start on a block in the file too,
  // so the direct-I/O file writes them without the page cache (measured: faster from 16 MiB,
  // slower than buffered writes at 1 MiB and below on the development VM).
  static constexpr size_t kDirectMinPayload = 4 << 20;
  static constexpr size_t kDirectBlock = 4096;
  // Coalescing pays for records below 256 KiB (64 KiB: +30%); from 1 MiB the page cache's
  // asynchronous writeback beat one synchronous direct write per batch (docs/benchmarks.md).
  static constexpr uint64_t kCoalesceMinBytes = 1 << 20;
  static constexpr uint64_t kCoalesceMaxPayload = 256 << 10;
  static constexpr size_t kSpareBuffers = 8;  // as many as the store's writer has batches in flight
  static constexpr uint64_t kCoalesceBufferBytes = (4 << 20) + (256 << 10) + 2 * kMaxPaddingRecord;
  std::vector<AlignedBuffer> spare_buffers_;  // coalescing buffers for reuse (up to kSpareBuffers)
  std::string coalesce_lead_;
  std::deque<Chunk> chunks_;  // submitted, not yet published
  uint64_t active_no_ = 0;  // 0: no file open for appending
  uint64_t next_file_no_ = 1;
  std::unordered_map<Hash128, Entry, Hash128Hasher> index_;
  std::list<Hash128> lru_;  // front = most recently used
  uint64_t live_bytes_ = 0;
  uint64_t file_bytes_ = 0;
  uint64_t puts_ = 0;
  uint64_t evictions_ = 0;
  RecoveryReport recovery_;

  std::atomic<uint64_t> hits_{0};
  std::atomic<uint64_t> misses_{0};
  std::atomic<uint64_t> corrupt_{0};
};

}  // namespace kvagent::disk
