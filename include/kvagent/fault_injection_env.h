// FaultInjectionEnv: an Env wrapper for tests that injects I/O faults and simulates crashes
// (the idea of LevelDB's fault_injection_test.cc).
//
// Faults (each armed by a call, consumed as it fires):
//  - FailNextWrites(n): the next n WritableFile::Append calls append nothing and return
//    Internal ("injected write error").
//  - ShortNextWrite(bytes): the next Append appends only min(bytes, size) bytes, then returns
//    Internal (a short write that is reported).
//  - FailNextSyncs(n): the next n WritableFile::Sync calls return Internal and make nothing
//    durable.
//  - SetDiskBudget(bytes): from now on at most `bytes` more bytes may be appended in total; an
//    Append crossing the budget appends what fits and returns ResourceExhausted (ENOSPC).
//    ClearDiskBudget() lifts it. FreeSpace reports min(base free space, remaining budget).
//
// Asynchronous appends: SimulateAsyncDirectIo(true) makes files created from then on report a
// DirectIoAlignment() of 4096 and defer each AppendAsync until WaitAsync/Sync/Close, where it is
// appended (and the armed faults above fire), like a write that fails on the device after it
// was queued. A failed deferred append drops the ones queued after it and fails every later
// append, as the POSIX file does.
//
// Crash simulation: the env remembers, per file written through it, the length made durable
// by the last successful Sync (files opened for append start durable at their size), and which
// newly created files have not yet had their directory synced. DropUnsyncedData() reverts every
// such file to its durable length and removes created files whose directory was never synced
// afterwards (through the base Env), as a power loss would. Open handles must be closed first.
//
// Thread-safety: all methods may be called concurrently; injected faults are consumed by
// whichever thread performs the next matching operation.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>

#include "kvagent/env.h"

namespace kvagent {

class FaultInjectionEnv final : public Env {
 public:
  // `base` must outlive this Env.
  explicit FaultInjectionEnv(Env* base);
  ~FaultInjectionEnv() override;

  void FailNextWrites(int n);
  void ShortNextWrite(uint64_t bytes);
  void FailNextSyncs(int n);
  void SetDiskBudget(uint64_t bytes);
  void SimulateAsyncDirectIo(bool on);
  void ClearDiskBudget();
  // Clears every armed fault and the budget.
  void ClearFaults();

  // Reverts files to their last synced state (see above). Returns the first base-Env error.
  Status DropUnsyncedData();

  // Counters of faults that fired (for test assertions).
  uint64_t injected_write_errors() const;
  uint64_t injected_sync_errors() const;
  uint64_t injected_enospc() const;

  StatusOr<std::unique_ptr<RandomAccessFile>> NewRandomAccessFile(const std::string& path) override;
  StatusOr<std::unique_ptr<WritableFile>> NewWritableFile(const std::string& path) override;
  StatusOr<std::unique_ptr<WritableFile>> NewAppendableFile(const std::string& path) override;
  bool FileExists(const std::string& path) override;
  StatusOr<std::vector<std::string>> GetChildren(const std::string& dir) override;
  Status RemoveFile(const std::string& path) override;
  Status RenameFile(const std::string& from, const std::string& to) override;
  Status CreateDirs(const std::string& dir) override;
  StatusOr<uint64_t> GetFileSize(const std::string& path) override;
  Status TruncateFile(const std::string& path, uint64_t size) override;
  Status SyncDir(const std::string& dir) override;
  StatusOr<std::unique_ptr<FileLock>> LockFile(const std::string& path) override;
  StatusOr<uint64_t> FreeSpace(const std::string& path) override;
  // Never POSIX: the store must not bypass this Env (e.g. by opening SQLite on the path).
  bool IsPosix() const override { return false; }
  uint64_t NowMicros() override;
  int64_t WallMicros() override;
  void SleepForMicros(uint64_t micros) override;

 private:
  friend class FaultWritableFile;
  struct FileState {
    uint64_t synced = 0;
    bool dir_synced = true;  // false for files created since their directory's last SyncDir
  };
  enum class WriteFault { kNone, kFail, kShort, kFull };
  // Decides the fate of an append of `size` bytes: how many bytes go through and which fault.
  WriteFault TakeWriteFault(uint64_t size, uint64_t* allowed);
  bool TakeSyncFault();
  bool AsyncDirect() const;
  void RecordSync(const std::string& path, uint64_t size);

  Env* base_;
  mutable std::mutex mu_;
  std::map<std::string, FileState> files_;
  int fail_writes_ = 0;
  bool short_write_ = false;
  uint64_t short_write_bytes_ = 0;
  int fail_syncs_ = 0;
  bool async_direct_ = false;
  bool budget_on_ = false;
  uint64_t budget_ = 0;
  uint64_t write_errors_ = 0;
  uint64_t sync_errors_ = 0;
  uint64_t enospc_ = 0;
};

}  // namespace kvagent
