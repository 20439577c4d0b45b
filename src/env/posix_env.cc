// POSIX Env: pread/pwrite files (large appends optionally with O_DIRECT, asynchronous ones through
// io_uring where liburing was found at build time), fdatasync, flock-based store locks.
#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <map>
#include <thread>
#include <vector>

#include "kvagent/env.h"

#ifdef KVAGENT_HAVE_URING
#include <liburing.h>
#endif

namespace kvagent {

namespace {

// Moves past `n` bytes of iov[i...] (after a short readv/writev): returns the index of the first
// vector with bytes left, that vector trimmed at its front.
size_t SkipIov(std::vector<iovec>* iov, size_t i, size_t n) {
  for (; i < iov->size() && n > 0; ++i) {
    iovec& v = (*iov)[i];
    if (n < v.iov_len) {
      v.iov_base = static_cast<std::byte*>(v.iov_base) + n;
      v.iov_len -= n;
      return i;
    }
    n -= v.iov_len;
  }
  return i;
}

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

  Status ReadV(uint64_t offset, std::span<const std::span<std::byte>> dsts, size_t* bytes_read) const override {
    std::vector<iovec> iov;
    size_t want = 0;
    for (std::span<std::byte> d : dsts) {
      if (!d.empty()) iov.push_back(iovec{d.data(), d.size()});
      want += d.size();
    }
    size_t done = 0, i = 0;
    while (done < want && i < iov.size()) {
      ssize_t r = ::preadv(fd_, iov.data() + i, static_cast<int>(std::min<size_t>(iov.size() - i, IOV_MAX)),
                           static_cast<off_t>(offset + done));
      if (r < 0) {
        if (errno == EINTR) continue;
        *bytes_read = done;
        return ErrnoToStatus(errno, "preadv " + path_);
      }
      if (r == 0) break;  // end of file
      done += static_cast<size_t>(r);
      i = SkipIov(&iov, i, static_cast<size_t>(r));
    }
    *bytes_read = done;
    return Status::Ok();
  }

 private:
  std::string path_;
  int fd_;
};

#ifdef KVAGENT_HAVE_URING
// Writes queued on one O_DIRECT descriptor through an io_uring, as gathering writes (writev) of
// up to kPiece bytes (4 MiB moved more than 1 MiB requests: docs/benchmarks.md) and kMaxIov
// pieces each, with up to kDepth in flight, so the device always has work queued while the caller
// prepares more. Appends are numbered by the caller (increasing ids); WaitFor(id) reaps
// completions until every request of every id <= id is done. A short completion is finished with
// pwritev; the first error is kept and returned from then on. Not thread-safe (the owning file's
// caller serialises).
class AsyncWriter {
 public:
  static constexpr size_t kPiece = size_t{4} << 20;
  static constexpr unsigned kDepth = 32;
  static constexpr size_t kMaxIov = 256;

  // nullptr when the kernel refuses io_uring (old kernel, seccomp, io_uring_disabled).
  static std::unique_ptr<AsyncWriter> Create(int fd, const std::string& path) {
    auto w = std::unique_ptr<AsyncWriter>(new AsyncWriter(fd, path));
    if (io_uring_queue_init(kDepth, &w->ring_, 0) != 0) return nullptr;
    w->ring_ok_ = true;
    return w;
  }
  ~AsyncWriter() {
    WaitFor(UINT64_MAX).IgnoreError();
    if (ring_ok_) io_uring_queue_exit(&ring_);
  }

