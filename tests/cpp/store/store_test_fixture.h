// StoreHarness: opens a Store over one of several backends and reopens it on the same storage.
#pragma once

#include <stdlib.h>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "kvagent/env.h"
#include "kvagent/store.h"
#include "store/store_test_util.h"
#include "store/tiered_store.h"
#include "temp_dir.h"

namespace kvagent::testing {

enum class StoreBackend {
  kHostOnly,   // no path: host tier only
  kFakeDisk,   // in-memory FakeDiskTier behind the host tier (slow, gated or failing on demand)
  kPosixDisk,  // the real DiskTier in a temporary directory
  kMemDisk,    // the real DiskTier on NewMemEnv()
};

inline const char* BackendName(StoreBackend b) {
  switch (b) {
    case StoreBackend::kHostOnly:
      return "host";
    case StoreBackend::kFakeDisk:
      return "fakedisk";
    case StoreBackend::kPosixDisk:
      return "posixdisk";
    case StoreBackend::kMemDisk:
      return "memdisk";
  }
  return "?";
}

inline std::vector<StoreBackend> AllBackends() {
  return {StoreBackend::kHostOnly, StoreBackend::kFakeDisk, StoreBackend::kPosixDisk, StoreBackend::kMemDisk};
}

inline int StepsFor(StoreBackend b) {
  switch (b) {
    case StoreBackend::kHostOnly:
      return 4000;
    case StoreBackend::kFakeDisk:
    case StoreBackend::kMemDisk:
      return 3000;
    case StoreBackend::kPosixDisk:
      return 1000;  // real files + SQLite commits: ~2 ms a step on the CI machine
  }
  return 1000;
}

class StoreHarness {
 public:
  StoreHarness(StoreBackend backend, StoreOptions options) : backend_(backend), options_(std::move(options)) {
    fake_ = std::make_shared<FakeDiskState>();
    if (backend_ == StoreBackend::kMemDisk) {
      mem_env_ = NewMemEnv();
      options_.env = mem_env_.get();
      options_.path = "/mem/store";
    } else if (backend_ == StoreBackend::kPosixDisk) {
      tmp_ = std::make_unique<TempDir>();
      options_.path = tmp_->path() + "/store";
    }
  }
  ~StoreHarness() {
    if (store_) store_->Close().IgnoreError();
  }

  Status Open() {
    if (backend_ == StoreBackend::kFakeDisk) {
      KVAGENT_ASSIGN_OR_RETURN(store_, NewTieredStore(options_, std::make_unique<FakeDiskTier>(fake_)));
    } else {
      KVAGENT_ASSIGN_OR_RETURN(store_, Store::Open(options_));
    }
    return Status::Ok();
  }
  Status Reopen() {
    if (store_) KVAGENT_RETURN_IF_ERROR(store_->Close());
    store_.reset();
    return Open();
  }

  Store* store() { return store_.get(); }
  FakeDiskState& fake() { return *fake_; }
  bool persistent() const { return backend_ != StoreBackend::kHostOnly; }
  bool fake_disk() const { return backend_ == StoreBackend::kFakeDisk; }
  StoreOptions& options() { return options_; }

 private:
  StoreBackend backend_;
  StoreOptions options_;
  std::shared_ptr<FakeDiskState> fake_;
  std::unique_ptr<Env> mem_env_;  // outlives store_ (declared first, destroyed last)
  std::unique_ptr<TempDir> tmp_;
  std::unique_ptr<Store> store_;
};

}  // namespace kvagent::testing
