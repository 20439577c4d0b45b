// Compaction: copy every live record into new files, make them durable, switch the catalog in
// one transaction, then remove the old files oldest first (docs/storage-format.md argues why
// a crash at any step loses nothing).
#include <algorithm>

#include "store/disk_tier_impl.h"

namespace kvagent::disk {

namespace {

struct Output {
  uint64_t no = 0;
  std::string path;
  std::unique_ptr<WritableFile> file;
  uint64_t size = 0;
};

}  // namespace

StatusOr<CompactReport> DiskTierImpl::CompactLocked(const ProgressFn& progress) {
  CompactReport r;
  r.files_before = files_.size();
  r.bytes_before = file_bytes_;
  if (active_) {
    Status s = active_->Sync();
    active_->Close().IgnoreError();
    active_.reset();
    active_no_ = 0;
    KVAGENT_RETURN_IF_ERROR(s);
  }
  FlushCatalogLocked();  // batched rows first, so the switch below starts from a current catalog

  std::vector<std::pair<Hash128, RecordLocation>> live;
  live.reserve(index_.size());
  for (const auto& [k, e] : index_) live.emplace_back(k, e.loc);
  std::sort(live.begin(), live.end(), [](const auto& a, const auto& b) {
    return a.second.file_no != b.second.file_no ? a.second.file_no < b.second.file_no
                                                : a.second.offset < b.second.offset;
  });

  const uint64_t first_new = next_file_no_;
  std::vector<Output> outs;
  std::vector<std::pair<Hash128, RecordLocation>> moved;
  std::vector<Hash128> dropped;
  auto abandon = [&](const Status& s) {
    for (auto& o : outs) {
      if (o.file) o.file->Close().IgnoreError();
      env_->RemoveFile(o.path).IgnoreError();
    }
    return s.WithContext("compaction aborted, old files kept");
  };

  std::vector<std::byte> rec;
  uint64_t done = 0;
  for (const auto& [key, loc] : live) {
    rec.resize(loc.record_len);
    size_t n = 0;
    Status s = files_.at(loc.file_no).reader->Read(loc.offset, rec, &n);
    if (!s.ok()) return abandon(s);
    // Only verified records are copied: compaction must never launder a corrupt one.
    RecordHeader h;
    Status v = n == rec.size() ? DecodeHeader(rec, &h) : DataLossError("record truncated");
    if (v.ok() && (h.key != key || h.record_len != loc.record_len || h.payload_checksum != loc.payload_checksum))
      v = DataLossError("record header disagrees with the catalog");
    if (v.ok() && Checksum64(std::span<const std::byte>(rec.data() + kHeaderSize, h.meta_len)) != h.meta_checksum)
      v = DataLossError("metadata checksum mismatch");
    if (v.ok() &&
        Checksum64(std::span<const std::byte>(rec.data() + h.payload_offset, h.payload_len)) != h.payload_checksum)
      v = DataLossError("payload checksum mismatch");
    if (!v.ok()) {
      dropped.push_back(key);
      continue;
    }
    if (outs.empty() || (outs.back().size > 0 && outs.back().size + rec.size() > opts_.max_file_bytes)) {
      Output o;
      o.no = next_file_no_++;
      o.path = FilePath(o.no);
      auto f = env_->NewWritableFile(o.path);
      if (!f.ok()) return abandon(f.status());
      o.file = std::move(f).value();
      outs.push_back(std::move(o));
    }
    Output& o = outs.back();
    s = o.file->Append(rec);
    if (!s.ok()) return abandon(s);
    RecordLocation nl = loc;
    nl.file_no = o.no;
    nl.offset = o.size;
    o.size += rec.size();
    moved.emplace_back(key, nl);
    done += loc.record_len;
    if (progress) progress(done, live_bytes_);
  }
  for (auto& o : outs) {
    Status s = o.file->Sync();
    if (s.ok()) s = o.file->Close();
    if (!s.ok()) return abandon(s);
  }
  if (Status s = env_->SyncDir(dir_); !s.ok()) return abandon(s);

  // Switch the catalog: forget every old file, point live keys at their copies.
  if (catalog_ok_) {
    Status s = catalog_->Begin();
    for (const auto& [no, fi] : files_)
      if (s.ok()) s = catalog_->ForgetFile(no);
    for (const auto& [key, nl] : moved) {
      if (!s.ok()) break;
      s = catalog_->Upsert(CatalogEntry{nl, index_.at(key).info});
    }
    for (const auto& o : outs)
      if (s.ok()) s = catalog_->SetFileEnd(o.no, o.size);
    if (s.ok()) s = catalog_->Commit();
    if (!s.ok()) {
      catalog_->Rollback();
      return abandon(s);
    }
  }
  // Past this point the copies are authoritative. The floor lets the next Open drop old files
  // a crash left behind without reading them; without it they would be rescanned, which is
  // also correct (their records are older than the copies).
  const std::string floor_path = dir_ + "/COMPACTED";
  if (WriteStringToFile(env_, std::to_string(first_new), floor_path + ".tmp", true).ok())
    env_->RenameFile(floor_path + ".tmp", floor_path).IgnoreError();
  // Oldest first, so any files a crash leaves behind are a suffix of the old log and every
  // tombstone in them still follows the records it deletes.
  for (const auto& [no, fi] : files_) env_->RemoveFile(fi.path).IgnoreError();
  env_->SyncDir(dir_).IgnoreError();

  std::map<uint64_t, FileInfo> new_files;
  file_bytes_ = 0;
  for (const auto& o : outs) {
    auto reader = env_->NewRandomAccessFile(o.path);
    if (!reader.ok()) return reader.status().WithContext("compaction: reopen " + o.path);
    new_files[o.no] = FileInfo{o.path, std::shared_ptr<RandomAccessFile>(std::move(reader).value()), o.size, false};
    file_bytes_ += o.size;
  }
  files_ = std::move(new_files);
  for (const auto& [key, nl] : moved) index_.at(key).loc = nl;
  for (const auto& key : dropped) {
    EraseLocked(key);
    ++corrupt_;
  }
  if (catalog_ok_ && !dropped.empty()) {
    Status s = catalog_->Begin();
    for (const auto& key : dropped)
      if (s.ok()) s = catalog_->Remove(key);
    if (s.ok()) s = catalog_->Commit();
    if (!s.ok()) {
      catalog_->Rollback();
      catalog_ok_ = false;
    }
  }
  pending_ends_.clear();
  r.files_after = files_.size();
  r.bytes_after = file_bytes_;
  r.records_moved = moved.size();
  return r;
}

}  // namespace kvagent::disk
