// GPU KV path benchmark, Llama-3.1-8B-shaped KV (32 layers, 8 KV heads, dim 128, bf16,
// llama3 RoPE): for 1k, 16k and 128k tokens,
//  - host -> device segment load into a vLLM-style paged cache (block 16, shuffled block table)
//    with keys rotated to planned positions, two ways: zero-copy (the kernel reads mapped pinned
//    host memory) and staged (layer chunks copied to a device double buffer on a copy stream
//    while the kernel consumes the previous chunk), against the measured pinned H2D memcpy;
//  - device-resident re-positioning (canonical on device -> paged, rotated), against a measured
//    device-to-device memcpy, both counting bytes read + written.
// Every variant's output is checked: poisoned cache before each run, checksums of the
// variants must agree, and sampled rows are compared with a double-precision CPU reference.
// Times: CUDA events, median of timed runs after warm-up. Prints a table, writes a CSV.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bench_harness.cuh"
#include "kvagent/cuda_kv.h"
#include "kvagent/device_tier.h"
#include "kvagent/dtype.h"

namespace {

using kvagent::DType;
namespace kc = kvagent::cuda;

using kvagent::bench::MedianMs;

constexpr int kL = 32, kH = 8, kD = 128, kBlock = 16;
constexpr size_t kBytesPerToken = size_t{kL} * 2 * kH * kD * 2;

__global__ void FillBf16(uint16_t* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ULL ^ seed;
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 29;
    float v = static_cast<float>(x & 0xFFFF) * (4.0f / 65536.0f) - 2.0f;
    uint32_t b = __float_as_uint(v);
    p[i] = static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
  }
}

__global__ void Checksum(const uint64_t* p, size_t n, unsigned long long* out) {
  unsigned long long acc = 0;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    acc += p[i] * (2 * i + 1);
  atomicAdd(out, acc);
}

struct Row {
  int tokens;
  std::string what;
  double bytes;
  double ms;
  double limit_gbps;
  std::string limit_name;
};

}  // namespace

