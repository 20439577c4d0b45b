// Internal: the Store implementation behind Store::Open, with the disk tier injected so tests
// can put a slow or failing DiskTier behind it.
#pragma once

#include <memory>

#include "kvagent/disk_tier.h"
#include "kvagent/remote_tier.h"
#include "kvagent/store.h"

namespace kvagent {

// `disk` may be null (no disk tier; options.path is then ignored), `remote` too (no remote tier;
// options.remote is then ignored). Takes ownership.
StatusOr<std::unique_ptr<Store>> NewTieredStore(const StoreOptions& options, std::unique_ptr<DiskTier> disk,
                                                std::unique_ptr<RemoteTier> remote = nullptr);

}  // namespace kvagent
