// Device index search benchmark (cuda::SearchRows), Llama-3.1-8B-shaped LatentIndex rows: mean
// keys in f16, 8 KV heads x head_dim 128 per indexed layer, 8 indexed layers (the default) or all
// 32; 30 query vectors per (layer, kv_head): a 30-token query where every token votes and the
// query heads of a GQA group are averaged. For 1k, 100k and 1M segments (32 layers: 1k, 100k):
//  - the whole search (votes, normalisation, aggregation, top-k) plus the copy of the k results
//    to the host, as one median of CUDA events;
//  - its steps timed one by one (dot products, normalisation statistics, aggregation, top-k incl.
//    the copy to the host);
//  - segments/s, matrix GB/s of the whole search and of the dot-product step, against the HBM
//    limit measured in the same run (device-to-device cudaMemcpy, read + write).
// Softmax + max (the index default) throughout, plus other norm/aggregation pairs at 100k.
// Data are random (timing does not depend on the values); every run's top-k is checked against a
// host sort of the device scores. Prints a table, writes a CSV.
//
// --mode index (or all) times the product path instead: LatentIndex::Search with
// IndexOptions::device = 0 (Llama-3.1-8B spec: 32 layers, 32 query heads, 8 KV heads, dim 128; the
// default 8 indexed layers, mean keys, softmax + max; a 30-token f32 query; top_k 10) at
// --segments (default 100k) segments: wall-clock medians of the whole call (query pooling,
// candidate scan, upload, kernels, top-k, result copies, hits), with and without explanations,
// with a session filter and pins, the first search after the adds and after 1,000 removals + 1,000
// adds (incremental mirror upload), against the CPU brute force and CPU two-stage search on the
// same index; the device's top-10 is checked against the CPU brute force.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include "bench_harness.cuh"
#include "cuda/index_search.h"
#include "kvagent/cuda_kv.h"
#include "kvagent/index.h"

namespace {

namespace kc = kvagent::cuda;
using kvagent::Aggregation;
using kvagent::TokenNorm;
using kvagent::bench::MedianMs;

constexpr int kKvHeads = 8, kHeadDim = 128, kQueries = 30;
constexpr int kWarmup = 2;

__device__ __forceinline__ float HashUniform(size_t i, uint64_t seed) {
  uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ULL ^ seed;
  x ^= x >> 31;
  x *= 0xBF58476D1CE4E5B9ULL;
  x ^= x >> 29;
  return static_cast<float>(x & 0xFFFFFF) * (2.0f / 16777216.0f) - 1.0f;  // [-1, 1)
}

__global__ void FillF16(__half* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    p[i] = __float2half_rn(2.0f * HashUniform(i, seed));
}

__global__ void FillF32(float* p, size_t n, uint64_t seed, float scale) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    p[i] = scale * HashUniform(i, seed);
}

// Owning device allocation that reports failure instead of exiting.
struct DeviceAlloc {
  void* p = nullptr;
  ~DeviceAlloc() {
    if (p != nullptr) cudaFree(p);
  }
  bool Allocate(size_t bytes, const char* what) {
    const cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
      cudaGetLastError();
      p = nullptr;
      std::printf("cudaMalloc of %.2f GB for %s failed: %s\n", bytes / 1e9, what, cudaGetErrorString(e));
      return false;
    }
    return true;
  }
};

struct Config {
  int layers;
  size_t segments;
  TokenNorm norm;
  Aggregation agg;
};

struct Result {
  Config c;
  double matrix_bytes = 0, votes_bytes = 0;
  double search_ms = 0, dot_ms = 0, norm_ms = 0, agg_ms = 0, topk_ms = 0;
  bool ok = false;
};

const char* NormName(TokenNorm n) {
  return n == TokenNorm::kNone ? "none" : n == TokenNorm::kSoftmax ? "softmax" : "zscore";
}
const char* AggName(Aggregation a) { return a == Aggregation::kMax ? "max" : "mean"; }

