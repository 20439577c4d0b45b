#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "cuda/index_score.h"

namespace kvagent::cuda {
namespace {

// One warp per (row, block): lanes stride over the width, then a shuffle reduction per query.
// The row segment is re-read per query from L1, which is cheap next to the one DRAM read.
template <bool kF16>
__global__ void ScoreRowsKernel(const void* rows, size_t num_rows, int blocks, int width, const float* q, int nq,
                                float* out) {
  const size_t warp = (static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (warp >= num_rows * blocks) return;  // warp-uniform: the whole warp leaves together
  const int b = static_cast<int>(warp % blocks);
  const size_t off = warp * static_cast<size_t>(width);
  for (int j = 0; j < nq; ++j) {
    const float* qj = q + (static_cast<size_t>(b) * nq + j) * width;
    float acc = 0.0f;
    for (int i = lane; i < width; i += 32) {
      float x;
      if constexpr (kF16) {
        x = __half2float(static_cast<const __half*>(rows)[off + i]);
      } else {
        x = static_cast<const float*>(rows)[off + i];
      }
      acc = fmaf(qj[i], x, acc);
    }
    for (int s = 16; s > 0; s >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, s);
    if (lane == 0) out[warp * nq + j] = acc;
  }
}

}  // namespace

Status ScoreRows(const void* rows, bool f16, size_t num_rows, int blocks, int width, const float* q, int nq, float* out,
                 void* stream) {
  if (blocks < 1 || width < 1 || nq < 1) return InvalidArgumentError("ScoreRows: blocks, width and nq must be >= 1");
  if (num_rows == 0) return Status::Ok();
  if (rows == nullptr || q == nullptr || out == nullptr) return InvalidArgumentError("ScoreRows: null pointer");
  constexpr int kThreads = 256;
  const size_t warps = num_rows * static_cast<size_t>(blocks);
  const size_t grid = (warps * 32 + kThreads - 1) / kThreads;
  if (grid > 0x7fffffffu) return InvalidArgumentError("ScoreRows: too many rows for one launch");
  auto s = static_cast<cudaStream_t>(stream);
  if (f16) {
    ScoreRowsKernel<true><<<static_cast<unsigned>(grid), kThreads, 0, s>>>(rows, num_rows, blocks, width, q, nq, out);
  } else {
    ScoreRowsKernel<false><<<static_cast<unsigned>(grid), kThreads, 0, s>>>(rows, num_rows, blocks, width, q, nq, out);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return InternalError(std::string("ScoreRows launch: ") + cudaGetErrorString(err));
  return Status::Ok();
}

}  // namespace kvagent::cuda
