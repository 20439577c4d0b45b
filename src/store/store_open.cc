#include <memory>

#include "kvagent/disk_tier.h"
#include "kvagent/remote_tier.h"
#include "kvagent/store.h"
#include "store/tiered_store.h"

namespace kvagent {

StatusOr<std::unique_ptr<Store>> Store::Open(const StoreOptions& options) {
  std::unique_ptr<DiskTier> disk;
  if (!options.path.empty()) {
    DiskTierOptions d;
    d.dir = options.path;
    d.capacity_bytes = options.disk_capacity_bytes;
    d.max_file_bytes = options.max_file_bytes;
    // Under write-behind nothing is promised durable before Flush(), so the writer thread syncs
    // once per batch of queued records (group commit) instead of the tier syncing every record.
    d.sync = options.sync && !options.write_behind;
    d.codec = options.disk_codec;
    d.direct_io = options.disk_direct_io;
    d.env = options.env;
    KVAGENT_ASSIGN_OR_RETURN(disk, DiskTier::Open(d));
  }
  std::unique_ptr<RemoteTier> remote;
  if (!options.remote.url.empty()) {
    RemoteOptions r = options.remote;
    if (r.env == nullptr) r.env = options.env;
    KVAGENT_ASSIGN_OR_RETURN(remote, RemoteTier::Open(r));
  }
  return NewTieredStore(options, std::move(disk), std::move(remote));
}

}  // namespace kvagent
