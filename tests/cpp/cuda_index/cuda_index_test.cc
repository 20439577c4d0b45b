// CUDA index scoring against the CPU scalar kernel (gpu label: needs a CUDA device).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "cuda/index_score.h"
#include "index/score_kernel.h"
#include "kvagent/dtype.h"

namespace kvagent {
namespace {

bool HaveDevice() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

template <typename T>
T* ToDevice(const std::vector<T>& v) {
  T* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, v.size() * sizeof(T) + 1), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  return p;
}

TEST(CudaIndexScore, MatchesCpuScalar) {
  if (!HaveDevice()) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(31);
  std::normal_distribution<float> n;
  for (int width : {8, 24, 128, 256, 512}) {
    for (int blocks : {1, 3, 64}) {
      for (int nq : {1, 4, 5}) {
        const size_t rows = 37;
        std::vector<float> r32(rows * blocks * width), q(static_cast<size_t>(blocks) * nq * width);
        std::vector<uint16_t> r16(r32.size());
        for (size_t i = 0; i < r32.size(); ++i) {
          r32[i] = n(rng);
          r16[i] = F32ToF16(r32[i]);
        }
        for (auto& v : q) v = n(rng);
        float* dq = ToDevice(q);
        for (bool f16 : {false, true}) {
          void* drows = f16 ? static_cast<void*>(ToDevice(r16)) : static_cast<void*>(ToDevice(r32));
          float* dout = nullptr;
          ASSERT_EQ(cudaMalloc(&dout, rows * blocks * nq * sizeof(float)), cudaSuccess);
          ASSERT_TRUE(cuda::ScoreRows(drows, f16, rows, blocks, width, dq, nq, dout, nullptr).ok());
          std::vector<float> got(rows * blocks * nq), want(nq);
          ASSERT_EQ(cudaMemcpy(got.data(), dout, got.size() * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
          for (size_t r = 0; r < rows; ++r) {
            for (int b = 0; b < blocks; ++b) {
              const size_t off = (r * blocks + b) * width;
              const void* row = f16 ? static_cast<const void*>(&r16[off]) : &r32[off];
              index_internal::DotRowsScalar(row, f16, &q[static_cast<size_t>(b) * nq * width], nq, width, want.data());
              for (int j = 0; j < nq; ++j) {
                EXPECT_NEAR(got[(r * blocks + b) * nq + j], want[j], 1e-4 * std::sqrt(width))
                    << width << " " << blocks << " " << nq << " " << f16;
              }
            }
          }
          cudaFree(dout);
          cudaFree(drows);
        }
        cudaFree(dq);
      }
    }
  }
}

TEST(CudaIndexScore, RejectsBadArguments) {
  EXPECT_EQ(cuda::ScoreRows(nullptr, false, 4, 1, 8, nullptr, 1, nullptr, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::ScoreRows(nullptr, false, 4, 0, 8, nullptr, 1, nullptr, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_TRUE(cuda::ScoreRows(nullptr, false, 0, 1, 8, nullptr, 1, nullptr, nullptr).ok());
}

}  // namespace
}  // namespace kvagent
