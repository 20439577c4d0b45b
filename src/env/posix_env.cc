// POSIX Env: pread/pwrite files (large appends optionally with O_DIRECT), fdatasync, flock-based store locks.
#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include "kvagent/env.h"

namespace kvagent {

namespace {

class PosixRandomAccessFile final : public RandomAccessFile {
 public:
  PosixRandomAccessFile(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}
  ~PosixRandomAccessFile() override { ::close(fd_); }

  Status Read(uint64_t offset, std::span<std::byte> dst, size_t* bytes_read) const override {
    size_t done = 0;
    while (done < dst.size()) {
      ssize_t r = ::pread(fd_, dst.data() + done, dst.size() - done, static_cast<off_t>(offset + done));
      if (r < 0) {
        if (errno == EINTR) continue;
        *bytes_read = done;
        return ErrnoToStatus(errno, "pread " + path_);
      }
      if (r == 0) break;  // end of file
      done += static_cast<size_t>(r);
    }
    *bytes_read = done;
    return Status::Ok();
  }

  StatusOr<uint64_t> Size() const override {
    struct stat st;
    if (::fstat(fd_, &st) != 0) return ErrnoToStatus(errno, "fstat " + path_);
    return static_cast<uint64_t>(st.st_size);
  }

 private:
  std::string path_;
  int fd_;
};

// An appending file. With a second descriptor opened with O_DIRECT (`dfd`, see
// Env::NewDirectWritableFile), an append of at least kDirectMin bytes that starts on a block
// boundary in memory and in the file goes, whole blocks of it, straight from the caller's memory
// to the device; everything else is written through the page cache. Both land before Append
// returns, so readers see every appended byte and a killed process loses nothing written. Every
// write is a pwrite at the file's end (size_), so the two descriptors never disagree about where
// that is, and direct writes only cover blocks no buffered write has touched.
class PosixWritableFile final : public WritableFile {
 public:
  static constexpr size_t kBlock = 4096;
  static constexpr size_t kDirectMin = size_t{1} << 20;

  PosixWritableFile(std::string path, int fd, uint64_t size, int dfd = -1)
      : path_(std::move(path)), fd_(fd), dfd_(dfd), size_(size) {}
  ~PosixWritableFile() override { Close().IgnoreError(); }

  Status Append(std::span<const std::byte> data) override {
    if (fd_ < 0) return FailedPreconditionError("append to closed file " + path_);
    if (dfd_ >= 0 && data.size() >= kDirectMin && size_ % kBlock == 0 &&
        reinterpret_cast<uintptr_t>(data.data()) % kBlock == 0) {
      const size_t n = data.size() / kBlock * kBlock;
      KVAGENT_RETURN_IF_ERROR(WriteAtEnd(dfd_, data.first(n), "write (O_DIRECT) "));
      data = data.subspan(n);
    }
    return WriteAtEnd(fd_, data, "write ");
  }
  Status Flush() override { return Status::Ok(); }  // unbuffered: nothing is held in the process
  Status Sync() override {
    if (fd_ < 0) return FailedPreconditionError("sync of closed file " + path_);
    if (::fdatasync(fd_) != 0) return ErrnoToStatus(errno, "fdatasync " + path_);
    return Status::Ok();
  }
  Status Close() override {
    if (fd_ < 0) return Status::Ok();
    int rc = ::close(fd_);
    int err = errno;
    if (dfd_ >= 0) ::close(dfd_);
    fd_ = dfd_ = -1;
    if (rc != 0) return ErrnoToStatus(err, "close " + path_);
    return Status::Ok();
  }
  uint64_t Size() const override { return size_; }
  size_t DirectIoAlignment() const override { return dfd_ >= 0 ? kBlock : 0; }

  // Adds the O_DIRECT descriptor. EINVAL (InvalidArgument) where the file system refuses O_DIRECT.
  Status EnableDirectIo() {
    int dfd = ::open(path_.c_str(), O_WRONLY | O_CLOEXEC | O_DIRECT);
    if (dfd < 0) return ErrnoToStatus(errno, "open (O_DIRECT) " + path_);
    dfd_ = dfd;
    return Status::Ok();
  }

