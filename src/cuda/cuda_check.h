// CUDA error -> Status, for the CUDA sources of the library.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "kvagent/status.h"

namespace kvagent::cuda {

// OK for cudaSuccess; otherwise Unavailable for "no device / driver" errors and Internal for
// the rest, with the CUDA error name and string prefixed by `what`. Clears the non-sticky
// last-error state so one failure is not reported again by a later call.
inline Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return Status::Ok();
  cudaGetLastError();
  std::string msg = std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver || e == cudaErrorInvalidDevice)
    return UnavailableError(std::move(msg));
  if (e == cudaErrorMemoryAllocation) return ResourceExhaustedError(std::move(msg));
  return InternalError(std::move(msg));
}

}  // namespace kvagent::cuda
