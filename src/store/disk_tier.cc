#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "store/disk_tier_impl.h"

namespace kvagent {

StatusOr<std::unique_ptr<DiskTier>> DiskTier::Open(const DiskTierOptions& options) {
  return disk::DiskTierImpl::OpenImpl(options);
}

namespace {
// The default two-step put: everything happens in SubmitBatch.
class DoneTicket final : public DiskTier::WriteTicket {
 public:
  Status status;
  size_t written = 0;
};
}  // namespace

std::unique_ptr<DiskTier::WriteTicket> DiskTier::SubmitBatch(std::span<const Segment* const> segments) {
  auto t = std::make_unique<DoneTicket>();
  t->status = PutBatch(segments, &t->written);
  return t;
}

Status DiskTier::FinishBatch(std::unique_ptr<WriteTicket> ticket, size_t* written) {
  auto* t = dynamic_cast<DoneTicket*>(ticket.get());
  *written = t != nullptr ? t->written : 0;
  if (t == nullptr) return InvalidArgumentError("disk tier: a write ticket from another tier");
  return t->status;
}

namespace disk {

namespace {

constexpr std::byte kZeros[kAlign] = {};

std::span<const std::byte> AsBytes(const std::string& s) {
  return std::as_bytes(std::span<const char>(s.data(), s.size()));
}

bool Before(const RecordLocation& a, const RecordLocation& b) {
  return a.file_no != b.file_no ? a.file_no < b.file_no : a.offset < b.offset;
}

}  // namespace

DiskTierImpl::DiskTierImpl(const DiskTierOptions& options)
    : opts_(options), env_(options.env ? options.env : Env::Default()), dir_(options.dir) {
  while (dir_.size() > 1 && dir_.back() == '/') dir_.pop_back();
}

DiskTierImpl::~DiskTierImpl() {
  std::lock_guard<std::mutex> l(mu_);
  CompleteLocked(nullptr);
  if (active_) {
    // Without options.sync, durability is the caller's Sync(); closing does not imply it.
    if (opts_.sync) active_->Sync().IgnoreError();
    active_->Close().IgnoreError();
  }
  // Rows for unsynced records are harmless: Open checks every row against the files.
  if (catalog_) FlushCatalogLocked();
}

std::string DiskTierImpl::FilePath(uint64_t file_no) const {
  char name[48];
  std::snprintf(name, sizeof(name), "segments-%06" PRIu64 ".kvs", file_no);
  return dir_ + "/" + name;
}

// ---------------------------------------------------------------- writing

StatusOr<std::unique_ptr<WritableFile>> DiskTierImpl::OpenActiveLocked(const std::string& path, bool truncate) {
  if (opts_.direct_io) return env_->NewDirectWritableFile(path, truncate);
  return truncate ? env_->NewWritableFile(path) : env_->NewAppendableFile(path);
}

Status DiskTierImpl::EnsureActiveLocked(uint64_t record_len) {
  if (active_ && active_->Size() > 0 && active_->Size() + record_len > opts_.max_file_bytes) {
    // Every chunk submitted to the file is published (or failed) before the file is closed.
    CompleteLocked(nullptr);
  }
  // Checked again: completing may have rolled the file back (closing it) or over already.
  if (active_ && active_->Size() > 0 && active_->Size() + record_len > opts_.max_file_bytes) {
    // Synced even without options.sync: Sync() only reaches the active file, so a file must be
    // durable before it stops being the active one.
    Status s = active_->Sync();
    active_->Close().IgnoreError();
    active_.reset();
    active_no_ = 0;
    KVAGENT_RETURN_IF_ERROR(s);
  }
  if (active_) return Status::Ok();
  // Reuse the newest file if it has room (after a reopen), else start a new one.
  if (!files_.empty()) {
    auto& [no, fi] = *files_.rbegin();
    if (!fi.sealed && no + 1 == next_file_no_ && fi.size > 0 && fi.size % kAlign == 0 &&
        fi.size + record_len <= opts_.max_file_bytes) {
      KVAGENT_ASSIGN_OR_RETURN(active_, OpenActiveLocked(fi.path, /*truncate=*/false));
      if (active_->Size() != fi.size) {
        // Someone else changed the file; never append behind unknown bytes.
        active_.reset();
      } else {
        active_no_ = no;
        return Status::Ok();
      }
    }
  }
  uint64_t no = next_file_no_;
  std::string path = FilePath(no);
  KVAGENT_ASSIGN_OR_RETURN(active_, OpenActiveLocked(path, /*truncate=*/true));
  Status s = env_->SyncDir(dir_);
  auto reader = env_->NewRandomAccessFile(path);
  if (!s.ok() || !reader.ok()) {
    active_.reset();
    env_->RemoveFile(path).IgnoreError();
    return s.ok() ? reader.status() : s;
  }
  ++next_file_no_;
  active_no_ = no;
  files_[no] = FileInfo{path, std::shared_ptr<RandomAccessFile>(std::move(reader).value()), 0, false};
  return Status::Ok();
}

void DiskTierImpl::RollbackActiveLocked(uint64_t file_no, uint64_t old_size) {
  if (active_ && active_no_ == file_no) {
    DrainIoLocked();
    active_->Close().IgnoreError();
    active_.reset();
    active_no_ = 0;
  }
  for (Chunk& c : chunks_) {
    if (c.file_no != file_no || c.start < old_size || c.cut) continue;
    c.cut = true;
    c.async_id = 0;
    c.io = AbortedError("disk tier append: cut back with an earlier failed write to " + FilePath(file_no));
  }
  FileInfo& fi = files_[file_no];
  if (fi.size < old_size) return;  // already cut further back
  Status s = env_->TruncateFile(fi.path, old_size);
  auto size = env_->GetFileSize(fi.path);
  uint64_t now = size.ok() ? *size : old_size;
  file_bytes_ = file_bytes_ - fi.size + now;
  fi.size = now;
  // A file holding bytes we could not cut is never appended to again (a new file is started);
  // the next Open's scan reports and cuts them.
  if (!s.ok() || now != old_size) fi.sealed = true;
}

void DiskTierImpl::DrainIoLocked() {
  if (!active_) return;
  for (Chunk& c : chunks_) {
    if (c.async_id == 0 || c.file_no != active_no_) continue;
    c.io = active_->WaitAsync(c.async_id);
    c.async_id = 0;
  }
}

Status DiskTierImpl::AppendLocked(std::span<const AppendPiece> pieces, uint64_t* file_no,
                                  std::vector<uint64_t>* offsets, uint64_t* async_id) {
  uint64_t total = 0;
  for (const AppendPiece& p : pieces) total += p.record_len;
  auto free = env_->FreeSpace(dir_);
  if (free.ok() && *free < total)
    return ResourceExhaustedError("disk tier " + dir_ + ": " + std::to_string(*free) + " bytes free, records need " +
                                  std::to_string(total));
  KVAGENT_RETURN_IF_ERROR(EnsureActiveLocked(total));
  const uint64_t no = active_no_;
  const uint64_t start = active_->Size();
  offsets->clear();
  // Payloads and gathered batches go through AppendAsync(V): the file writes what it can
  // directly and asynchronously, the rest at once; the caller keeps the memory until written.
  uint64_t last_async = 0;
  Status s;
  for (const AppendPiece& p : pieces) {
    offsets->push_back(active_->Size());
    StatusOr<uint64_t> id = uint64_t{0};
    if (!p.gather.empty()) {
      id = active_->AppendAsyncV(p.gather);
    } else {
      s = active_->Append(p.prefix);
      if (s.ok() && !p.payload.empty()) id = active_->AppendAsync(p.payload);
      const uint64_t pad = p.record_len - p.prefix.size() - p.payload.size();
      if (s.ok() && id.ok() && pad > 0) s = active_->Append(std::span<const std::byte>(kZeros, pad));
    }
    if (s.ok()) s = id.status();
    if (!s.ok()) break;
    last_async = std::max(last_async, *id);
  }
  // Without `async_id` the caller wants everything written now.
  if (s.ok() && async_id == nullptr && last_async != 0) {
    s = active_->WaitAsync(last_async);
    last_async = 0;
  }
  if (async_id != nullptr) *async_id = last_async;
  // Asynchronous appends are synced (options.sync) when the caller has waited for them.
  if (s.ok() && last_async == 0) s = opts_.sync ? active_->Sync() : active_->Flush();
  if (!s.ok()) {
    RollbackActiveLocked(no, start);
    return s.WithContext("disk tier append");
  }
  FileInfo& fi = files_[no];
  file_bytes_ += active_->Size() - fi.size;
  fi.size = active_->Size();
  pending_ends_[no] = fi.size;
  *file_no = no;
  return Status::Ok();
}

Status DiskTierImpl::WriteTombstonesLocked(const std::vector<Hash128>& keys) {
  if (keys.empty()) return Status::Ok();
  std::string buf;
  for (const auto& k : keys) buf += BuildTombstone(k).prefix;
  const AppendPiece piece{AsBytes(buf), {}, buf.size()};
  uint64_t no = 0;
  std::vector<uint64_t> offsets;
  return AppendLocked(std::span<const AppendPiece>(&piece, 1), &no, &offsets);
}

void DiskTierImpl::InsertLocked(const Hash128& key, const RecordLocation& loc, const SegmentInfo& info) {
  auto it = index_.find(key);
  if (it != index_.end()) {
    live_bytes_ -= it->second.loc.record_len;
    lru_.erase(it->second.lru);
    index_.erase(it);
  }
  lru_.push_front(key);
  index_.emplace(key, Entry{loc, info, lru_.begin()});
  live_bytes_ += loc.record_len;
}

void DiskTierImpl::EraseLocked(const Hash128& key) {
  auto it = index_.find(key);
  if (it == index_.end()) return;
  live_bytes_ -= it->second.loc.record_len;
  lru_.erase(it->second.lru);
  index_.erase(it);
}

void DiskTierImpl::EvictLocked(const Hash128& keep) {
  if (opts_.capacity_bytes == 0) return;
  std::vector<Hash128> victims;
  while (live_bytes_ > opts_.capacity_bytes && !lru_.empty()) {
    Hash128 victim = lru_.back();
    if (victim == keep && lru_.size() == 1) break;
    if (victim == keep) {  // never evict the record just written
      lru_.splice(lru_.begin(), lru_, std::prev(lru_.end()));
      continue;
    }
    EraseLocked(victim);
    victims.push_back(victim);
    ++evictions_;
  }
  if (victims.empty()) return;
  // Tombstones make the evictions survive a reopen; if they cannot be written the records
  // come back after a reopen and are evicted again then.
  WriteTombstonesLocked(victims).IgnoreError();
  CommitCatalogLocked({}, victims);
}

void DiskTierImpl::CommitCatalogLocked(const std::vector<Hash128>& upserts, const std::vector<Hash128>& removes,
                                       uint64_t bytes) {
  catalog_dirty_.insert(removes.begin(), removes.end());
  catalog_dirty_.insert(upserts.begin(), upserts.end());
  catalog_dirty_bytes_ += bytes;
  if (opts_.sync || catalog_dirty_.size() >= kCatalogBatchRecords || catalog_dirty_bytes_ >= kCatalogBatchBytes)
    FlushCatalogLocked();
}

void DiskTierImpl::FlushCatalogLocked() {
  if (!catalog_ok_) {
    pending_ends_.clear();
    catalog_dirty_.clear();
    catalog_dirty_bytes_ = 0;
    return;
  }
  if (catalog_dirty_.empty() && pending_ends_.empty()) return;
  Status s = catalog_->Begin();
  for (const auto& k : catalog_dirty_) {
    if (!s.ok()) break;
    auto it = index_.find(k);
    s = it != index_.end() ? catalog_->Upsert(CatalogEntry{it->second.loc, it->second.info}) : catalog_->Remove(k);
  }
  for (const auto& [no, end] : pending_ends_)
    if (s.ok()) s = catalog_->SetFileEnd(no, end);
  if (s.ok()) s = catalog_->Commit();
  if (!s.ok()) {
    catalog_->Rollback();
    catalog_ok_ = false;
  }
  pending_ends_.clear();
  catalog_dirty_.clear();
  catalog_dirty_bytes_ = 0;
}

Status DiskTierImpl::Put(const Segment& segment) {
  const Segment* one = &segment;
  size_t written = 0;
  return PutBatch(std::span<const Segment* const>(&one, 1), &written);
}

Status DiskTierImpl::PutBatch(std::span<const Segment* const> segments, size_t* written) {
  return FinishBatch(SubmitBatch(segments), written);
}

Status DiskTierImpl::CoalesceLocked(size_t block, std::span<Prepared> recs, std::vector<AppendPiece>* pieces,
                                    std::vector<uint64_t>* offsets, Chunk* c) {
  offsets->clear();
  if (block == 0 || block > kDirectBlock || recs.size() < 2) return Status::Ok();
  uint64_t total = 0;
  for (const Prepared& p : recs) {
    if (p.payload.size() >= kCoalesceMaxPayload) return Status::Ok();  // written on its own
    total += p.rec.header.record_len;
  }
  if (total < kCoalesceMinBytes) return Status::Ok();
  const size_t gran = active_->DirectIoGranularity();
  const bool zero_copy_ok = gran != 0 && gran <= block && block % gran == 0;
  // Room for the records, their payload padding and both padding records in this file, so the
  // offsets below stay true.
  const uint64_t room = total + recs.size() * block + 2 * kMaxPaddingRecord;
  KVAGENT_RETURN_IF_ERROR(EnsureActiveLocked(room));
  const uint64_t start = active_->Size();
  const uint64_t lead = PaddingTo(start, block);
  AlignedBuffer& buffer = c->buffer;
  if (buffer.capacity < room && !spare_buffers_.empty()) {
    buffer = std::move(spare_buffers_.back());
    spare_buffers_.pop_back();
  }
  if (buffer.capacity < room) {
    // One size for every ordinary batch (the store's are up to 4 MiB), so buffers are reused
    // instead of mapped and faulted in anew.
    const uint64_t cap = std::max<uint64_t>((room + kDirectBlock - 1) / kDirectBlock * kDirectBlock, kCoalesceBufferBytes);
    buffer.data.reset(static_cast<std::byte*>(std::aligned_alloc(kDirectBlock, cap)));
    buffer.capacity = buffer.data ? cap : 0;
    if (!buffer.data) return Status::Ok();  // no memory for it: write the records one by one
  }
  // From here on nothing fails: records are re-padded in place.
  std::byte* out = buffer.data.get();
  uint64_t used = 0;       // bytes copied into the buffer
  uint64_t run_start = 0;  // where the copied bytes not yet in c->gather begin
  uint64_t at = start + lead;
  c->gather.clear();
  auto copy = [&](std::span<const std::byte> bytes) {
    std::memcpy(out + used, bytes.data(), bytes.size());
    used += bytes.size();
  };
  auto end_run = [&] {
    if (used > run_start) c->gather.emplace_back(out + run_start, used - run_start);
    run_start = used;
  };
  for (Prepared& p : recs) {
    const bool zero_copy = zero_copy_ok && p.payload.size() >= block && p.payload.size() % gran == 0 &&
                           reinterpret_cast<uintptr_t>(p.payload.data()) % gran == 0;
    // The payload then starts (and, its size being a multiple of gran, ends) on a gran boundary.
    if (zero_copy) PadPayloadToBlock(&p.rec, at, static_cast<uint32_t>(gran));
    const RecordHeader& h = p.rec.header;
    offsets->push_back(at);
    copy(AsBytes(p.rec.prefix));
    if (zero_copy) {
      end_run();
      c->gather.push_back(p.payload);
    } else {
      copy(p.payload);
      const uint64_t pad = h.record_len - h.payload_offset - h.payload_len;
      std::memset(out + used, 0, pad);
      used += pad;
    }
    at += h.record_len;
  }
  const uint64_t tail = PaddingTo(at, block);
  if (tail > 0) copy(AsBytes(BuildPadding(tail).prefix));
  end_run();
  coalesce_lead_ = lead > 0 ? BuildPadding(lead).prefix : std::string();
  pieces->clear();
  if (lead > 0) pieces->push_back(AppendPiece{AsBytes(coalesce_lead_), {}, lead});
  pieces->push_back(AppendPiece{{}, {}, at + tail - (start + lead), c->gather});
  return Status::Ok();
}

// A submitted batch: its prepared records and how far they got.
class DiskTierImpl::Ticket final : public DiskTier::WriteTicket {
 public:
  explicit Ticket(DiskTierImpl* tier) : tier_(tier) {}
  ~Ticket() override {
    if (outstanding == 0) return;
    std::lock_guard<std::mutex> l(tier_->mu_);
    tier_->CompleteLocked(this);
  }