size_t AlignUp(size_t x) { return (x + 255) / 256 * 256; }

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// The host's top-k of `scores` (score descending, row ascending) must equal the device's.
bool SameTopK(const std::vector<float>& scores, const float* got_s, const int32_t* got_r, int k) {
  std::vector<int32_t> idx(scores.size());
  std::iota(idx.begin(), idx.end(), 0);
  const size_t count = std::min<size_t>(k, scores.size());
  std::partial_sort(idx.begin(), idx.begin() + count, idx.end(),
                    [&](int32_t a, int32_t b) { return scores[a] != scores[b] ? scores[a] > scores[b] : a < b; });
  for (size_t i = 0; i < count; ++i) {
    if (got_r[i] != idx[i] || got_s[i] != scores[idx[i]]) {
      std::printf("  top-k mismatch at %zu: device row %d score %.9g, host row %d score %.9g\n", i, got_r[i], got_s[i],
                  idx[i], scores[idx[i]]);
      return false;
    }
  }
  return true;
}

Result RunConfig(const Config& c, int top_k, int reps, cudaStream_t stream) {
  Result res;
  res.c = c;
  const int blocks = c.layers * kKvHeads;
  const int votes = blocks * kQueries;
  const size_t S = c.segments;
  res.matrix_bytes = static_cast<double>(S) * blocks * kHeadDim * 2;
  res.votes_bytes = static_cast<double>(S) * votes * 4;
  std::printf("\n== %d layers, %zu segments, %s + %s: matrix %.2f GB, votes %.2f GB ==\n", c.layers, S,
              NormName(c.norm), AggName(c.agg), res.matrix_bytes / 1e9, res.votes_bytes / 1e9);

  kc::RowSearch s;
  s.f16 = true;
  s.num_rows = S;
  s.blocks = blocks;
  s.width = kHeadDim;
  s.nq = kQueries;
  s.norm = c.norm;
  s.agg = c.agg;
  s.top_k = top_k;
  const auto need = kc::SearchRowsWorkspaceBytes(s);
  SK(need.status());
  // The steps' buffers are carved from the same workspace allocation (SearchRows reuses it).
  const size_t off_stats = AlignUp(S * votes * sizeof(float));
  const size_t off_scores = off_stats + AlignUp(2 * votes * sizeof(float));
  const size_t off_topk = off_scores + AlignUp(S * sizeof(float));
  const size_t topk_bytes = kc::TopKWorkspaceBytes(S, top_k);
  const size_t ws_bytes = std::max(*need, off_topk + topk_bytes);

  DeviceAlloc rows, q, ws, out;
  if (!rows.Allocate(static_cast<size_t>(res.matrix_bytes), "rows") ||
      !q.Allocate(static_cast<size_t>(blocks) * kQueries * kHeadDim * sizeof(float), "queries") ||
      !ws.Allocate(ws_bytes, "workspace") || !out.Allocate(top_k * (sizeof(float) + sizeof(int32_t)), "results")) {
    return res;
  }
  FillF16<<<2048, 256, 0, stream>>>(static_cast<__half*>(rows.p), S * blocks * kHeadDim, 0x1234 + S + c.layers);
  CK(cudaGetLastError());
  FillF32<<<256, 256, 0, stream>>>(static_cast<float*>(q.p), static_cast<size_t>(blocks) * kQueries * kHeadDim, 0x777,
                                   1.0f / std::sqrt(static_cast<float>(kHeadDim)));
  CK(cudaGetLastError());
  s.rows = rows.p;
  s.q = static_cast<const float*>(q.p);
  auto* out_s = static_cast<float*>(out.p);
  auto* out_r = reinterpret_cast<int32_t*>(out_s + top_k);
  float* host_s = nullptr;
  int32_t* host_r = nullptr;
  CK(cudaMallocHost(&host_s, top_k * sizeof(float)));
  CK(cudaMallocHost(&host_r, top_k * sizeof(int32_t)));
  auto copy_out = [&] {
    CK(cudaMemcpyAsync(host_s, out_s, top_k * sizeof(float), cudaMemcpyDeviceToHost, stream));
    CK(cudaMemcpyAsync(host_r, out_r, top_k * sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
  };

  // Whole search + copy of the results.
  res.search_ms = MedianMs(stream, kWarmup, reps, [&] {
    SK(kc::SearchRows(s, ws.p, ws_bytes, out_s, out_r, stream));
    copy_out();
  });
  CK(cudaStreamSynchronize(stream));
  std::vector<float> search_s(host_s, host_s + top_k);
  std::vector<int32_t> search_r(host_r, host_r + top_k);

  // The steps, each between two events.
  char* w = static_cast<char*>(ws.p);
  auto* votes_d = reinterpret_cast<float*>(w);
  auto* stats_d = reinterpret_cast<float*>(w + off_stats);
  auto* scores_d = reinterpret_cast<float*>(w + off_scores);
  cudaEvent_t ev[5];
  for (auto& e : ev) CK(cudaEventCreate(&e));
  std::vector<double> t_dot, t_norm, t_agg, t_topk;
  for (int i = 0; i < kWarmup + reps; ++i) {
    CK(cudaEventRecord(ev[0], stream));
    SK(kc::ScoreVotes(rows.p, true, S, blocks, kHeadDim, s.q, kQueries, votes_d, stream));
    CK(cudaEventRecord(ev[1], stream));
    SK(kc::VoteStats(votes_d, S, votes, c.norm, stats_d, stream));
    CK(cudaEventRecord(ev[2], stream));
    SK(kc::AggregateVotes(votes_d, S, votes, c.norm, c.agg, stats_d, scores_d, stream));
    CK(cudaEventRecord(ev[3], stream));
    SK(kc::TopKRows(scores_d, S, top_k, w + off_topk, topk_bytes, out_s, out_r, stream));
    copy_out();
    CK(cudaEventRecord(ev[4], stream));
    CK(cudaEventSynchronize(ev[4]));
    if (i < kWarmup) continue;
    float m[4];
    for (int j = 0; j < 4; ++j) CK(cudaEventElapsedTime(&m[j], ev[j], ev[j + 1]));
    t_dot.push_back(m[0]);
    t_norm.push_back(m[1]);
    t_agg.push_back(m[2]);
    t_topk.push_back(m[3]);
  }
  for (auto& e : ev) CK(cudaEventDestroy(e));
  res.dot_ms = Median(t_dot);
  res.norm_ms = Median(t_norm);
  res.agg_ms = Median(t_agg);
  res.topk_ms = Median(t_topk);

  // Checks: both runs' top-k against a host sort of the device scores.
  std::vector<float> scores(S);
  CK(cudaMemcpy(scores.data(), scores_d, S * sizeof(float), cudaMemcpyDeviceToHost));
  const bool steps_ok = SameTopK(scores, host_s, host_r, top_k);
  const bool search_ok = SameTopK(scores, search_s.data(), search_r.data(), top_k);
  std::printf("top-k check vs host sort of the device scores: steps %s, whole search %s; best row %d score %.6g\n",
              steps_ok ? "ok" : "FAILED", search_ok ? "ok" : "FAILED", host_r[0], host_s[0]);
  res.ok = steps_ok && search_ok;
  CK(cudaFreeHost(host_s));
  CK(cudaFreeHost(host_r));
  return res;
}

// ---- LatentIndex::Search through the device path ----------------------------------------------

double WallMs(const std::function<void()>& fn) {
  const auto t0 = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

struct IndexTiming {
  std::string what;
  double ms = 0;
  int runs = 0;
};

int RunLatentIndex(size_t segments, int reps, const std::string& csv_path, const char* gpu_name) {
  using namespace kvagent;
  constexpr int kLayers = 32, kQHeads = 32, kTokens = 30, kTopK = 10;
  RopeSpec rope;
  const ModelSpec spec = UniformModelSpec("llama-3.1-8b-shape", kLayers, kQHeads, kKvHeads, kHeadDim, DType::kBF16,
                                          rope, HashString("bench"));
  IndexOptions o;
  o.device = 0;
  auto made = LatentIndex::Create(spec, o);
  if (!made.ok()) {
    std::printf("LatentIndex::Create(device 0): %s\n", made.status().ToString().c_str());
    return 2;
  }
  LatentIndex& idx = **made;
  const int L = static_cast<int>(idx.layers().size());
  std::printf("\n== LatentIndex::Search, device 0: %zu segments x %d layers (of %d), %d query tokens, top_k %d ==\n",
              segments, L, kLayers, kTokens, kTopK);
  // Summaries: random mean keys (what is scored), a wide constant box.
  KeySummary s;
  s.num_kv_heads = kKvHeads;
  s.head_dim = kHeadDim;
  s.num_tokens = 16;
  s.layers = idx.layers();
  const size_t n = static_cast<size_t>(L) * kKvHeads * kHeadDim;
  s.min.assign(n, -8.0f);
  s.max.assign(n, 8.0f);
  s.mean.resize(n);
  uint64_t x = 0x9E3779B97F4A7C15ULL;
  auto uniform = [&x] {  // xorshift64*, [-1, 1)
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    return static_cast<float>((x * 0x2545F4914F6CDD1DULL) >> 40) * (2.0f / 16777216.0f) - 1.0f;
  };
  auto entry = [](size_t i) {
    IndexEntry e;
    e.key = MemoryKey("bench", "s" + std::to_string(i % 8), static_cast<int64_t>(i), 0);
    e.ns = "bench";
    e.session = "s" + std::to_string(i % 8);
    e.turn = static_cast<int64_t>(i);
    e.time_us = static_cast<int64_t>(i);
    e.num_tokens = 64;
    return e;
  };
  auto add = [&](size_t i) {
    for (auto& v : s.mean) v = 2.0f * uniform();
    const Status st = idx.Add(entry(i), s);
    if (!st.ok()) std::printf("Add: %s\n", st.ToString().c_str());
  };
  const double add_ms = WallMs([&] {
    for (size_t i = 0; i < segments; ++i) add(i);
  });
  std::printf("added %zu segments in %.0f ms (%.1f us each, incl. batched mirror uploads); row %zu B\n", segments,
              add_ms, 1e3 * add_ms / segments, idx.RowBytes());
  std::vector<float> q(static_cast<size_t>(L) * kQHeads * kTokens * kHeadDim);
  for (auto& v : q) v = 1.5f * uniform();
  const QueryView view{q.data(), DType::kF32, L, kQHeads, kTokens, kHeadDim};

  std::vector<IndexTiming> rows;
  bool ok = true;
  auto search = [&](const SearchRequest& r, std::vector<Hit>* out = nullptr) {
    auto h = idx.Search(view, r);
    if (!h.ok()) {
      std::printf("Search: %s\n", h.status().ToString().c_str());
      ok = false;
      return;
    }
    if (out) *out = std::move(*h);
  };
  auto timed = [&](const std::string& what, const SearchRequest& r, int runs) {
    for (int i = 0; i < kWarmup; ++i) search(r);
    std::vector<double> t;
    for (int i = 0; i < runs; ++i) t.push_back(WallMs([&] { search(r); }));
    rows.push_back({what, Median(t), runs});
    std::printf("  %-58s %9.3f ms (median of %d)\n", what.c_str(), rows.back().ms, runs);
  };
  SearchRequest dev;
  dev.top_k = kTopK;
  dev.backend = SearchBackend::kDevice;
  rows.push_back({"device: first search after the adds (uploads pending rows)", WallMs([&] { search(dev); }), 1});
  std::printf("  %-58s %9.3f ms\n", rows.back().what.c_str(), rows.back().ms);
  timed("device: top 10, explain", dev, reps);
  SearchRequest dev_quiet = dev;
  dev_quiet.explain = false;
  timed("device: top 10, no explain", dev_quiet, reps);
  SearchRequest dev_filter = dev;
  dev_filter.session = "s3";
  dev_filter.min_time_us = static_cast<int64_t>(segments / 10);
  dev_filter.pinned = {entry(1).key, entry(2).key};
  timed("device: session filter (1/8) + time range + 2 pins, explain", dev_filter, reps);
  SearchRequest dev_few = dev;
  dev_few.min_time_us = static_cast<int64_t>(segments - 100);
  timed("device: time filter to 100 candidates (fixed costs), explain", dev_few, reps);
  SearchRequest dev_budget = dev;
  dev_budget.top_k = 0;
  dev_budget.token_budget = 64 * kTopK;
  timed("device: token budget (all scores to the host), explain", dev_budget, reps);
  // Incremental upload: 1,000 removals (moves into the holes) and 1,000 adds, then one search.
  for (size_t i = 0; i < 1000; ++i) (void)idx.Remove(entry(i * (segments / 1000)).key);
  for (size_t i = 0; i < 1000; ++i) add(segments + i);
  rows.push_back({"device: first search after 1k removes + 1k adds", WallMs([&] { search(dev); }), 1});
  std::printf("  %-58s %9.3f ms\n", rows.back().what.c_str(), rows.back().ms);
  timed("device: top 10, explain (after the churn)", dev, reps);

  SearchRequest cpu = dev;
  cpu.backend = SearchBackend::kCpu;
  cpu.exact = true;
  const int cpu_reps = std::max(3, reps / 3);
  timed("cpu: brute force (exact), top 10, explain", cpu, cpu_reps);
  SearchRequest cpu2 = cpu;
  cpu2.exact = false;
  timed("cpu: two-stage (default prefilter), top 10, explain", cpu2, cpu_reps);

  // Check: device top 10 vs the CPU brute force.
  std::vector<Hit> dh, ch;
  search(dev, &dh);
  search(cpu, &ch);
  bool same = dh.size() == ch.size();
  double worst = 0;
  for (size_t i = 0; same && i < dh.size(); ++i) {
    same &= dh[i].entry.key == ch[i].entry.key && dh[i].rank == ch[i].rank;
    worst = std::max(
        worst, static_cast<double>(std::fabs(dh[i].score - ch[i].score) / std::max(1e-30f, std::fabs(ch[i].score))));
  }
  std::printf("check: device top %d %s the CPU brute force (max relative score difference %.2e)\n", kTopK,
              same ? "equals" : "DIFFERS FROM", worst);
  ok &= same && worst < 1e-3;
  std::printf("device memory held by the index: %.1f MB; host: %.1f MB\n", idx.DeviceMemoryBytes() / 1e6,
              idx.MemoryBytes() / 1e6);
  FILE* csv = std::fopen(csv_path.c_str(), "w");
  if (csv) {
    std::fprintf(csv, "gpu,segments,layers,kv_heads,head_dim,query_tokens,top_k,what,ms,runs,check,data\n");
    for (const IndexTiming& r : rows) {
      std::fprintf(csv, "\"%s\",%zu,%d,%d,%d,%d,%d,\"%s\",%.4f,%d,%s,random\n", gpu_name, segments, L, kKvHeads,
                   kHeadDim, kTokens, kTopK, r.what.c_str(), r.ms, r.runs, ok ? "ok" : "failed");
    }
    std::fclose(csv);
  }
  std::printf("correctness (LatentIndex device path): %s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 3;
}

}  // namespace

int main(int argc, char** argv) {
  std::string csv_path = "cuda_index_bench.csv";
  int reps = 10;
  int top_k = 10;
  std::string mode = "raw";
  std::string index_csv = "cuda_index_latent.csv";
  size_t segments = 100000;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--mode" && i + 1 < argc) {
      mode = argv[++i];
    } else if (a == "--index-csv" && i + 1 < argc) {
      index_csv = argv[++i];
    } else if (a == "--segments" && i + 1 < argc) {
      segments = static_cast<size_t>(std::max(1000L, std::atol(argv[++i])));
    } else if (a == "--csv" && i + 1 < argc) {
      csv_path = argv[++i];
    } else if (a == "--reps" && i + 1 < argc) {
      reps = std::max(3, std::atoi(argv[++i]));
    } else if (a == "--top-k" && i + 1 < argc) {
      top_k = std::clamp(std::atoi(argv[++i]), 1, kc::kMaxSearchTopK);
    } else {
      std::fprintf(stderr,
                   "usage: %s [--mode raw|index|all] [--csv path] [--index-csv path] [--reps n] [--top-k k] "
                   "[--segments n (index mode)]\n",
                   argv[0]);
      return 1;
    }
  }
  if (mode != "raw" && mode != "index" && mode != "all") {
    std::fprintf(stderr, "--mode must be raw, index or all\n");
    return 1;
  }
  const kvagent::bench::DeviceInfo dev = kvagent::bench::DescribeDevice();
  const cudaDeviceProp& prop = dev.prop;
  const int drv = dev.driver, rt = dev.runtime;
  std::printf(
      "shape: Llama-3.1-8B index rows, %d kv heads x dim %d, f16 mean keys, %d query vectors per "
      "(layer, kv head), top_k %d, %d timed runs after %d warm-up\n",
      kKvHeads, kHeadDim, kQueries, top_k, reps, kWarmup);
  std::printf("data: RANDOM rows and queries (timing does not depend on the values)\n");
  cudaStream_t stream;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  // HBM limit: device-to-device copy of 4 GiB, counting read + write.
  double hbm_gbps = 0;
  {
    const size_t bytes = size_t{4} << 30;
    DeviceAlloc a, b;
    if (a.Allocate(bytes, "memcpy source") && b.Allocate(bytes, "memcpy destination")) {
      CK(cudaMemsetAsync(a.p, 1, bytes, stream));
      const double ms = MedianMs(stream, kWarmup, reps,
                                 [&] { CK(cudaMemcpyAsync(b.p, a.p, bytes, cudaMemcpyDeviceToDevice, stream)); });
      hbm_gbps = 2.0 * bytes / ms / 1e6;
    }
    std::printf("HBM limit: D2D cudaMemcpy of 4 GiB, read + write: %.1f GB/s\n", hbm_gbps);
  }

  std::vector<Config> configs = {
      {8, 1000, TokenNorm::kSoftmax, Aggregation::kMax},    {8, 100000, TokenNorm::kSoftmax, Aggregation::kMax},
      {8, 1000000, TokenNorm::kSoftmax, Aggregation::kMax}, {32, 1000, TokenNorm::kSoftmax, Aggregation::kMax},
      {32, 100000, TokenNorm::kSoftmax, Aggregation::kMax}, {8, 100000, TokenNorm::kSoftmax, Aggregation::kMean},
      {8, 100000, TokenNorm::kZScore, Aggregation::kMean},  {8, 100000, TokenNorm::kNone, Aggregation::kMax},
  };
  // Index mode: the raw kernel at the goal shape only, for comparison with the product path.
  if (mode == "index") configs = {{8, 100000, TokenNorm::kSoftmax, Aggregation::kMax}};
  std::vector<Result> results;
  for (const Config& c : configs) results.push_back(RunConfig(c, top_k, reps, stream));
  CK(cudaStreamDestroy(stream));

  std::printf("\n%-6s %-9s %-13s %9s %9s %8s %8s %8s %8s %11s %9s %7s %9s %9s\n", "layers", "segments", "norm+agg",
              "matrix_MB", "search_ms", "dot_ms", "norm_ms", "agg_ms", "topk_ms", "segments/s", "GB/s", "%HBM",
              "dot_GB/s", "dot_TFLOPs");
  FILE* csv = std::fopen(csv_path.c_str(), "w");
  if (csv == nullptr) std::printf("cannot write %s\n", csv_path.c_str());
  if (csv) {
    std::fprintf(csv,
                 "gpu,driver,runtime,layers,kv_heads,head_dim,dtype,query_vectors,segments,top_k,norm,agg,matrix_bytes,"
                 "votes_bytes,search_ms,dot_ms,norm_ms,agg_ms,topk_ms,segments_per_s,matrix_gbps,hbm_gbps,pct_of_hbm,"
                 "dot_gbps,dot_tflops,check,data\n");
  }
  bool all_ok = true;
  double goal_ms = -1;
  for (const Result& r : results) {
    all_ok &= r.ok;
    if (r.search_ms <= 0) {
      std::printf("%-6d %-9zu %-13s skipped (allocation failed)\n", r.c.layers, r.c.segments, NormName(r.c.norm));
      continue;
    }
    const double seg_s = r.c.segments / (r.search_ms / 1e3);
    const double gbps = r.matrix_bytes / r.search_ms / 1e6;
    const double dot_gbps = r.matrix_bytes / r.dot_ms / 1e6;
    const double flops = 2.0 * r.c.segments * r.c.layers * kKvHeads * kQueries * kHeadDim;
    const double tflops = flops / r.dot_ms / 1e9;
    const double pct = hbm_gbps > 0 ? 100.0 * gbps / hbm_gbps : 0;
    const std::string na = std::string(NormName(r.c.norm)) + "+" + AggName(r.c.agg);
    std::printf("%-6d %-9zu %-13s %9.1f %9.3f %8.3f %8.3f %8.3f %8.3f %11.3g %9.1f %6.1f%% %9.1f %9.2f%s\n", r.c.layers,
                r.c.segments, na.c_str(), r.matrix_bytes / 1e6, r.search_ms, r.dot_ms, r.norm_ms, r.agg_ms, r.topk_ms,
                seg_s, gbps, pct, dot_gbps, tflops, r.ok ? "" : "  CHECK FAILED");
    if (csv) {
      std::fprintf(
          csv,
          "\"%s\",%d,%d,%d,%d,%d,f16,%d,%zu,%d,%s,%s,%.0f,%.0f,%.4f,%.4f,%.4f,%.4f,%.4f,%.1f,%.2f,%.2f,%.2f,%.2f,"
          "%.3f,%s,random\n",
          prop.name, drv, rt, r.c.layers, kKvHeads, kHeadDim, kQueries, r.c.segments, top_k, NormName(r.c.norm),
          AggName(r.c.agg), r.matrix_bytes, r.votes_bytes, r.search_ms, r.dot_ms, r.norm_ms, r.agg_ms, r.topk_ms, seg_s,
          gbps, hbm_gbps, pct, dot_gbps, tflops, r.ok ? "ok" : "failed");
    }
    if (r.c.layers == 8 && r.c.segments == 100000 && r.c.norm == TokenNorm::kSoftmax && r.c.agg == Aggregation::kMax)
      goal_ms = r.search_ms;
  }
  if (csv) std::fclose(csv);
  std::printf(
      "GB/s: matrix bytes / whole search time; dot_GB/s: matrix bytes / dot-product step; %%HBM against the "
      "D2D memcpy (read + write) limit, %.1f GB/s. topk_ms includes the copy of the k results to the host.\n",
      hbm_gbps);
  if (goal_ms > 0) {
    std::printf("goal: 100k segments x 8 layers, softmax + max, whole search < 10 ms: %s (%.3f ms)\n",
                goal_ms < 10 ? "met" : "NOT met", goal_ms);
  }
  std::printf("correctness: %s\n", all_ok ? "all checks passed" : "CHECKS FAILED");
  int rc = all_ok ? 0 : 3;
  if (mode != "raw") {
    const int irc = RunLatentIndex(segments, reps, index_csv, prop.name);
    if (rc == 0) rc = irc;
  }
  return rc;
}
