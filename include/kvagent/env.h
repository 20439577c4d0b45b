// Env: every file and clock access of kv-agent goes through this interface, so tests can swap
// in an in-memory file system (NewMemEnv) or one that injects faults (FaultInjectionEnv in
// kvagent/fault_injection_env.h). The idea follows LevelDB's include/leveldb/env.h.
//
// Paths are plain strings with '/' separators. Errors are Status codes: NotFound for missing
// files, ResourceExhausted for a full disk, Internal/DataLoss for I/O errors.
//
// Thread-safety: an Env is safe for concurrent use. A RandomAccessFile is safe for concurrent
// Read calls. A WritableFile must be used by one thread at a time.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvagent/status.h"

namespace kvagent {

// Positional reads of an immutable (or append-only) file.
class RandomAccessFile {
 public:
  virtual ~RandomAccessFile() = default;
  // Reads up to dst.size() bytes at `offset` straight into dst (no intermediate copy).
  // Sets *bytes_read to the bytes read; fewer than requested only at end of file.
  virtual Status Read(uint64_t offset, std::span<std::byte> dst, size_t* bytes_read) const = 0;
  // Current size of the file in bytes.
  virtual StatusOr<uint64_t> Size() const = 0;
  // Read of consecutive bytes from `offset` into several buffers in turn (POSIX: one preadv);
  // *bytes_read as in Read. The default reads them one after the other.
  virtual Status ReadV(uint64_t offset, std::span<const std::span<std::byte>> dsts, size_t* bytes_read) const {
    *bytes_read = 0;
    for (std::span<std::byte> d : dsts) {
      size_t n = 0;
      KVAGENT_RETURN_IF_ERROR(Read(offset + *bytes_read, d, &n));
      *bytes_read += n;
      if (n < d.size()) break;
    }
    return Status::Ok();
  }
};

// A file opened for appending. Data is durable only after Sync() returns OK.
class WritableFile {
 public:
  virtual ~WritableFile() = default;
  // Appends all of `data` or returns an error (a short write is reported, never hidden).
  virtual Status Append(std::span<const std::byte> data) = 0;
  // Pushes buffered data to the OS (not durable): after Flush, readers of the file (other
  // handles, other processes) see every byte appended so far.
  virtual Status Flush() = 0;
  // Makes everything appended so far durable (fdatasync).
  virtual Status Sync() = 0;
  virtual Status Close() = 0;
  // Bytes in the file, counting appended-but-unsynced data.
  virtual uint64_t Size() const = 0;
  // Direct I/O (see Env::NewDirectWritableFile): the alignment in bytes (of memory and file
  // offset) that lets a large Append bypass the page cache; 0 for a buffered file.
  virtual size_t DirectIoAlignment() const { return 0; }

  // Asynchronous append, so a writer can prepare its next data while the device writes: queues
  // `data` at the file's end and returns an id at once (Size() counts the bytes at once). The
  // memory must stay valid and unchanged until WaitAsync(id) returns. Direct-I/O files with
  // asynchronous I/O (POSIX: io_uring) keep several such writes in flight when `data`'s address,
  // size and file offset are multiples of DirectIoAlignment(); other data, and files without
  // asynchronous I/O (the default), are written before AppendAsync returns (id 0). Readers see
  // the bytes after WaitAsync. A failed write is reported by WaitAsync and makes every later
  // Append/AppendAsync fail: the caller cuts the file back (Env::TruncateFile) and reopens it.
  virtual StatusOr<uint64_t> AppendAsync(std::span<const std::byte> data) {
    KVAGENT_RETURN_IF_ERROR(Append(data));
    return uint64_t{0};
  }
  // AppendAsync of several pieces written back to back with one gathering write: every piece's
  // address and size a multiple of DirectIoGranularity(), the file offset and the total a multiple
  // of DirectIoAlignment() (otherwise, and in the default, the pieces are appended one by one).
  virtual StatusOr<uint64_t> AppendAsyncV(std::span<const std::span<const std::byte>> pieces) {
    uint64_t id = 0;
    for (const auto& p : pieces) {
      KVAGENT_ASSIGN_OR_RETURN(uint64_t one, AppendAsync(p));
      id = std::max(id, one);
    }
    return id;
  }
  // The finest alignment direct I/O accepts for AppendAsyncV's pieces (the device's logical block,
  // often 512 bytes); a divisor of DirectIoAlignment().
  virtual size_t DirectIoGranularity() const { return DirectIoAlignment(); }
  // Waits until append `id` and every asynchronous append queued before it have been written
  // (not synced); returns the first error among them. Sync and Close wait for every one.
  virtual Status WaitAsync(uint64_t id) {
    (void)id;
    return Status::Ok();
  }
};

// An exclusive advisory lock on a file (one process opens a store at a time).
class FileLock {
 public:
  virtual ~FileLock() = default;
};

class Env {
 public:
  virtual ~Env() = default;

