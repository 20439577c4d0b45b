// Opening a disk tier: lock, load the catalog, then scan every segment file past the catalog's
// known end so the files, not the catalog, decide what is stored (docs/storage-format.md).
#include <algorithm>
#include <charconv>
#include <cstring>

#include "store/disk_tier_impl.h"

namespace kvagent::disk {

namespace {

constexpr const char* kFloorFile = "COMPACTED";
constexpr size_t kScanBlock = 1 << 20;

bool ParseSegmentName(const std::string& name, uint64_t* no) {
  constexpr std::string_view kPrefix = "segments-", kSuffix = ".kvs";
  if (name.size() <= kPrefix.size() + kSuffix.size()) return false;
  if (name.compare(0, kPrefix.size(), kPrefix) != 0) return false;
  if (name.compare(name.size() - kSuffix.size(), kSuffix.size(), kSuffix) != 0) return false;
  std::string_view digits(name.data() + kPrefix.size(), name.size() - kPrefix.size() - kSuffix.size());
  auto [p, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), *no);
  return ec == std::errc() && p == digits.data() + digits.size() && *no > 0;
}

bool Before(const RecordLocation& a, const RecordLocation& b) {
  return a.file_no != b.file_no ? a.file_no < b.file_no : a.offset < b.offset;
}

// First 64-byte aligned offset >= from whose bytes parse as a valid record header; `size` if none.
uint64_t FindNextHeader(const RandomAccessFile& f, uint64_t from, uint64_t size) {
  std::vector<std::byte> block;
  for (uint64_t base = AlignUp(from); base + kHeaderSize <= size; base += kScanBlock) {
    size_t want = static_cast<size_t>(std::min<uint64_t>(kScanBlock + kHeaderSize, size - base));
    block.resize(want);
    size_t n = 0;
    if (!f.Read(base, block, &n).ok()) return size;
    for (size_t at = 0; at < kScanBlock && at + kHeaderSize <= n; at += kAlign) {
      uint32_t magic;
      std::memcpy(&magic, block.data() + at, 4);
      if (magic != kRecordMagic) continue;
      RecordHeader h;
      if (DecodeHeader(std::span<const std::byte>(block.data() + at, kHeaderSize), &h).ok()) return base + at;
    }
  }
  return size;
}

}  // namespace

StatusOr<std::unique_ptr<DiskTier>> DiskTierImpl::OpenImpl(const DiskTierOptions& options) {
  if (options.dir.empty()) return InvalidArgumentError("disk tier: dir is empty");
  if (options.max_file_bytes < kHeaderSize * 2) return InvalidArgumentError("disk tier: max_file_bytes too small");
  if (!(options.compact_dead_ratio > 0.0 && options.compact_dead_ratio <= 1.0))
    return InvalidArgumentError("disk tier: compact_dead_ratio must be in (0, 1]");
  if (options.codec != CodecKind::kRaw && options.codec != CodecKind::kInt8)
    return InvalidArgumentError("disk tier: unknown codec");
  std::unique_ptr<DiskTierImpl> t(new DiskTierImpl(options));
  {
    std::lock_guard<std::mutex> l(t->mu_);
    KVAGENT_RETURN_IF_ERROR(t->Recover());
  }
  return std::unique_ptr<DiskTier>(std::move(t));
}

Status DiskTierImpl::LoadCatalog(std::vector<CatalogEntry>* entries, std::map<uint64_t, uint64_t>* ends) {
  if (!env_->IsPosix()) {
    // SQLite cannot see this Env's files: keep a private in-memory catalog, rebuilt by the scan.
    KVAGENT_ASSIGN_OR_RETURN(catalog_, Catalog::Open(""));
    return Status::Ok();
  }
  const std::string path = dir_ + "/catalog.sqlite";
  bool existed = env_->FileExists(path);
  auto c = Catalog::Open(path);
  Status s = c.ok() ? Status::Ok() : c.status();
  if (s.ok()) {
    catalog_ = std::move(c).value();
    s = catalog_->Load(entries, ends);
  }
  if (!s.ok()) {
    recovery_.problems.push_back("catalog " + path + " unusable, rebuilt from segment files: " + s.ToString());
    catalog_.reset();
    entries->clear();
    ends->clear();
    for (const char* suffix : {"", "-wal", "-shm"})
      if (env_->FileExists(path + suffix)) KVAGENT_RETURN_IF_ERROR(env_->RemoveFile(path + suffix));
    KVAGENT_ASSIGN_OR_RETURN(catalog_, Catalog::Open(path));
    recovery_.catalog_rebuilt = true;
  } else if (!existed && !files_.empty()) {
    recovery_.catalog_rebuilt = true;
  }
  return Status::Ok();
}