  std::vector<Prepared> prep;
  Status status;           // the first error
  size_t written = 0;      // leading records published
  size_t outstanding = 0;  // chunks submitted, not yet published or failed
  bool failed = false;

  void Fail(const Status& s) {
    if (failed) return;
    failed = true;
    status = s;
  }

 private:
  DiskTierImpl* tier_;
};

Status DiskTierImpl::Prepare(std::span<const Segment* const> segments, std::vector<Prepared>* prep) const {
  const CodecKind codec = opts_.codec;
  prep->resize(segments.size());
  for (size_t i = 0; i < segments.size(); ++i) {
    const Segment& segment = *segments[i];
    KVAGENT_RETURN_IF_ERROR(segment.Validate());
    Prepared& p = (*prep)[i];
    p.segment = &segment;
    p.payload = segment.payload->span();
    if (codec != CodecKind::kRaw) {
      p.encoded.resize(EncodedSize(segment.layout, codec));
      KVAGENT_RETURN_IF_ERROR(EncodePayload(segment.layout, codec, p.payload, p.encoded));
      p.payload = p.encoded;
    }
    p.rec = BuildSegmentRecord(segment, codec, p.payload);
    if (opts_.capacity_bytes > 0 && p.rec.header.record_len > opts_.capacity_bytes)
      return ResourceExhaustedError("segment record of " + std::to_string(p.rec.header.record_len) +
                                    " bytes exceeds the disk tier capacity of " + std::to_string(opts_.capacity_bytes));
    p.info = InfoOf(segment);
    p.info.codec = static_cast<uint8_t>(codec);
  }
  return Status::Ok();
}

std::unique_ptr<DiskTier::WriteTicket> DiskTierImpl::SubmitBatch(std::span<const Segment* const> segments) {
  auto t = std::make_unique<Ticket>(this);
  // Encoding and checksums outside the lock.
  Status s = Prepare(segments, &t->prep);
  if (!s.ok()) {
    t->Fail(s);
    return t;
  }
  std::lock_guard<std::mutex> l(mu_);
  SubmitLocked(t.get());
  if (opts_.sync) CompleteLocked(t.get());  // durable before Put returns: nothing to overlap
  return t;
}

void DiskTierImpl::SubmitLocked(Ticket* t) {
  std::vector<AppendPiece> pieces;
  std::vector<uint64_t> offsets;
  size_t i = 0;
  while (i < t->prep.size()) {
    // One chunk: the records that fit the active file, appended back to back.
    Status s = EnsureActiveLocked(t->prep[i].rec.header.record_len + kMaxPayloadPad);
    if (t->failed) return;  // a roll-over completed this ticket's earlier chunks and one failed
    if (!s.ok()) return t->Fail(s);
    const size_t block = active_->DirectIoAlignment();
    uint64_t at = active_->Size();
    size_t j = i;
    pieces.clear();
    for (; j < t->prep.size(); ++j) {
      Prepared& p = t->prep[j];
      // Direct I/O: a large payload that starts on a block boundary in memory starts on one in
      // the file too (record format version 2), so it goes to the device without a copy.
      if (block != 0 && block <= kDirectBlock && p.payload.size() >= kDirectMinPayload &&
          reinterpret_cast<uintptr_t>(p.payload.data()) % block == 0)
        PadPayloadToBlock(&p.rec, at, static_cast<uint32_t>(block));
      if (j > i && at + p.rec.header.record_len > opts_.max_file_bytes) break;
      pieces.push_back(AppendPiece{AsBytes(p.rec.prefix), p.payload, p.rec.header.record_len});
      at += p.rec.header.record_len;
    }
    Chunk c;
    c.ticket = t;
    c.first = i;
    c.last = j;
    std::vector<uint64_t> record_offsets;
    uint64_t no = 0;
    s = CoalesceLocked(block, std::span<Prepared>(t->prep).subspan(i, j - i), &pieces, &record_offsets, &c);
    if (t->failed) return;
    if (s.ok()) s = AppendLocked(pieces, &no, &offsets, &c.async_id);
    if (!s.ok()) return t->Fail(s);
    c.file_no = no;
    c.start = offsets.front();
    c.async = c.async_id != 0;
    c.offsets = record_offsets.empty() ? offsets : std::move(record_offsets);
    ++t->outstanding;
    chunks_.push_back(std::move(c));
    i = j;
  }
}

void DiskTierImpl::CompleteLocked(const Ticket* t) {
  while (!chunks_.empty() && (t == nullptr || t->outstanding > 0)) {
    Chunk c = std::move(chunks_.front());
    chunks_.pop_front();
    Ticket* owner = c.ticket;
    const bool active = active_ && active_no_ == c.file_no;
    if (c.async_id != 0) {
      c.io = active ? active_->WaitAsync(c.async_id) : InternalError("disk tier: segment file closed under a write");
      c.async_id = 0;
    }
    // Synchronous appends were synced by AppendLocked; asynchronous ones once written.
    if (c.io.ok() && c.async && opts_.sync)
      c.io = active ? active_->Sync() : InternalError("disk tier: segment file closed under a write");
    if (c.io.ok() && !owner->failed) {
      PublishLocked(c);
      owner->written = c.last;
    } else {
      owner->Fail(c.io.WithContext("disk tier append"));  // keeps an earlier chunk's error
      // Not published, so never served: cut the chunk (and everything after it) off the file.
      if (!c.cut) RollbackActiveLocked(c.file_no, c.start);
    }
    --owner->outstanding;
    if (c.buffer.data && spare_buffers_.size() < kSpareBuffers) spare_buffers_.push_back(std::move(c.buffer));
  }
}

void DiskTierImpl::PublishLocked(const Chunk& c) {
  const Ticket& t = *c.ticket;
  std::vector<Hash128> keys;
  uint64_t bytes = 0;
  for (size_t k = c.first; k < c.last; ++k) {
    const Prepared& p = t.prep[k];
    const RecordHeader& h = p.rec.header;
    const RecordLocation loc{c.file_no,         c.offsets[k - c.first], h.record_len, h.payload_offset,
                             h.payload_len,     h.payload_checksum,     opts_.codec};
    SegmentInfo info = p.info;
    info.stored_bytes = loc.record_len;
    InsertLocked(p.segment->key, loc, info);
    ++puts_;
    keys.push_back(p.segment->key);
    bytes += loc.record_len;
  }
  CommitCatalogLocked(keys, {}, bytes);
  EvictLocked(keys.back());
}

Status DiskTierImpl::FinishBatch(std::unique_ptr<WriteTicket> ticket, size_t* written) {
  *written = 0;
  auto* t = dynamic_cast<Ticket*>(ticket.get());
  if (t == nullptr) return InvalidArgumentError("disk tier: a write ticket from another tier");
  {
    std::lock_guard<std::mutex> l(mu_);
    CompleteLocked(t);
    if (chunks_.empty()) MaybeAutoCompactLocked();
  }
  *written = t->written;
  return t->failed ? t->status : Status::Ok();
}

Status DiskTierImpl::Delete(const Hash128& key) {
  std::lock_guard<std::mutex> l(mu_);
  CompleteLocked(nullptr);
  if (index_.find(key) == index_.end()) return NotFoundError("disk tier: no segment " + key.ToHex());
  KVAGENT_RETURN_IF_ERROR(WriteTombstonesLocked({key}));
  EraseLocked(key);
  CommitCatalogLocked({}, {key});
  MaybeAutoCompactLocked();
  return Status::Ok();
}

void DiskTierImpl::MaybeAutoCompactLocked() {
  uint64_t dead = file_bytes_ - live_bytes_;
  if (dead < opts_.compact_min_dead_bytes || file_bytes_ == 0) return;
  if (static_cast<double>(dead) <= opts_.compact_dead_ratio * static_cast<double>(file_bytes_)) return;
  // A failed automatic compaction leaves the old files in place; the data stays readable.
  CompactLocked(nullptr).status().IgnoreError();
}

// ---------------------------------------------------------------- reading

StatusOr<DiskTierImpl::ReadTicket> DiskTierImpl::TicketFor(const Hash128& key, const Hash128* model) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = index_.find(key);
  if (it == index_.end()) {
    ++misses_;
    return NotFoundError("disk tier: no segment " + key.ToHex());
  }
  if (model) KVAGENT_RETURN_IF_ERROR(CheckFingerprint(it->second.info.model, *model));
  auto f = files_.find(it->second.loc.file_no);
  if (f == files_.end()) return InternalError("disk tier: segment file of " + key.ToHex() + " is missing");
  // The catalog is an index, never trusted for sizes: a row whose record does not fit its file, or
  // whose decoded payload could not come from its stored payload (raw: equal; int8: at most 4x),
  // must not size an allocation (catalog_fuzz once asked for 2^51 bytes here).
  const RecordLocation& loc = it->second.loc;
  if (loc.record_len > f->second.size || loc.offset > f->second.size - loc.record_len ||
      loc.payload_len > loc.record_len || it->second.info.payload_bytes / 4 > loc.payload_len) {
    return DataLossError("disk tier: catalog row of " + key.ToHex() + " disagrees with its segment file");
  }
  lru_.splice(lru_.begin(), lru_, it->second.lru);
  return ReadTicket{it->second.loc, it->second.info, f->second.reader};
}

Status DiskTierImpl::ParseMeta(const ReadTicket& t, std::string_view buf, Segment* seg) const {
  const auto dst = std::as_bytes(std::span<const char>(buf.data(), buf.size()));
  RecordHeader h;
  KVAGENT_RETURN_IF_ERROR(DecodeHeader(dst, &h));
  if (h.kind != RecordKind::kSegment || h.key != t.info.key || h.model != t.info.model ||
      h.record_len != t.loc.record_len || h.payload_offset != t.loc.payload_offset ||
      h.payload_len != t.loc.payload_len || h.payload_checksum != t.loc.payload_checksum || h.codec != t.loc.codec ||
      !(h.layout == t.info.layout))
    return DataLossError("record header disagrees with the catalog");
  std::string_view meta(buf.data() + kHeaderSize, h.meta_len);
  if (Checksum64(std::as_bytes(std::span<const char>(meta.data(), meta.size()))) != h.meta_checksum)
    return DataLossError("record metadata checksum mismatch");
  seg->key = h.key;
  seg->model = h.model;
  seg->layout = h.layout;
  seg->pre_rope = h.pre_rope;
  return DecodeMeta(meta, h.layout.num_tokens, seg);
}

Status DiskTierImpl::ReadRecordInto(const ReadTicket& t, Segment* seg, std::span<std::byte> dst) const {
  std::vector<std::byte> encoded;
  std::span<std::byte> target = dst;
  if (t.loc.codec != CodecKind::kRaw) {
    encoded.resize(t.loc.payload_len);
    target = encoded;
  } else if (dst.size() != t.loc.payload_len) {
    return DataLossError("record payload length disagrees with its layout");
  }
  // With the metadata: one read from the record's start (header, metadata, payload).
  std::string meta(seg != nullptr ? t.loc.payload_offset : 0, '\0');
  const std::span<std::byte> pieces[] = {std::as_writable_bytes(std::span<char>(meta.data(), meta.size())), target};
  size_t n = 0;
  KVAGENT_RETURN_IF_ERROR(t.reader->ReadV(t.loc.offset + t.loc.payload_offset - meta.size(), pieces, &n));
  if (n < meta.size()) return DataLossError("record truncated (header and metadata)");
  if (seg != nullptr) KVAGENT_RETURN_IF_ERROR(ParseMeta(t, meta, seg));
  if (n != meta.size() + target.size()) return DataLossError("record truncated (payload)");
  if (Checksum64(target) != t.loc.payload_checksum) return DataLossError("record payload checksum mismatch");
  if (t.loc.codec != CodecKind::kRaw) return DecodePayload(t.info.layout, t.loc.codec, encoded, dst);
  return Status::Ok();
}

void DiskTierImpl::Quarantine(const Hash128& key, const RecordLocation& loc, const Status& why) {
  (void)why;
  std::lock_guard<std::mutex> l(mu_);
  ++corrupt_;
  auto it = index_.find(key);
  if (it == index_.end() || it->second.loc.file_no != loc.file_no || it->second.loc.offset != loc.offset) return;
  EraseLocked(key);
  // The tombstone keeps an older version of the key from resurfacing on the next scan.
  WriteTombstonesLocked({key}).IgnoreError();
  CommitCatalogLocked({}, {key});
}

StatusOr<SegmentHandle> DiskTierImpl::Get(const Hash128& key, const Hash128& model) {
  return Get(key, model, [](size_t n) { return Buffer::Allocate(n); });
}

StatusOr<SegmentHandle> DiskTierImpl::Get(const Hash128& key, const Hash128& model, const PayloadAllocator& allocate) {
  KVAGENT_ASSIGN_OR_RETURN(ReadTicket t, TicketFor(key, &model));
  auto seg = std::make_shared<Segment>();
  auto buf = allocate(t.info.payload_bytes);
  if (!buf.ok()) return buf.status();
  seg->payload = std::move(buf).value();
  Status s = ReadRecordInto(t, seg.get(), seg->payload->span());
  if (!s.ok()) {
    if (s.code() == StatusCode::kDataLoss) Quarantine(key, t.loc, s);
    return s.WithContext("disk tier: segment " + key.ToHex());
  }
  ++hits_;
  return SegmentHandle(std::move(seg));
}

Status DiskTierImpl::ReadPayload(const Hash128& key, const Hash128& model, std::span<std::byte> dst) {
  KVAGENT_ASSIGN_OR_RETURN(ReadTicket t, TicketFor(key, &model));
  if (dst.size() != t.info.payload_bytes)
    return InvalidArgumentError("ReadPayload: destination has " + std::to_string(dst.size()) + " bytes, segment has " +
                                std::to_string(t.info.payload_bytes));
  Status s = ReadRecordInto(t, nullptr, dst);
  if (!s.ok()) {
    if (s.code() == StatusCode::kDataLoss) Quarantine(key, t.loc, s);
    return s.WithContext("disk tier: segment " + key.ToHex());
  }
  ++hits_;
  return Status::Ok();
}

StatusOr<SegmentInfo> DiskTierImpl::Info(const Hash128& key) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = index_.find(key);
  if (it == index_.end()) return NotFoundError("disk tier: no segment " + key.ToHex());
  return it->second.info;
}

