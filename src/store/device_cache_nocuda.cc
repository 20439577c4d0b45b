// The device tier of a build without CUDA: there is none.
#include "store/device_cache.h"

#if !defined(KVAGENT_WITH_CUDA)
namespace kvagent {

StatusOr<std::unique_ptr<DeviceCache>> OpenDeviceCache(DeviceCacheOptions) {
  return UnavailableError("device tier unavailable: kv-agent was built without CUDA (KVAGENT_CUDA=OFF)");
}

}  // namespace kvagent
#endif