Status DiskTierImpl::Recover() {
  KVAGENT_RETURN_IF_ERROR(env_->CreateDirs(dir_));
  KVAGENT_ASSIGN_OR_RETURN(lock_, env_->LockFile(dir_ + "/LOCK"));

  // Files below the floor are leftovers of a compaction that committed but crashed before
  // removing them: their live records were copied, so they are dropped unread.
  uint64_t floor = 0;
  const std::string floor_path = dir_ + "/" + kFloorFile;
  if (env_->FileExists(floor_path)) {
    KVAGENT_ASSIGN_OR_RETURN(std::string text, ReadFileToString(env_, floor_path));
    auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), floor);
    if (ec != std::errc() || p != text.data() + text.size()) {
      recovery_.problems.push_back("ignoring malformed " + floor_path);
      floor = 0;
    }
  }
  KVAGENT_ASSIGN_OR_RETURN(auto children, env_->GetChildren(dir_));
  std::vector<uint64_t> below_floor;
  for (const auto& name : children) {
    uint64_t no = 0;
    if (!ParseSegmentName(name, &no)) continue;
    if (no < floor) {
      below_floor.push_back(no);
      continue;
    }
    std::string path = FilePath(no);
    KVAGENT_ASSIGN_OR_RETURN(uint64_t size, env_->GetFileSize(path));
    KVAGENT_ASSIGN_OR_RETURN(auto reader, env_->NewRandomAccessFile(path));
    files_[no] = FileInfo{path, std::shared_ptr<RandomAccessFile>(std::move(reader)), size, false};
  }
  std::sort(below_floor.begin(), below_floor.end());
  for (uint64_t no : below_floor) KVAGENT_RETURN_IF_ERROR(env_->RemoveFile(FilePath(no)));
  recovery_.files = files_.size();

  std::vector<CatalogEntry> entries;
  std::map<uint64_t, uint64_t> ends;
  KVAGENT_RETURN_IF_ERROR(LoadCatalog(&entries, &ends));

  std::vector<Hash128> removes;
  std::sort(entries.begin(), entries.end(), [](const auto& a, const auto& b) { return Before(a.loc, b.loc); });
  for (const auto& e : entries) {
    auto f = files_.find(e.loc.file_no);
    if (f == files_.end() || e.loc.offset + e.loc.record_len > f->second.size || e.loc.offset % kAlign != 0) {
      ++recovery_.corrupt_records;
      recovery_.problems.push_back("catalog entry " + e.info.key.ToHex() + " points past the end of " +
                                   FilePath(e.loc.file_no) + "; dropped");
      removes.push_back(e.info.key);
      continue;
    }
    InsertLocked(e.info.key, e.loc, e.info);
  }
  std::vector<uint64_t> forget;
  for (const auto& [no, end] : ends)
    if (!files_.count(no)) forget.push_back(no);

  for (auto& [no, fi] : files_) {
    auto known = ends.find(no);
    // A file shorter than the catalog's known end lost data after the catalog saw it (only
    // possible without sync): rescan it whole; records already indexed are skipped by position.
    uint64_t start = known == ends.end() || known->second > fi.size ? 0 : known->second;
    KVAGENT_RETURN_IF_ERROR(ScanFile(no, start));
    file_bytes_ += fi.size;
    pending_ends_[no] = fi.size;
  }
  next_file_no_ = std::max<uint64_t>({next_file_no_, floor, files_.empty() ? 1 : files_.rbegin()->first + 1});

  // Persist what the scan learned: one transaction with every key whose row may be stale.
  if (catalog_ok_) {
    Status s = catalog_->Begin();
    for (uint64_t no : forget)
      if (s.ok()) s = catalog_->ForgetFile(no);
    if (s.ok()) s = catalog_->Commit();
    if (!s.ok()) {
      catalog_->Rollback();
      catalog_ok_ = false;
    }
  }
  std::vector<Hash128> upserts;
  std::unordered_map<Hash128, RecordLocation, Hash128Hasher> in_catalog;
  for (const auto& e : entries) in_catalog[e.info.key] = e.loc;
  for (const auto& [key, e] : index_) {
    auto c = in_catalog.find(key);
    if (c == in_catalog.end() || c->second.file_no != e.loc.file_no || c->second.offset != e.loc.offset)
      upserts.push_back(key);
  }
  for (const auto& [key, loc] : in_catalog)
    if (!index_.count(key)) removes.push_back(key);
  CommitCatalogLocked(upserts, removes);
  EvictLocked(Hash128{});
  return Status::Ok();
}