  // The process-wide POSIX environment. Never deleted.
  static Env* Default();

  virtual StatusOr<std::unique_ptr<RandomAccessFile>> NewRandomAccessFile(const std::string& path) = 0;
  // Creates or truncates `path`.
  virtual StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path) = 0;
  // Opens `path` for appending, creating it if missing; Size() starts at the current size.
  virtual StatusOr<std::unique_ptr<WritableFile>> NewAppendableFile(const std::string& path) = 0;
  // Like NewWritableFile (truncate = true) or NewAppendableFile, but large appends bypass the
  // OS page cache where the file system allows it (POSIX O_DIRECT): an append of 1 MiB or more
  // that starts at an address and a file offset that are multiples of DirectIoAlignment() goes,
  // whole blocks of it, from the caller's memory to the device without the page cache's copy;
  // everything else is written through the page cache as usual. Appended bytes are visible to
  // readers when Append returns, as with NewAppendableFile. Where direct I/O is unavailable
  // (other Envs, tmpfs) this returns an ordinary buffered file (DirectIoAlignment() == 0).
  virtual StatusOr<std::unique_ptr<WritableFile>> NewDirectWritableFile(const std::string& path, bool truncate) {
    return truncate ? NewWritableFile(path) : NewAppendableFile(path);
  }

  virtual bool FileExists(const std::string& path) = 0;
  // Names (not paths) of the entries of directory `dir`, excluding "." and "..".
  virtual StatusOr<std::vector<std::string>> GetChildren(const std::string& dir) = 0;
  virtual Status RemoveFile(const std::string& path) = 0;
  // Atomically replaces `to` with `from`.
  virtual Status RenameFile(const std::string& from, const std::string& to) = 0;
  // Creates `dir` and missing parents; OK if it exists.
  virtual Status CreateDirs(const std::string& dir) = 0;
  virtual StatusOr<uint64_t> GetFileSize(const std::string& path) = 0;
  // Truncates `path` to `size` bytes (used to cut a torn tail after a crash).
  virtual Status TruncateFile(const std::string& path, uint64_t size) = 0;
  // Makes directory entries (creations, renames) in `dir` durable.
  virtual Status SyncDir(const std::string& dir) = 0;

  // Takes an exclusive lock; FailedPrecondition if another holder has it.
  virtual StatusOr<std::unique_ptr<FileLock>> LockFile(const std::string& path) = 0;

  // Free bytes on the file system holding `path` (for disk-full checks).
  virtual StatusOr<uint64_t> FreeSpace(const std::string& path) = 0;

  // True when `path` names a real OS path (SQLite and mmap may use it directly).
  virtual bool IsPosix() const { return false; }

  // Microseconds since an arbitrary fixed point, monotonic.
  virtual uint64_t NowMicros() = 0;
  // Microseconds since the Unix epoch (wall clock; for metadata timestamps).
  virtual int64_t WallMicros() = 0;
  virtual void SleepForMicros(uint64_t micros) = 0;
};

// An Env that keeps all files in memory (each instance has its own file system); clocks come
// from the default Env. For tests and ephemeral stores.
std::unique_ptr<Env> NewMemEnv();

// MemEnv options. capacity_bytes > 0 makes the in-memory file system that large: FreeSpace
// reports capacity minus the bytes in all files, and an Append that would exceed it appends
// what fits and returns ResourceExhausted (like a full disk). 0 = unbounded (FreeSpace then
// reports 1 TiB).
struct MemEnvOptions {
  uint64_t capacity_bytes = 0;
};
std::unique_ptr<Env> NewMemEnv(const MemEnvOptions& options);

// Reads the whole file at `path`.
StatusOr<std::string> ReadFileToString(Env* env, const std::string& path);
// Writes `data` to `path` (truncating), syncs it, and syncs the directory when `sync` is set.
Status WriteStringToFile(Env* env, std::string_view data, const std::string& path, bool sync);

}  // namespace kvagent