bool DiskTierImpl::Contains(const Hash128& key) {
  std::lock_guard<std::mutex> l(mu_);
  return index_.count(key) > 0;
}

std::vector<SegmentInfo> DiskTierImpl::List(const SegmentFilter& filter) {
  std::vector<std::pair<RecordLocation, SegmentInfo>> hits;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (const auto& [k, e] : index_)
      if (filter.Matches(e.info)) hits.emplace_back(e.loc, e.info);
  }
  std::sort(hits.begin(), hits.end(), [](const auto& a, const auto& b) { return Before(a.first, b.first); });
  std::vector<SegmentInfo> out;
  out.reserve(hits.size());
  for (auto& h : hits) out.push_back(std::move(h.second));
  return out;
}

Status DiskTierImpl::Sync() {
  std::lock_guard<std::mutex> l(mu_);
  CompleteLocked(nullptr);
  Status s = active_ ? active_->Sync() : Status::Ok();
  // After the data: a committed row never points at bytes that are not durable.
  if (s.ok()) FlushCatalogLocked();
  return s;
}

TierStats DiskTierImpl::Stats() {
  std::lock_guard<std::mutex> l(mu_);
  TierStats s;
  s.hits = hits_;
  s.misses = misses_;
  s.puts = puts_;
  s.evictions = evictions_;
  s.segments = index_.size();
  s.bytes = live_bytes_;
  s.capacity_bytes = opts_.capacity_bytes;
  s.file_bytes = file_bytes_;
  s.corrupt_records = corrupt_ + recovery_.corrupt_records;
  return s;
}

