#include "kvagent/fault_injection_env.h"

#include <algorithm>
#include <deque>

namespace kvagent {

namespace {

std::string DirOf(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

}  // namespace

class FaultWritableFile final : public WritableFile {
 public:
  FaultWritableFile(FaultInjectionEnv* env, std::string path, std::unique_ptr<WritableFile> base, bool async)
      : env_(env), path_(std::move(path)), base_(std::move(base)), async_(async) {}

  Status Append(std::span<const std::byte> data) override {
    KVAGENT_RETURN_IF_ERROR(WaitAsync(last_id_));  // in order: the deferred ones first (or their error)
    return AppendNow(data);
  }
  StatusOr<uint64_t> AppendAsync(std::span<const std::byte> data) override {
    if (!async_) return WritableFile::AppendAsync(data);
    KVAGENT_RETURN_IF_ERROR(async_error_);
    deferred_.push_back(Deferred{++last_id_, data});
    deferred_bytes_ += data.size();
    return last_id_;
  }
  Status WaitAsync(uint64_t id) override {
    while (!deferred_.empty() && deferred_.front().id <= id && async_error_.ok()) {
      const Deferred d = deferred_.front();
      deferred_.pop_front();
      deferred_bytes_ -= d.data.size();
      Status s = AppendNow(d.data);
      if (!s.ok()) {
        async_error_ = s;
        deferred_.clear();  // queued behind the failed write: never written
        deferred_bytes_ = 0;
      }
    }
    return async_error_;
  }
  Status Flush() override { return base_->Flush(); }
  Status Sync() override {
    KVAGENT_RETURN_IF_ERROR(WaitAsync(last_id_));
    if (env_->TakeSyncFault()) return InternalError("fdatasync " + path_ + ": injected sync error");
    KVAGENT_RETURN_IF_ERROR(base_->Sync());
    env_->RecordSync(path_, base_->Size());
    return Status::Ok();
  }
  Status Close() override {
    Status waited = WaitAsync(last_id_);
    Status s = base_->Close();
    return waited.ok() ? s : waited;
  }
  uint64_t Size() const override { return base_->Size() + deferred_bytes_; }
  size_t DirectIoAlignment() const override { return async_ ? 4096 : base_->DirectIoAlignment(); }

 private:
  struct Deferred {
    uint64_t id;
    std::span<const std::byte> data;
  };

  Status AppendNow(std::span<const std::byte> data) {
    uint64_t allowed = data.size();
    auto fault = env_->TakeWriteFault(data.size(), &allowed);
    if (allowed > 0) KVAGENT_RETURN_IF_ERROR(base_->Append(data.first(allowed)));
    switch (fault) {
      case FaultInjectionEnv::WriteFault::kNone:
        return Status::Ok();
      case FaultInjectionEnv::WriteFault::kFail:
        return InternalError("write " + path_ + ": injected write error");
      case FaultInjectionEnv::WriteFault::kShort:
        return InternalError("write " + path_ + ": injected short write (" + std::to_string(allowed) + " of " +
                             std::to_string(data.size()) + " bytes)");
      case FaultInjectionEnv::WriteFault::kFull:
        return ResourceExhaustedError("write " + path_ + ": no space left on device (injected)");
    }
    return Status::Ok();
  }

