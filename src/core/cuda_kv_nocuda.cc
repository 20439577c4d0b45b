// kvagent/cuda_kv.h in a build without CUDA (KVAGENT_CUDA=OFF): every function that needs a
// device links and returns Unavailable, so callers handle one error instead of a link failure.
// The views (engine_kv_view.cc) and ComputeRopeTable (rope/rope_table.cc) are host code and work.
#include "kvagent/cuda_kv.h"

#if !defined(KVAGENT_WITH_CUDA)
namespace kvagent::cuda {

namespace {
Status NoCuda() { return UnavailableError("CUDA unavailable: kv-agent was built without CUDA (KVAGENT_CUDA=OFF)"); }
}  // namespace

bool DeviceAvailable() { return false; }
Status CheckDevice() { return NoCuda(); }

StatusOr<std::shared_ptr<const RopeDeviceTable>> RopeDeviceTable::Create(const ModelSpec&) { return NoCuda(); }
StatusOr<std::shared_ptr<const RopeDeviceTable>> RopeDeviceTable::Create(std::vector<RopeTable>, int) {
  return NoCuda();
}
RopeDeviceTable::~RopeDeviceTable() = default;  // never constructed without CUDA

Status LoadToEngine(std::span<const CanonicalSpan>, const EngineKvView&, const MoveOptions&, Stream) {
  return NoCuda();
}
Status SaveFromEngine(std::span<const CanonicalSpan>, const EngineKvView&, const MoveOptions&, Stream) {
  return NoCuda();
}

}  // namespace kvagent::cuda
#endif
