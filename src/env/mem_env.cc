// In-memory Env: a map of path -> shared file contents plus a set of directories.
// File contents are shared between handles (like inodes), so a reader opened before a rename
// or removal keeps seeing its data, as on POSIX.
#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <set>

#include "kvagent/env.h"

namespace kvagent {

namespace {

struct MemFile {
  mutable std::mutex mu;
  std::string data;
};

struct MemFs {
  std::mutex mu;
  std::map<std::string, std::shared_ptr<MemFile>> files;
  std::set<std::string> dirs;
  std::set<std::string> locks;
  uint64_t capacity = 0;
  uint64_t used = 0;  // bytes in all files, guarded by mu
};

std::string Normalize(const std::string& path) {
  std::string out;
  out.reserve(path.size());
  for (char c : path) {
    if (c == '/' && !out.empty() && out.back() == '/') continue;
    out.push_back(c);
  }
  while (out.size() > 1 && out.back() == '/') out.pop_back();
  return out;
}

std::string Parent(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

class MemRandomAccessFile final : public RandomAccessFile {
 public:
  explicit MemRandomAccessFile(std::shared_ptr<MemFile> f) : f_(std::move(f)) {}
  Status Read(uint64_t offset, std::span<std::byte> dst, size_t* bytes_read) const override {
    std::lock_guard<std::mutex> l(f_->mu);
    *bytes_read = 0;
    if (offset >= f_->data.size()) return Status::Ok();
    size_t n = std::min<uint64_t>(dst.size(), f_->data.size() - offset);
    if (n > 0) std::memcpy(dst.data(), f_->data.data() + offset, n);
    *bytes_read = n;
    return Status::Ok();
  }
  StatusOr<uint64_t> Size() const override {
    std::lock_guard<std::mutex> l(f_->mu);
    return static_cast<uint64_t>(f_->data.size());
  }

 private:
  std::shared_ptr<MemFile> f_;
};

class MemWritableFile final : public WritableFile {
 public:
  MemWritableFile(std::shared_ptr<MemFs> fs, std::shared_ptr<MemFile> f, std::string path)
      : fs_(std::move(fs)), f_(std::move(f)), path_(std::move(path)) {}

  Status Append(std::span<const std::byte> data) override {
    if (closed_) return FailedPreconditionError("append to closed file " + path_);
    size_t n = data.size();
    bool full = false;
    {
      std::lock_guard<std::mutex> l(fs_->mu);
      if (fs_->capacity > 0) {
        uint64_t room = fs_->capacity > fs_->used ? fs_->capacity - fs_->used : 0;
        if (n > room) {
          n = room;
          full = true;
        }
      }
      fs_->used += n;
    }
    {
      std::lock_guard<std::mutex> l(f_->mu);
      f_->data.append(reinterpret_cast<const char*>(data.data()), n);
    }
    if (full) return ResourceExhaustedError("write " + path_ + ": no space left on device (in-memory fs)");
    return Status::Ok();
  }
  Status Flush() override { return Status::Ok(); }
  Status Sync() override {
    if (closed_) return FailedPreconditionError("sync of closed file " + path_);
    return Status::Ok();
  }
  Status Close() override {
    closed_ = true;
    return Status::Ok();
  }
  uint64_t Size() const override {
    std::lock_guard<std::mutex> l(f_->mu);
    return f_->data.size();
  }

 private:
  std::shared_ptr<MemFs> fs_;
  std::shared_ptr<MemFile> f_;
  std::string path_;
  bool closed_ = false;
};

class MemFileLock final : public FileLock {
 public:
  MemFileLock(std::shared_ptr<MemFs> fs, std::string path) : fs_(std::move(fs)), path_(std::move(path)) {}
  ~MemFileLock() override {
    std::lock_guard<std::mutex> l(fs_->mu);
    fs_->locks.erase(path_);
  }

 private:
  std::shared_ptr<MemFs> fs_;
  std::string path_;
};

class MemEnv final : public Env {
 public:
  explicit MemEnv(const MemEnvOptions& options) : fs_(std::make_shared<MemFs>()) {
    fs_->capacity = options.capacity_bytes;
    fs_->dirs.insert("/");
    fs_->dirs.insert(".");
  }

  StatusOr<std::unique_ptr<RandomAccessFile>> NewRandomAccessFile(const std::string& path) override {
    std::lock_guard<std::mutex> l(fs_->mu);
    auto it = fs_->files.find(Normalize(path));
    if (it == fs_->files.end()) return NotFoundError("open " + path + ": no such file");
    return std::unique_ptr<RandomAccessFile>(new MemRandomAccessFile(it->second));
  }

  StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path) override {
    return Open(path, /*truncate=*/true);
  }
  StatusOr<std::unique_ptr<WritableFile>> NewAppendableFile(const std::string& path) override {
    return Open(path, /*truncate=*/false);
  }

  bool FileExists(const std::string& path) override {
    std::lock_guard<std::mutex> l(fs_->mu);
    std::string p = Normalize(path);
    return fs_->files.count(p) > 0 || fs_->dirs.count(p) > 0;
  }

  StatusOr<std::vector<std::string>> GetChildren(const std::string& dir) override {
    std::lock_guard<std::mutex> l(fs_->mu);
    std::string d = Normalize(dir);
    if (fs_->dirs.count(d) == 0) return NotFoundError("opendir " + dir + ": no such directory");
    std::string prefix = d == "/" ? "/" : d + "/";
    std::vector<std::string> out;
    auto collect = [&](const std::string& p) {
      if (p.size() > prefix.size() && p.compare(0, prefix.size(), prefix) == 0 &&
          p.find('/', prefix.size()) == std::string::npos)
        out.push_back(p.substr(prefix.size()));
    };
    for (const auto& [p, f] : fs_->files) collect(p);
    for (const auto& p : fs_->dirs) collect(p);
    return out;
  }

  Status RemoveFile(const std::string& path) override {
    std::lock_guard<std::mutex> l(fs_->mu);
    auto it = fs_->files.find(Normalize(path));
    if (it == fs_->files.end()) return NotFoundError("unlink " + path + ": no such file");
    fs_->used -= SizeOf(*it->second);
    fs_->files.erase(it);
    return Status::Ok();
  }

  Status RenameFile(const std::string& from, const std::string& to) override {
    std::lock_guard<std::mutex> l(fs_->mu);
    std::string f = Normalize(from), t = Normalize(to);
    auto it = fs_->files.find(f);
    if (it == fs_->files.end()) return NotFoundError("rename " + from + ": no such file");
    if (fs_->dirs.count(Parent(t)) == 0) return NotFoundError("rename to " + to + ": no such directory");
    if (f == t) return Status::Ok();
    auto file = it->second;
    fs_->files.erase(it);
    auto old = fs_->files.find(t);
    if (old != fs_->files.end()) {
      fs_->used -= SizeOf(*old->second);
      old->second = file;
    } else {
      fs_->files.emplace(t, file);
    }
    return Status::Ok();
  }

  Status CreateDirs(const std::string& dir) override {
    std::lock_guard<std::mutex> l(fs_->mu);
    std::string d = Normalize(dir);
    if (d.empty()) return Status::Ok();
    for (size_t pos = 0; pos != std::string::npos;) {
      pos = d.find('/', pos + 1);
      std::string partial = d.substr(0, pos);
      if (partial.empty()) continue;
      if (fs_->files.count(partial)) return FailedPreconditionError(partial + " exists and is not a directory");
      fs_->dirs.insert(partial);
    }
    return Status::Ok();
  }

  StatusOr<uint64_t> GetFileSize(const std::string& path) override {
    std::lock_guard<std::mutex> l(fs_->mu);
    auto it = fs_->files.find(Normalize(path));
    if (it == fs_->files.end()) return NotFoundError("stat " + path + ": no such file");
    return SizeOf(*it->second);
  }

  Status TruncateFile(const std::string& path, uint64_t size) override {
    std::lock_guard<std::mutex> l(fs_->mu);
    auto it = fs_->files.find(Normalize(path));
    if (it == fs_->files.end()) return NotFoundError("truncate " + path + ": no such file");
    std::lock_guard<std::mutex> fl(it->second->mu);
    uint64_t old = it->second->data.size();
    if (size > old && fs_->capacity > 0 && fs_->used + (size - old) > fs_->capacity)
      return ResourceExhaustedError("truncate " + path + ": no space left on device (in-memory fs)");
    it->second->data.resize(size, '\0');
    fs_->used = fs_->used - old + size;
    return Status::Ok();
  }

  Status SyncDir(const std::string& dir) override {
    std::lock_guard<std::mutex> l(fs_->mu);
    if (fs_->dirs.count(Normalize(dir)) == 0) return NotFoundError("sync dir " + dir + ": no such directory");
    return Status::Ok();
  }

  StatusOr<std::unique_ptr<FileLock>> LockFile(const std::string& path) override {
    std::lock_guard<std::mutex> l(fs_->mu);
    std::string p = Normalize(path);
    if (fs_->dirs.count(Parent(p)) == 0) return NotFoundError("open lock " + path + ": no such directory");
    if (!fs_->locks.insert(p).second) return FailedPreconditionError(path + " is locked by another holder");
    if (fs_->files.count(p) == 0) fs_->files.emplace(p, std::make_shared<MemFile>());
    return std::unique_ptr<FileLock>(new MemFileLock(fs_, p));
  }

  StatusOr<uint64_t> FreeSpace(const std::string& path) override {
    std::lock_guard<std::mutex> l(fs_->mu);
    (void)path;
    if (fs_->capacity == 0) return uint64_t{1} << 40;
    return fs_->capacity > fs_->used ? fs_->capacity - fs_->used : 0;
  }

  uint64_t NowMicros() override { return Env::Default()->NowMicros(); }
  int64_t WallMicros() override { return Env::Default()->WallMicros(); }
  void SleepForMicros(uint64_t micros) override { Env::Default()->SleepForMicros(micros); }

 private:
  static uint64_t SizeOf(const MemFile& f) {
    std::lock_guard<std::mutex> l(f.mu);
    return f.data.size();
  }

  StatusOr<std::unique_ptr<WritableFile>> Open(const std::string& path, bool truncate) {
    std::lock_guard<std::mutex> l(fs_->mu);
    std::string p = Normalize(path);
    if (fs_->dirs.count(p)) return FailedPreconditionError(path + " is a directory");
    if (fs_->dirs.count(Parent(p)) == 0) return NotFoundError("create " + path + ": no such directory");
    auto& slot = fs_->files[p];
    if (!slot) {
      slot = std::make_shared<MemFile>();
    } else if (truncate) {
      std::lock_guard<std::mutex> fl(slot->mu);
      fs_->used -= slot->data.size();
      slot->data.clear();
    }
    return std::unique_ptr<WritableFile>(new MemWritableFile(fs_, slot, p));
  }

  std::shared_ptr<MemFs> fs_;
};

}  // namespace

std::unique_ptr<Env> NewMemEnv(const MemEnvOptions& options) { return std::make_unique<MemEnv>(options); }
std::unique_ptr<Env> NewMemEnv() { return NewMemEnv(MemEnvOptions{}); }

}  // namespace kvagent