  // Queues `pieces`, back to back from file offset `offset`, as append `id`.
  Status Submit(uint64_t id, std::span<const std::span<const std::byte>> pieces, uint64_t offset) {
    Request req;
    req.id = id;
    req.offset = offset;
    for (std::span<const std::byte> piece : pieces) {
      while (!piece.empty()) {
        const size_t len = std::min(piece.size(), kPiece - req.bytes);
        req.iov.push_back(iovec{const_cast<std::byte*>(piece.data()), len});
        req.bytes += len;
        piece = piece.subspan(len);
        if (req.bytes == kPiece || req.iov.size() == kMaxIov) {
          const uint64_t next = req.offset + req.bytes;
          KVAGENT_RETURN_IF_ERROR(Queue(std::move(req)));
          req = Request{id, next, {}, 0};
        }
      }
    }
    if (req.bytes > 0) KVAGENT_RETURN_IF_ERROR(Queue(std::move(req)));
    return SubmitQueued();
  }

  Status WaitFor(uint64_t id) {
    while (!remaining_.empty() && remaining_.begin()->first <= id) KVAGENT_RETURN_IF_ERROR(ReapOne());
    return error_;
  }

 private:
  struct Request {
    uint64_t id = 0;
    uint64_t offset = 0;
    std::vector<iovec> iov;  // heap storage stays put while the request is in flight
    size_t bytes = 0;
  };
  AsyncWriter(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}

  Status Queue(Request req) {
    for (;;) {
      if (in_flight_ == kDepth) {  // hand the queued requests over, then wait for one to finish
        KVAGENT_RETURN_IF_ERROR(SubmitQueued());
        KVAGENT_RETURN_IF_ERROR(ReapOne());
      }
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
      if (sqe != nullptr) {
        ++remaining_[req.id];
        ++in_flight_;
        size_t slot;
        if (free_.empty()) {
          slots_.push_back(std::move(req));
          slot = slots_.size() - 1;
        } else {
          slot = free_.back();
          free_.pop_back();
          slots_[slot] = std::move(req);
        }
        const Request& r = slots_[slot];
        io_uring_prep_writev(sqe, fd_, r.iov.data(), static_cast<unsigned>(r.iov.size()), r.offset);
        io_uring_sqe_set_data64(sqe, slot);
        return Status::Ok();
      }
      KVAGENT_RETURN_IF_ERROR(SubmitQueued());  // the submission queue is full of queued requests
    }
  }
  Status SubmitQueued() {
    int rc = io_uring_submit(&ring_);
    if (rc < 0) return Fail(ErrnoToStatus(-rc, "io_uring_submit " + path_));
    return Status::Ok();
  }
  // Waits for one completion and accounts for it. Only a failure to wait is returned here;
  // a failed write is recorded in error_.
  Status ReapOne() {
    io_uring_cqe* cqe = nullptr;
    int rc;
    do {
      rc = io_uring_wait_cqe(&ring_, &cqe);
    } while (rc == -EINTR);
    if (rc < 0) return Fail(ErrnoToStatus(-rc, "io_uring_wait_cqe " + path_));
    const size_t slot = static_cast<size_t>(io_uring_cqe_get_data64(cqe));
    const int res = cqe->res;
    io_uring_cqe_seen(&ring_, cqe);
    --in_flight_;
    Request req = std::move(slots_[slot]);
    free_.push_back(slot);
    if (res < 0) {
      Fail(ErrnoToStatus(-res, "write (O_DIRECT, io_uring) " + path_)).IgnoreError();
    } else if (static_cast<size_t>(res) < req.bytes) {
      FinishShort(&req, static_cast<size_t>(res));
    }
    auto it = remaining_.find(req.id);
    if (it != remaining_.end() && --it->second == 0) remaining_.erase(it);
    return Status::Ok();
  }
  // The rest of a request the kernel wrote only `done` bytes of, synchronously (a full disk then
  // reports ENOSPC).
  void FinishShort(Request* req, size_t done) {
    size_t i = SkipIov(&req->iov, 0, done);
    while (done < req->bytes && error_.ok()) {
      ssize_t w = ::pwritev(fd_, req->iov.data() + i, static_cast<int>(req->iov.size() - i),
                            static_cast<off_t>(req->offset + done));
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) {
        Fail(ErrnoToStatus(w < 0 ? errno : ENOSPC, "write (O_DIRECT) " + path_)).IgnoreError();
        return;
      }
      done += static_cast<size_t>(w);
      i = SkipIov(&req->iov, i, static_cast<size_t>(w));
    }
  }
  Status Fail(Status s) {
    if (error_.ok()) error_ = s;
    return s;
  }