RecoveryReport DiskTierImpl::Recovery() {
  std::lock_guard<std::mutex> l(mu_);
  return recovery_;
}

StatusOr<VerifyReport> DiskTierImpl::Verify(ProgressFn progress) {
  std::vector<std::pair<Hash128, ReadTicket>> todo;
  uint64_t total = 0;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (const auto& [k, e] : index_) {
      auto f = files_.find(e.loc.file_no);
      todo.emplace_back(k, ReadTicket{e.loc, e.info, f == files_.end() ? nullptr : f->second.reader});
      total += e.loc.record_len;
    }
  }
  std::sort(todo.begin(), todo.end(), [](const auto& a, const auto& b) { return Before(a.second.loc, b.second.loc); });
  VerifyReport r;
  uint64_t done = 0;
  std::vector<std::byte> payload;
  for (const auto& [key, t] : todo) {
    ++r.records;
    Status s = t.reader ? Status::Ok() : DataLossError("segment file missing");
    Segment seg;
    if (s.ok()) {
      payload.resize(t.info.payload_bytes);
      s = ReadRecordInto(t, &seg, payload);
    }
    if (s.ok()) {
      ++r.ok;
      r.bytes += t.loc.record_len;
    } else {
      ++r.corrupt;
      r.problems.push_back("segment " + key.ToHex() + " in " + FilePath(t.loc.file_no) + " at offset " +
                           std::to_string(t.loc.offset) + ": " + s.ToString());
      if (s.code() == StatusCode::kDataLoss) Quarantine(key, t.loc, s);
    }
    done += t.loc.record_len;
    if (progress) progress(done, total);
  }
  return r;
}

StatusOr<CompactReport> DiskTierImpl::Compact(ProgressFn progress) {
  std::lock_guard<std::mutex> l(mu_);
  CompleteLocked(nullptr);
  return CompactLocked(progress);
}

}  // namespace disk
}  // namespace kvagent