 private:
  // All of `data` at the end of the file; a short write is continued, an error returned (size_
  // advances by what was written either way).
  Status WriteAtEnd(int fd, std::span<const std::byte> data, const char* what) {
    size_t done = 0;
    while (done < data.size()) {
      ssize_t w = ::pwrite(fd, data.data() + done, data.size() - done, static_cast<off_t>(size_ + done));
      if (w < 0) {
        if (errno == EINTR) continue;
        size_ += done;
        return ErrnoToStatus(errno, what + path_);
      }
      done += static_cast<size_t>(w);
    }
    size_ += done;
    return Status::Ok();
  }

  std::string path_;
  int fd_;   // buffered
  int dfd_;  // O_DIRECT, or -1
  uint64_t size_;
};

class PosixFileLock final : public FileLock {
 public:
  explicit PosixFileLock(int fd) : fd_(fd) {}
  ~PosixFileLock() override {
    ::flock(fd_, LOCK_UN);
    ::close(fd_);
  }

 private:
  int fd_;
};

class PosixEnv final : public Env {
 public:
  // Creates/truncates `path`, or opens it for appending with Size() at its current end.
  static StatusOr<std::unique_ptr<PosixWritableFile>> OpenWritable(const std::string& path, bool truncate) {
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | (truncate ? O_TRUNC : O_APPEND), 0644);
    if (fd < 0) return ErrnoToStatus(errno, (truncate ? "create " : "open for append ") + path);
    struct stat st;
    if (::fstat(fd, &st) != 0) {
      int err = errno;
      ::close(fd);
      return ErrnoToStatus(err, "fstat " + path);
    }
    return std::make_unique<PosixWritableFile>(path, fd, static_cast<uint64_t>(st.st_size));
  }

  StatusOr<std::unique_ptr<RandomAccessFile>> NewRandomAccessFile(const std::string& path) override {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return ErrnoToStatus(errno, "open " + path);
    return std::unique_ptr<RandomAccessFile>(new PosixRandomAccessFile(path, fd));
  }

  StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path) override {
    KVAGENT_ASSIGN_OR_RETURN(auto f, OpenWritable(path, /*truncate=*/true));
    return std::unique_ptr<WritableFile>(std::move(f));
  }

  StatusOr<std::unique_ptr<WritableFile>> NewAppendableFile(const std::string& path) override {
    KVAGENT_ASSIGN_OR_RETURN(auto f, OpenWritable(path, /*truncate=*/false));
    return std::unique_ptr<WritableFile>(std::move(f));
  }

  StatusOr<std::unique_ptr<WritableFile>> NewDirectWritableFile(const std::string& path, bool truncate) override {
    KVAGENT_ASSIGN_OR_RETURN(auto f, OpenWritable(path, truncate));
    Status direct = f->EnableDirectIo();
    // File systems without O_DIRECT (tmpfs, some FUSE) refuse it with EINVAL: buffered instead.
    if (!direct.ok() && direct.code() != StatusCode::kInvalidArgument) return direct;
    return std::unique_ptr<WritableFile>(std::move(f));
  }

  bool FileExists(const std::string& path) override { return ::access(path.c_str(), F_OK) == 0; }

  StatusOr<std::vector<std::string>> GetChildren(const std::string& dir) override {
    DIR* d = ::opendir(dir.c_str());
    if (d == nullptr) return ErrnoToStatus(errno, "opendir " + dir);
    std::vector<std::string> out;
    while (struct dirent* e = ::readdir(d)) {
      std::string name = e->d_name;
      if (name != "." && name != "..") out.push_back(std::move(name));
    }
    ::closedir(d);
    return out;
  }

  Status RemoveFile(const std::string& path) override {
    if (::unlink(path.c_str()) != 0) return ErrnoToStatus(errno, "unlink " + path);
    return Status::Ok();
  }