  int fd_;
  std::string path_;
  io_uring ring_{};
  bool ring_ok_ = false;
  unsigned in_flight_ = 0;
  std::vector<Request> slots_;
  std::vector<size_t> free_;
  std::map<uint64_t, unsigned> remaining_;  // id -> requests still in flight
  Status error_;
};
#endif  // KVAGENT_HAVE_URING

// An appending file. With a second descriptor opened with O_DIRECT (`dfd`, see
// Env::NewDirectWritableFile), an append of at least kDirectMin bytes that starts on a block
// boundary in memory and in the file goes, whole blocks of it, straight from the caller's memory
// to the device; everything else is written through the page cache. Both land before Append
// returns, so readers see every appended byte and a killed process loses nothing written. Every
// write is a pwrite at the file's end (size_), so the two descriptors never disagree about where
// that is, and direct writes only cover blocks no buffered write has touched. AppendAsync of
// block-aligned data queues it on the O_DIRECT descriptor through an AsyncWriter (created at the
// first such append; without io_uring the data is written synchronously), so the bytes land
// after Append returns only for those; Sync and Close wait for them.
class PosixWritableFile final : public WritableFile {
 public:
  static constexpr size_t kBlock = 4096;
  static constexpr size_t kDirectMin = size_t{1} << 20;

  PosixWritableFile(std::string path, int fd, uint64_t size, int dfd = -1)
      : path_(std::move(path)), fd_(fd), dfd_(dfd), size_(size) {}
  ~PosixWritableFile() override { Close().IgnoreError(); }

  Status Append(std::span<const std::byte> data) override {
    if (fd_ < 0) return FailedPreconditionError("append to closed file " + path_);
    KVAGENT_RETURN_IF_ERROR(async_error_);
    const size_t n = DirectBytes(data);
    if (n > 0) KVAGENT_RETURN_IF_ERROR(WriteAtEnd(dfd_, data.first(n), "write (O_DIRECT) "));
    return WriteAtEnd(fd_, data.subspan(n), "write ");
  }
  // As Append, with the direct blocks queued asynchronously (the rest written at once).
  StatusOr<uint64_t> AppendAsync(std::span<const std::byte> data) override {
    const size_t n = DirectBytes(data);
    uint64_t id = 0;
    if (n > 0) {
      const std::span<const std::byte> blocks = data.first(n);
      KVAGENT_ASSIGN_OR_RETURN(id, AppendAsyncV(std::span<const std::span<const std::byte>>(&blocks, 1)));
    }
    KVAGENT_RETURN_IF_ERROR(Append(data.subspan(n)));
    return id;
  }
  StatusOr<uint64_t> AppendAsyncV(std::span<const std::span<const std::byte>> pieces) override {
    if (fd_ < 0) return FailedPreconditionError("append to closed file " + path_);
    KVAGENT_RETURN_IF_ERROR(async_error_);
#ifdef KVAGENT_HAVE_URING
    uint64_t total = 0;
    bool aligned = dfd_ >= 0 && size_ % kBlock == 0;
    for (const auto& p : pieces) {
      total += p.size();
      aligned = aligned && !p.empty() && p.size() % granularity_ == 0 &&
                reinterpret_cast<uintptr_t>(p.data()) % granularity_ == 0;
    }
    if (aligned && total % kBlock == 0) {
      if (!async_tried_) {
        async_tried_ = true;
        async_ = AsyncWriter::Create(dfd_, path_);
      }
      if (async_) {
        const uint64_t id = ++async_last_;
        Status s = async_->Submit(id, pieces, size_);
        size_ += total;
        if (!s.ok()) async_error_ = s;
        KVAGENT_RETURN_IF_ERROR(s);
        return id;
      }
    }
#endif
    for (const auto& p : pieces) KVAGENT_RETURN_IF_ERROR(Append(p));
    return uint64_t{0};
  }
  Status WaitAsync(uint64_t id) override {
#ifdef KVAGENT_HAVE_URING
    if (async_ && id != 0) {
      Status s = async_->WaitFor(id);
      if (!s.ok() && async_error_.ok()) async_error_ = s;
      return s;
    }
#endif
    (void)id;
    return Status::Ok();
  }
  Status Flush() override { return Status::Ok(); }  // unbuffered: nothing is held in the process
  Status Sync() override {
    if (fd_ < 0) return FailedPreconditionError("sync of closed file " + path_);
    KVAGENT_RETURN_IF_ERROR(WaitAsync(async_last_));
    if (::fdatasync(fd_) != 0) return ErrnoToStatus(errno, "fdatasync " + path_);
    return Status::Ok();
  }
  Status Close() override {
    if (fd_ < 0) return Status::Ok();
    Status waited = WaitAsync(async_last_);
#ifdef KVAGENT_HAVE_URING
    async_.reset();
#endif
    int rc = ::close(fd_);
    int err = errno;
    if (dfd_ >= 0) ::close(dfd_);
    fd_ = dfd_ = -1;
    if (rc != 0) return ErrnoToStatus(err, "close " + path_);
    return waited;
  }
  uint64_t Size() const override { return size_; }
  size_t DirectIoAlignment() const override { return dfd_ >= 0 ? kBlock : 0; }
  size_t DirectIoGranularity() const override { return dfd_ >= 0 ? granularity_ : 0; }