  FaultInjectionEnv* env_;
  std::string path_;
  std::unique_ptr<WritableFile> base_;
  bool async_;
  std::deque<Deferred> deferred_;
  uint64_t deferred_bytes_ = 0;
  uint64_t last_id_ = 0;
  Status async_error_;
};

FaultInjectionEnv::FaultInjectionEnv(Env* base) : base_(base) {}
FaultInjectionEnv::~FaultInjectionEnv() = default;

void FaultInjectionEnv::FailNextWrites(int n) {
  std::lock_guard<std::mutex> l(mu_);
  fail_writes_ = n;
}
void FaultInjectionEnv::ShortNextWrite(uint64_t bytes) {
  std::lock_guard<std::mutex> l(mu_);
  short_write_ = true;
  short_write_bytes_ = bytes;
}
void FaultInjectionEnv::FailNextSyncs(int n) {
  std::lock_guard<std::mutex> l(mu_);
  fail_syncs_ = n;
}
void FaultInjectionEnv::SetDiskBudget(uint64_t bytes) {
  std::lock_guard<std::mutex> l(mu_);
  budget_on_ = true;
  budget_ = bytes;
}
void FaultInjectionEnv::SimulateAsyncDirectIo(bool on) {
  std::lock_guard<std::mutex> l(mu_);
  async_direct_ = on;
}
bool FaultInjectionEnv::AsyncDirect() const {
  std::lock_guard<std::mutex> l(mu_);
  return async_direct_;
}
void FaultInjectionEnv::ClearDiskBudget() {
  std::lock_guard<std::mutex> l(mu_);
  budget_on_ = false;
}
void FaultInjectionEnv::ClearFaults() {
  std::lock_guard<std::mutex> l(mu_);
  fail_writes_ = 0;
  short_write_ = false;
  fail_syncs_ = 0;
  budget_on_ = false;
}

uint64_t FaultInjectionEnv::injected_write_errors() const {
  std::lock_guard<std::mutex> l(mu_);
  return write_errors_;
}
uint64_t FaultInjectionEnv::injected_sync_errors() const {
  std::lock_guard<std::mutex> l(mu_);
  return sync_errors_;
}
uint64_t FaultInjectionEnv::injected_enospc() const {
  std::lock_guard<std::mutex> l(mu_);
  return enospc_;
}

FaultInjectionEnv::WriteFault FaultInjectionEnv::TakeWriteFault(uint64_t size, uint64_t* allowed) {
  std::lock_guard<std::mutex> l(mu_);
  *allowed = size;
  if (fail_writes_ > 0) {
    --fail_writes_;
    ++write_errors_;
    *allowed = 0;
    return WriteFault::kFail;
  }
  if (short_write_) {
    short_write_ = false;
    ++write_errors_;
    *allowed = std::min(size, short_write_bytes_);
    if (budget_on_) budget_ -= std::min(budget_, *allowed);
    return WriteFault::kShort;
  }
  if (budget_on_) {
    if (size > budget_) {
      *allowed = budget_;
      budget_ = 0;
      ++enospc_;
      return WriteFault::kFull;
    }
    budget_ -= size;
  }
  return WriteFault::kNone;
}

bool FaultInjectionEnv::TakeSyncFault() {
  std::lock_guard<std::mutex> l(mu_);
  if (fail_syncs_ == 0) return false;
  --fail_syncs_;
  ++sync_errors_;
  return true;
}

void FaultInjectionEnv::RecordSync(const std::string& path, uint64_t size) {
  std::lock_guard<std::mutex> l(mu_);
  files_[path].synced = size;
}

Status FaultInjectionEnv::DropUnsyncedData() {
  std::map<std::string, FileState> files;
  {
    std::lock_guard<std::mutex> l(mu_);
    files = files_;
  }
  Status first;
  for (const auto& [path, st] : files) {
    if (!base_->FileExists(path)) continue;
    Status s;
    if (!st.dir_synced) {
      s = base_->RemoveFile(path);
    } else {
      auto size = base_->GetFileSize(path);
      if (!size.ok()) {
        s = size.status();
      } else if (*size > st.synced) {
        s = base_->TruncateFile(path, st.synced);
      }
    }
    if (!s.ok() && first.ok()) first = s;
  }
  std::lock_guard<std::mutex> l(mu_);
  files_.clear();
  return first;
}

StatusOr<std::unique_ptr<RandomAccessFile>> FaultInjectionEnv::NewRandomAccessFile(const std::string& path) {
  return base_->NewRandomAccessFile(path);
}

StatusOr<std::unique_ptr<WritableFile>> FaultInjectionEnv::NewWritableFile(const std::string& path) {
  bool existed = base_->FileExists(path);
  KVAGENT_ASSIGN_OR_RETURN(auto file, base_->NewWritableFile(path));
  {
    std::lock_guard<std::mutex> l(mu_);
    FileState& st = files_[path];
    st.synced = 0;
    if (!existed) st.dir_synced = false;
  }
  return std::unique_ptr<WritableFile>(new FaultWritableFile(this, path, std::move(file), AsyncDirect()));
}

StatusOr<std::unique_ptr<WritableFile>> FaultInjectionEnv::NewAppendableFile(const std::string& path) {
  bool existed = base_->FileExists(path);
  KVAGENT_ASSIGN_OR_RETURN(auto file, base_->NewAppendableFile(path));
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = files_.find(path);
    if (it == files_.end()) {
      FileState st;
      st.synced = file->Size();
      st.dir_synced = existed;
      files_.emplace(path, st);
    }
  }
  return std::unique_ptr<WritableFile>(new FaultWritableFile(this, path, std::move(file), AsyncDirect()));
}

bool FaultInjectionEnv::FileExists(const std::string& path) { return base_->FileExists(path); }

StatusOr<std::vector<std::string>> FaultInjectionEnv::GetChildren(const std::string& dir) {
  return base_->GetChildren(dir);
}

Status FaultInjectionEnv::RemoveFile(const std::string& path) {
  KVAGENT_RETURN_IF_ERROR(base_->RemoveFile(path));
  std::lock_guard<std::mutex> l(mu_);
  files_.erase(path);
  return Status::Ok();
}

Status FaultInjectionEnv::RenameFile(const std::string& from, const std::string& to) {
  KVAGENT_RETURN_IF_ERROR(base_->RenameFile(from, to));
  std::lock_guard<std::mutex> l(mu_);
  auto it = files_.find(from);
  FileState st;
  if (it != files_.end()) {
    st = it->second;
    files_.erase(it);
  } else {
    auto size = base_->GetFileSize(to);
    st.synced = size.ok() ? *size : 0;
  }
  // The new name is durable only once its directory is synced.
  st.dir_synced = false;
  files_[to] = st;
  return Status::Ok();
}

Status FaultInjectionEnv::CreateDirs(const std::string& dir) { return base_->CreateDirs(dir); }

StatusOr<uint64_t> FaultInjectionEnv::GetFileSize(const std::string& path) { return base_->GetFileSize(path); }

Status FaultInjectionEnv::TruncateFile(const std::string& path, uint64_t size) {
  KVAGENT_RETURN_IF_ERROR(base_->TruncateFile(path, size));
  std::lock_guard<std::mutex> l(mu_);
  auto it = files_.find(path);
  if (it != files_.end()) it->second.synced = std::min(it->second.synced, size);
  return Status::Ok();
}

Status FaultInjectionEnv::SyncDir(const std::string& dir) {
  KVAGENT_RETURN_IF_ERROR(base_->SyncDir(dir));
  std::lock_guard<std::mutex> l(mu_);
  for (auto& [path, st] : files_)
    if (DirOf(path) == dir) st.dir_synced = true;
  return Status::Ok();
}

StatusOr<std::unique_ptr<FileLock>> FaultInjectionEnv::LockFile(const std::string& path) {
  return base_->LockFile(path);
}

StatusOr<uint64_t> FaultInjectionEnv::FreeSpace(const std::string& path) {
  KVAGENT_ASSIGN_OR_RETURN(uint64_t free, base_->FreeSpace(path));
  std::lock_guard<std::mutex> l(mu_);
  return budget_on_ ? std::min(free, budget_) : free;
}

uint64_t FaultInjectionEnv::NowMicros() { return base_->NowMicros(); }
int64_t FaultInjectionEnv::WallMicros() { return base_->WallMicros(); }
void FaultInjectionEnv::SleepForMicros(uint64_t micros) { base_->SleepForMicros(micros); }

}  // namespace kvagent
