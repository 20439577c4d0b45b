// What the plain CUDA benchmark programs (bench/cuda/) share: error checks, the device's
// description and CUDA-event timing. A failed check prints where and why, then exits with status 2.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "kvagent/cuda_kv.h"
#include "kvagent/status.h"

#define CK(expr)                                                                                 \
  do {                                                                                           \
    cudaError_t e_ = (expr);                                                                     \
    if (e_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(2);                                                                              \
    }                                                                                            \
  } while (0)
#define SK(expr)                                                                                \
  do {                                                                                          \
    kvagent::Status s_ = (expr);                                                                \
    if (!s_.ok()) {                                                                             \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, s_.ToString().c_str()); \
      std::exit(2);                                                                             \
    }                                                                                           \
  } while (0)

namespace kvagent::bench {

struct DeviceInfo {
  cudaDeviceProp prop;
  int driver = 0;
  int runtime = 0;
};

// Exits (status 2) without a usable device; otherwise prints and returns device 0's description.
inline DeviceInfo DescribeDevice() {
  SK(kvagent::cuda::CheckDevice());
  DeviceInfo d;
  CK(cudaGetDeviceProperties(&d.prop, 0));
  CK(cudaDriverGetVersion(&d.driver));
  CK(cudaRuntimeGetVersion(&d.runtime));
  std::printf("device: %s, %d SMs, %.0f MB L2, %.1f GB, driver %d, runtime %d\n", d.prop.name,
              d.prop.multiProcessorCount, d.prop.l2CacheSize / 1e6, d.prop.totalGlobalMem / 1e9, d.driver, d.runtime);
  return d;
}

struct Timer {
  cudaEvent_t a, b;
  Timer() {
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
  }
  ~Timer() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
};

// Median over `reps` timed runs of body() on stream s, after `warmup` untimed runs.
template <typename F>
double MedianMs(cudaStream_t s, int warmup, int reps, F&& body) {
  Timer t;
  for (int i = 0; i < warmup; ++i) body();
  CK(cudaStreamSynchronize(s));
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventRecord(t.a, s));
    body();
    CK(cudaEventRecord(t.b, s));
    CK(cudaEventSynchronize(t.b));
    float m = 0;
    CK(cudaEventElapsedTime(&m, t.a, t.b));
    ms.push_back(m);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace kvagent::bench