  // Adds the O_DIRECT descriptor. EINVAL (InvalidArgument) where the file system refuses O_DIRECT.
  Status EnableDirectIo() {
    int dfd = ::open(path_.c_str(), O_WRONLY | O_CLOEXEC | O_DIRECT);
    if (dfd < 0) return ErrnoToStatus(errno, "open (O_DIRECT) " + path_);
    dfd_ = dfd;
#ifdef STATX_DIOALIGN
    // The device's real requirement (often 512-byte sectors) for the pieces of AppendAsyncV.
    struct statx st;
    if (::statx(dfd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &st) == 0 && (st.stx_mask & STATX_DIOALIGN) != 0) {
      const size_t g = std::max<size_t>(st.stx_dio_mem_align, st.stx_dio_offset_align);
      if (g != 0 && kBlock % g == 0) granularity_ = g;
    }
#endif
    return Status::Ok();
  }

 private:
  // How many leading bytes of an append go through the O_DIRECT descriptor: its whole blocks when
  // it is at least kDirectMin bytes and starts on a block in memory and in the file; else 0.
  size_t DirectBytes(std::span<const std::byte> data) const {
    if (dfd_ < 0 || data.size() < kDirectMin || size_ % kBlock != 0 ||
        reinterpret_cast<uintptr_t>(data.data()) % kBlock != 0)
      return 0;
    return data.size() / kBlock * kBlock;
  }
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
  size_t granularity_ = kBlock;  // direct-I/O alignment of AppendAsyncV's pieces
  uint64_t async_last_ = 0;      // id of the last asynchronous append
  Status async_error_;           // a failed asynchronous append: no more appends
#ifdef KVAGENT_HAVE_URING
  bool async_tried_ = false;
  std::unique_ptr<AsyncWriter> async_;
#endif
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
    // No O_APPEND: Linux's pwrite on an O_APPEND descriptor ignores the offset and writes at the
    // current EOF, which lags behind a direct write still in flight (AppendAsync); every write
    // here is a pwrite at size_ instead.
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | (truncate ? O_TRUNC : 0), 0644);
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