void DiskTierImpl::ApplyScanned(const RecordHeader& h, uint64_t file_no, uint64_t offset, const Segment* meta) {
  RecordLocation loc{file_no, offset, h.record_len, h.payload_offset, h.payload_len, h.payload_checksum, h.codec};
  auto it = index_.find(h.key);
  if (it != index_.end() && !Before(it->second.loc, loc)) return;  // the index holds a newer record
  if (meta == nullptr) {  // tombstone, or a corrupt record whose header names its key
    EraseLocked(h.key);
    return;
  }
  SegmentInfo info = InfoOf(*meta);
  info.stored_bytes = h.record_len;
  info.codec = static_cast<uint8_t>(h.codec);
  InsertLocked(h.key, loc, info);
}

Status DiskTierImpl::ScanFile(uint64_t file_no, uint64_t start) {
  FileInfo& fi = files_[file_no];
  const RandomAccessFile& f = *fi.reader;
  const uint64_t size = fi.size;
  uint64_t off = start;
  std::vector<std::byte> rec;
  auto problem = [&](uint64_t at, const std::string& what) {
    recovery_.problems.push_back(fi.path + " offset " + std::to_string(at) + ": " + what);
  };
  while (off < size) {
    RecordHeader h;
    std::byte hdr[kHeaderSize];
    Status hs;
    if (size - off < kHeaderSize) {
      hs = DataLossError("incomplete record header");
    } else {
      size_t n = 0;
      KVAGENT_RETURN_IF_ERROR(f.Read(off, hdr, &n));
      hs = n == kHeaderSize ? DecodeHeader(hdr, &h) : DataLossError("short read");
      if (hs.ok() && h.record_len > size - off) hs = DataLossError("record extends past the end of the file");
    }
    if (!hs.ok()) {
      uint64_t next = FindNextHeader(f, off + kAlign, size);
      if (next >= size) {
        // Nothing valid follows: an incomplete final append (or damage we cannot tell from
        // one). Cut it so the next append starts on a clean boundary.
        problem(off, "torn tail of " + std::to_string(size - off) + " bytes cut (" + hs.message() + ")");
        ++recovery_.torn_tails;
        recovery_.torn_bytes += size - off;
        Status ts = env_->TruncateFile(fi.path, off);
        if (ts.ok()) {
          fi.size = off;
        } else {
          fi.sealed = true;
          problem(off, "cannot cut torn tail: " + ts.ToString());
        }
        recovery_.scanned_bytes += size - start;
        return Status::Ok();
      }
      ++recovery_.corrupt_records;
      problem(off, "corrupt record skipped (" + hs.message() + "); resuming at offset " + std::to_string(next));
      off = next;
      continue;
    }
    if (h.kind == RecordKind::kPadding) {  // filler before a block boundary: nothing to index
      off += h.record_len;
      continue;
    }
    rec.resize(h.record_len);
    size_t n = 0;
    KVAGENT_RETURN_IF_ERROR(f.Read(off, rec, &n));
    Status rs = n == rec.size() ? Status::Ok() : DataLossError("short read");
    Segment meta;
    if (rs.ok() && h.kind == RecordKind::kSegment) {
      std::span<const std::byte> m(rec.data() + kHeaderSize, h.meta_len);
      std::span<const std::byte> p(rec.data() + h.payload_offset, h.payload_len);
      if (Checksum64(m) != h.meta_checksum) {
        rs = DataLossError("metadata checksum mismatch");
      } else if (Checksum64(p) != h.payload_checksum) {
        rs = DataLossError("payload checksum mismatch");
      } else {
        rs =
            DecodeMeta(std::string_view(reinterpret_cast<const char*>(m.data()), m.size()), h.layout.num_tokens, &meta);
      }
      meta.key = h.key;
      meta.model = h.model;
      meta.layout = h.layout;
      meta.pre_rope = h.pre_rope;
    }
    if (!rs.ok()) {
      ++recovery_.corrupt_records;
      problem(off, "corrupt record " + h.key.ToHex() + " skipped (" + rs.message() + ")");
      ApplyScanned(h, file_no, off, nullptr);
    } else {
      ApplyScanned(h, file_no, off, h.kind == RecordKind::kSegment ? &meta : nullptr);
      ++recovery_.records_indexed;
    }
    off += h.record_len;
  }
  recovery_.scanned_bytes += size - start;
  return Status::Ok();
}

}  // namespace kvagent::disk