int main(int argc, char** argv) {
  std::string csv_path = "cuda_kv_bench.csv";
  std::vector<int> token_counts = {1024, 16384, 131072};
  int reps = 7;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--csv" && i + 1 < argc)
      csv_path = argv[++i];
    else if (a == "--reps" && i + 1 < argc)
      reps = std::max(3, std::atoi(argv[++i]));
    else if (a == "--tokens" && i + 1 < argc) {
      token_counts.clear();
      std::string list = argv[++i];
      size_t pos = 0;
      while (pos < list.size()) {
        size_t c = list.find(',', pos);
        token_counts.push_back(std::atoi(list.substr(pos, c - pos).c_str()));
        if (c == std::string::npos) break;
        pos = c + 1;
      }
    } else {
      std::fprintf(stderr, "usage: %s [--csv path] [--reps n] [--tokens 1024,16384,131072]\n", argv[0]);
      return 1;
    }
  }
  const kvagent::bench::DeviceInfo dev = kvagent::bench::DescribeDevice();
  const cudaDeviceProp& prop = dev.prop;
  const int drv = dev.driver, rt = dev.runtime;
  std::printf("shape: %d layers x %d kv heads x dim %d, bf16, %zu bytes/token, paged block %d\n", kL, kH, kD,
              kBytesPerToken, kBlock);

  kvagent::RopeSpec rope;
  rope.theta = 500000;
  rope.scaling = kvagent::RopeScaling::kLlama3;
  rope.factor = 8;
  rope.low_freq_factor = 1;
  rope.high_freq_factor = 4;
  rope.original_max_position = 8192;
  kvagent::ModelSpec spec =
      kvagent::UniformModelSpec("llama-3.1-8b-shape", kL, 32, kH, kD, DType::kBF16, rope, kvagent::HashString("bench"));
  auto table = kc::RopeDeviceTable::Create(spec);
  SK(table.status());

  cudaStream_t compute, copy;
  CK(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking));
  CK(cudaStreamCreateWithFlags(&copy, cudaStreamNonBlocking));
  std::vector<Row> rows;
  bool all_ok = true;

  for (int T : token_counts) {
    const size_t bytes = kBytesPerToken * T;
    const size_t elems = bytes / 2;
    const int64_t blocks = (T + kBlock - 1) / kBlock + 8;
    const size_t layer_cache_elems = static_cast<size_t>(blocks) * kBlock * kH * kD;
    const size_t cache_bytes = layer_cache_elems * 2 * 2 * kL;  // K and V, all layers
    constexpr int kChunkLayers = 2;
    const size_t chunk_bytes = bytes / kL * kChunkLayers;
    std::printf("\n== %d tokens: payload %.1f MiB ==\n", T, bytes / 1048576.0);

    uint16_t *dev_canon, *dev_cache, *dev_stage;
    void* host;
    CK(cudaMalloc(&dev_canon, bytes));
    CK(cudaMalloc(&dev_cache, cache_bytes));
    CK(cudaMalloc(&dev_stage, 2 * chunk_bytes));
    CK(cudaHostAlloc(&host, bytes, cudaHostAllocMapped | cudaHostAllocPortable));
    FillBf16<<<1024, 256, 0, compute>>>(dev_canon, elems, 0x1234 + T);
    CK(cudaGetLastError());
    CK(cudaMemcpyAsync(host, dev_canon, bytes, cudaMemcpyDeviceToHost, compute));
    CK(cudaStreamSynchronize(compute));
    auto mapped = kc::MappedDevicePointer(host);
    SK(mapped.status());

    // Paged view, shuffled block table; planned positions start at 4096.
    std::vector<void*> ks, vs;
    for (int l = 0; l < kL; ++l) {
      ks.push_back(dev_cache + (2 * l) * layer_cache_elems);
      vs.push_back(dev_cache + (2 * l + 1) * layer_cache_elems);
    }
    kc::EngineKvView view = kc::EngineKvView::Paged(DType::kBF16, kH, kD, kBlock, blocks, ks, vs);
    std::vector<int64_t> table_h(blocks);
    std::iota(table_h.begin(), table_h.end(), 0);
    std::shuffle(table_h.begin(), table_h.end(), std::mt19937_64(T));
    std::vector<int64_t> slots_h(T);
    for (int t = 0; t < T; ++t) slots_h[t] = table_h[t / kBlock] * kBlock + t % kBlock;
    int64_t* slots_d;
    CK(cudaMalloc(&slots_d, T * sizeof(int64_t)));
    CK(cudaMemcpy(slots_d, slots_h.data(), T * sizeof(int64_t), cudaMemcpyHostToDevice));
    kc::MoveOptions o;
    o.canonical_dtype = DType::kBF16;
    o.rotation = kc::Rotation::kApply;
    o.rope = table.value().get();
    o.slots = slots_d;
    o.new_position_base = 4096;

    const int warm = 2;
    auto poison = [&] { CK(cudaMemsetAsync(dev_cache, 0xFF, cache_bytes, compute)); };
    unsigned long long* sum_d;
    CK(cudaMalloc(&sum_d, sizeof(unsigned long long)));
    auto checksum = [&]() {
      CK(cudaStreamSynchronize(compute));
      CK(cudaMemset(sum_d, 0, sizeof(unsigned long long)));
      Checksum<<<1024, 256>>>(reinterpret_cast<const uint64_t*>(dev_cache), cache_bytes / 8, sum_d);
      CK(cudaGetLastError());
      unsigned long long s = 0;
      CK(cudaMemcpy(&s, sum_d, sizeof(s), cudaMemcpyDeviceToHost));
      return s;
    };

    // 1. Limits: pinned H2D memcpy, device-to-device memcpy.
    const double h2d_ms = MedianMs(
        compute, warm, reps, [&] { CK(cudaMemcpyAsync(dev_canon, host, bytes, cudaMemcpyHostToDevice, compute)); });
    const double h2d_gbps = bytes / h2d_ms / 1e6;
    const double d2d_ms = MedianMs(compute, warm, reps, [&] {
      CK(cudaMemcpyAsync(dev_cache, dev_canon, bytes, cudaMemcpyDeviceToDevice, compute));
    });
    const double d2d_gbps = 2.0 * bytes / d2d_ms / 1e6;
    rows.push_back({T, "pinned H2D memcpy (limit)", double(bytes), h2d_ms, h2d_gbps, "itself"});
    rows.push_back({T, "D2D memcpy, read+write (limit)", 2.0 * bytes, d2d_ms, d2d_gbps, "itself"});

    // 2. Device-resident re-positioning: canonical (device) -> paged, keys rotated.
    kc::CanonicalSpan dev_span{dev_canon, nullptr, T, 0, T};
    poison();
    SK(kc::LoadToEngine({&dev_span, 1}, view, o, compute));
    const unsigned long long ref_sum = checksum();
    const double dev_ms = MedianMs(compute, warm, reps, [&] {
      SK(kc::LoadToEngine({&dev_span, 1}, view, o, compute));
    });
    rows.push_back({T, "device re-position -> paged (r+w)", 2.0 * bytes, dev_ms, d2d_gbps, "D2D memcpy"});
    kc::MoveOptions plain = o;
    plain.rotation = kc::Rotation::kNone;
    const double copy_ms = MedianMs(compute, warm, reps, [&] {
      SK(kc::LoadToEngine({&dev_span, 1}, view, plain, compute));
    });
    rows.push_back({T, "device copy -> paged, no rotation (r+w)", 2.0 * bytes, copy_ms, d2d_gbps, "D2D memcpy"});

    // CPU spot check of the device-resident result: sampled tokens, all layers and heads.
    {
      SK(kc::LoadToEngine({&dev_span, 1}, view, o, compute));
      CK(cudaStreamSynchronize(compute));
      std::vector<uint16_t> src(kD), got(kD);
      int bad = 0;
      const int samples[] = {0, 1, T / 2, T - 1};
      for (int t : samples)
        for (int l = 0; l < kL; l += 7)
          for (int kv = 0; kv < 2; ++kv)
            for (int h = 0; h < kH; h += 3) {
              const size_t so = ((static_cast<size_t>(l) * 2 + kv) * kH + h) * T * kD + static_cast<size_t>(t) * kD;
              std::memcpy(src.data(), static_cast<const uint16_t*>(host) + so, kD * 2);
              const size_t eo = (2 * l + kv) * layer_cache_elems + static_cast<size_t>(slots_h[t]) * kH * kD + h * kD;
              CK(cudaMemcpy(got.data(), dev_cache + eo, kD * 2, cudaMemcpyDeviceToHost));
              const kc::RopeTable& tb = table.value()->layer(l);
              for (int d = 0; d < kD; ++d) {
                double want = kvagent::BF16ToF32(src[d]);
                if (kv == 0) {
                  const int i = d % (kD / 2);
                  const double th = static_cast<double>(4096 + t) * tb.inv_freq[i];
                  const double xa = kvagent::BF16ToF32(src[i]), xb = kvagent::BF16ToF32(src[i + kD / 2]);
                  want = d < kD / 2 ? xa * std::cos(th) - xb * std::sin(th) : xb * std::cos(th) + xa * std::sin(th);
                  const double g = kvagent::BF16ToF32(got[d]);
                  if (!(std::fabs(g - want) <= std::fabs(want) * 0.0079 + 4e-6 * (std::fabs(xa) + std::fabs(xb))))
                    ++bad;
                } else if (got[d] != src[d]) {
                  ++bad;
                }
              }
            }
      std::printf("spot check vs CPU reference: %s (%d mismatches)\n", bad == 0 ? "ok" : "FAILED", bad);
      all_ok &= bad == 0;
    }

    // 3. Zero-copy fused load: the kernel reads pinned host memory over PCIe.
    kc::CanonicalSpan host_span{mapped.value(), nullptr, T, 0, T};
    poison();
    SK(kc::LoadToEngine({&host_span, 1}, view, o, compute));
    const bool zc_ok = checksum() == ref_sum;
    const double zc_ms = MedianMs(compute, warm, reps, [&] {
      SK(kc::LoadToEngine({&host_span, 1}, view, o, compute));
    });
    rows.push_back({T, "H2D fused load, zero-copy", double(bytes), zc_ms, h2d_gbps, "pinned H2D memcpy"});

    // 4. Staged fused load: copy stream fills a device double buffer by layer chunks, the
    //    compute stream re-positions each chunk into the cache as soon as it lands.
    const int n_chunks = kL / kChunkLayers;
    std::vector<cudaEvent_t> landed(2), consumed(2);
    for (int i = 0; i < 2; ++i) {
      CK(cudaEventCreateWithFlags(&landed[i], cudaEventDisableTiming));
      CK(cudaEventCreateWithFlags(&consumed[i], cudaEventDisableTiming));
    }
    cudaEvent_t start_ev;
    CK(cudaEventCreateWithFlags(&start_ev, cudaEventDisableTiming));
    auto staged = [&] {
      CK(cudaEventRecord(start_ev, compute));
      CK(cudaStreamWaitEvent(copy, start_ev, 0));
      for (int c = 0; c < n_chunks; ++c) {
        const int b = c % 2;
        if (c >= 2) CK(cudaStreamWaitEvent(copy, consumed[b], 0));
        CK(cudaMemcpyAsync(reinterpret_cast<char*>(dev_stage) + b * chunk_bytes,
                           static_cast<const char*>(host) + c * chunk_bytes, chunk_bytes, cudaMemcpyHostToDevice,
                           copy));
        CK(cudaEventRecord(landed[b], copy));
        CK(cudaStreamWaitEvent(compute, landed[b], 0));
        kc::MoveOptions oc = o;
        oc.layer_begin = c * kChunkLayers;
        oc.num_layers = kChunkLayers;
        oc.span_layer_begin = 0;
        kc::EngineKvView vc = view;
        vc.k_layers.assign(ks.begin() + c * kChunkLayers, ks.begin() + (c + 1) * kChunkLayers);
        vc.v_layers.assign(vs.begin() + c * kChunkLayers, vs.begin() + (c + 1) * kChunkLayers);
        kc::CanonicalSpan sc{reinterpret_cast<char*>(dev_stage) + b * chunk_bytes, nullptr, T, 0, T};
        SK(kc::LoadToEngine({&sc, 1}, vc, oc, compute));
        CK(cudaEventRecord(consumed[b], compute));
      }
    };
    poison();
    staged();
    const bool st_ok = checksum() == ref_sum;
    const double st_ms = MedianMs(compute, warm, reps, staged);
    rows.push_back({T, "H2D fused load, staged 2-layer chunks", double(bytes), st_ms, h2d_gbps, "pinned H2D memcpy"});
    std::printf("zero-copy output %s, staged output %s (checksums vs device-resident result)\n",
                zc_ok ? "matches" : "DIFFERS", st_ok ? "matches" : "DIFFERS");
    all_ok &= zc_ok && st_ok;

    for (int i = 0; i < 2; ++i) {
      CK(cudaEventDestroy(landed[i]));
      CK(cudaEventDestroy(consumed[i]));
    }
    CK(cudaEventDestroy(start_ev));
    CK(cudaFree(sum_d));
    CK(cudaFree(slots_d));
    CK(cudaFreeHost(host));
    CK(cudaFree(dev_stage));
    CK(cudaFree(dev_cache));
    CK(cudaFree(dev_canon));
  }

  std::printf("\n%-8s %-42s %10s %10s %10s %7s  %s\n", "tokens", "operation", "MiB", "ms", "GB/s", "%limit", "limit");
  FILE* csv = std::fopen(csv_path.c_str(), "w");
  if (csv)
    std::fprintf(csv, "gpu,driver,runtime,tokens,operation,bytes,median_ms,gbps,limit_gbps,pct_of_limit,limit\n");
  for (const Row& r : rows) {
    const double gbps = r.bytes / r.ms / 1e6;
    const double pct = 100.0 * gbps / r.limit_gbps;
    std::printf("%-8d %-42s %10.1f %10.3f %10.1f %6.1f%%  %s\n", r.tokens, r.what.c_str(), r.bytes / 1048576.0, r.ms,
                gbps, pct, r.limit_name.c_str());
    if (csv)
      std::fprintf(csv, "\"%s\",%d,%d,%d,\"%s\",%.0f,%.4f,%.2f,%.2f,%.2f,\"%s\"\n", prop.name, drv, rt, r.tokens,
                   r.what.c_str(), r.bytes, r.ms, gbps, r.limit_gbps, pct, r.limit_name.c_str());
  }
  if (csv) std::fclose(csv);
  std::printf("goals: H2D fused load >= 90%% of pinned H2D memcpy; device re-position >= 70%% of D2D memcpy\n");
  std::printf("correctness: %s\n", all_ok ? "all checks passed" : "CHECKS FAILED");
  return all_ok ? 0 : 3;
}