  Status RenameFile(const std::string& from, const std::string& to) override {
    if (::rename(from.c_str(), to.c_str()) != 0) return ErrnoToStatus(errno, "rename " + from + " -> " + to);
    return Status::Ok();
  }

  Status CreateDirs(const std::string& dir) override {
    if (dir.empty()) return Status::Ok();
    std::string partial;
    size_t pos = 0;
    while (pos != std::string::npos) {
      pos = dir.find('/', pos + 1);
      partial = dir.substr(0, pos);
      if (partial.empty()) continue;
      if (::mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST) return ErrnoToStatus(errno, "mkdir " + partial);
    }
    struct stat st;
    if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
      return FailedPreconditionError(dir + " exists and is not a directory");
    return Status::Ok();
  }

  StatusOr<uint64_t> GetFileSize(const std::string& path) override {
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) return ErrnoToStatus(errno, "stat " + path);
    return static_cast<uint64_t>(st.st_size);
  }

  Status TruncateFile(const std::string& path, uint64_t size) override {
    if (::truncate(path.c_str(), static_cast<off_t>(size)) != 0) return ErrnoToStatus(errno, "truncate " + path);
    return Status::Ok();
  }

  Status SyncDir(const std::string& dir) override {
    int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return ErrnoToStatus(errno, "open dir " + dir);
    int rc = ::fsync(fd);
    int err = errno;
    ::close(fd);
    if (rc != 0) return ErrnoToStatus(err, "fsync dir " + dir);
    return Status::Ok();
  }

  StatusOr<std::unique_ptr<FileLock>> LockFile(const std::string& path) override {
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return ErrnoToStatus(errno, "open lock " + path);
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      int err = errno;
      ::close(fd);
      if (err == EWOULDBLOCK) return FailedPreconditionError(path + " is locked by another process");
      return ErrnoToStatus(err, "flock " + path);
    }
    return std::unique_ptr<FileLock>(new PosixFileLock(fd));
  }

  StatusOr<uint64_t> FreeSpace(const std::string& path) override {
    struct statvfs st;
    if (::statvfs(path.c_str(), &st) != 0) return ErrnoToStatus(errno, "statvfs " + path);
    return static_cast<uint64_t>(st.f_bavail) * st.f_frsize;
  }

  bool IsPosix() const override { return true; }

  uint64_t NowMicros() override {
    return static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now().time_since_epoch())
            .count());
  }
  int64_t WallMicros() override {
    return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch())
        .count();
  }
  void SleepForMicros(uint64_t micros) override { std::this_thread::sleep_for(std::chrono::microseconds(micros)); }
};

}  // namespace

Env* Env::Default() {
  static PosixEnv* env = new PosixEnv();  // never destroyed: used by background threads at exit
  return env;
}

StatusOr<std::string> ReadFileToString(Env* env, const std::string& path) {
  KVAGENT_ASSIGN_OR_RETURN(auto file, env->NewRandomAccessFile(path));
  KVAGENT_ASSIGN_OR_RETURN(uint64_t size, file->Size());
  std::string out(size, '\0');
  size_t n = 0;
  KVAGENT_RETURN_IF_ERROR(file->Read(0, std::as_writable_bytes(std::span<char>(out.data(), out.size())), &n));
  out.resize(n);
  return out;
}

Status WriteStringToFile(Env* env, std::string_view data, const std::string& path, bool sync) {
  KVAGENT_ASSIGN_OR_RETURN(auto file, env->NewWritableFile(path));
  KVAGENT_RETURN_IF_ERROR(file->Append(std::as_bytes(std::span<const char>(data.data(), data.size()))));
  if (sync) KVAGENT_RETURN_IF_ERROR(file->Sync());
  KVAGENT_RETURN_IF_ERROR(file->Close());
  if (sync) {
    auto slash = path.rfind('/');
    std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
    KVAGENT_RETURN_IF_ERROR(env->SyncDir(dir));
  }
  return Status::Ok();
}

}  // namespace kvagent
