// RoPE re-encoding throughput on the CPU against the measured memory bandwidth.
//
// Shape: Llama-3.1-8B KV (32 layers, 8 KV heads, head_dim 128), 1k-16k tokens, bf16 and f32.
// Re-encoding moves post-RoPE keys to new positions in place; V is never touched, so the bytes
// are the K planes read + written (2 x K bytes). The hardware limit is memcpy of a buffer far
// larger than the LLC, also counted as bytes read + written, with the same thread counts.
//
//   BM_Memcpy/<MiB>/<threads>
//   BM_RepositionKeys/<tokens>/<dtype 0=f32 2=bf16>/<threads>   K of all 32 layers as one
//       [layers*heads][tokens][dim] array (what RepositionSegmentKeys does for a uniform spec)
//   BM_ApplyKeys/<tokens>/<dtype>/<threads>   pre-RoPE keys of all 32 layers rotated to
//       consecutive positions (one angle per token; loading a pre-RoPE segment)
//   BM_RepositionSegment/<tokens>/<dtype>/<threads>              the segment helper on a full
//       canonical payload (K and V), bytes counted for K only
#include <benchmark/benchmark.h>

#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <thread>
#include <vector>

#include "kvagent/rope.h"

namespace kvagent {
namespace {

constexpr int kLayers = 32;
constexpr int kKvHeads = 8;
constexpr int kHeadDim = 128;

RopeSpec Llama31Rope() {
  RopeSpec s;
  s.theta = 500000.0;
  s.scaling = RopeScaling::kLlama3;
  s.factor = 8.0;
  s.low_freq_factor = 1.0;
  s.high_freq_factor = 4.0;
  s.original_max_position = 8192;
  return s;
}

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
using Bytes = std::unique_ptr<std::byte, AlignedFree>;

Bytes AllocFilled(size_t n) {
  Bytes b(static_cast<std::byte*>(std::aligned_alloc(64, (n + 63) / 64 * 64)));
  // Small random-looking finite values in any dtype: bytes 0x3c/0x3d patterns are normal floats.
  uint32_t state = 12345;
  uint16_t* p = reinterpret_cast<uint16_t*>(b.get());
  for (size_t i = 0; i < n / 2; ++i) {
    state = state * 1664525u + 1013904223u;
    p[i] = static_cast<uint16_t>(0x3c00 | ((state >> 16) & 0x03ff));
  }
  return b;
}

void BM_Memcpy(benchmark::State& state) {
  const size_t bytes = static_cast<size_t>(state.range(0)) << 20;
  const int threads = static_cast<int>(state.range(1));
  Bytes src = AllocFilled(bytes), dst = AllocFilled(bytes);
  for (auto _ : state) {
    std::vector<std::thread> ws;
    for (int k = 1; k < threads; ++k) {
      ws.emplace_back([&, k] {
        const size_t b = bytes * k / threads, e = bytes * (k + 1) / threads;
        std::memcpy(dst.get() + b, src.get() + b, e - b);
      });
    }
    std::memcpy(dst.get(), src.get(), bytes / threads);
    for (auto& w : ws) w.join();
    benchmark::DoNotOptimize(dst.get());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * 2 * static_cast<int64_t>(bytes));
}

std::vector<int64_t> Iota(int64_t n, int64_t start) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), start);
  return v;
}

// K of all 32 layers as one dense [layers*heads][tokens][dim] array, rotated in place by `step`
// (called with the iteration's parity so alternate calls undo each other); bytes = K read +
// written.
void RunKeysBench(
    benchmark::State& state,
    const std::function<Status(const RopeSpec&, const RopeTensorView&, int64_t, bool, const RopeOptions&)>& step) {
  const int64_t tokens = state.range(0);
  const DType dtype = static_cast<DType>(state.range(1));
  const RopeOptions options{static_cast<int>(state.range(2))};
  const int64_t heads = int64_t{kLayers} * kKvHeads;
  const size_t bytes = static_cast<size_t>(heads * tokens * kHeadDim) * DTypeSize(dtype);
  Bytes k = AllocFilled(bytes);
  RopeTensorView v = RopeTensorView::Dense(k.get(), dtype, heads, tokens, kHeadDim);
  const RopeSpec spec = Llama31Rope();
  bool flip = false;
  for (auto _ : state) {
    Status st = step(spec, v, tokens, flip, options);
    if (!st.ok()) state.SkipWithError(st.ToString().c_str());
    flip = !flip;
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * 2 * static_cast<int64_t>(bytes));
}

// Post-RoPE keys moved between two placements (one delta for all tokens).
void BM_RepositionKeys(benchmark::State& state) {
  const std::vector<int64_t> a = Iota(state.range(0), 1000), b = Iota(state.range(0), 250000);
  RunKeysBench(state, [&](const RopeSpec& spec, const RopeTensorView& v, int64_t, bool flip, const RopeOptions& o) {
    return flip ? RopeReposition(spec, kHeadDim, v, v, b, a, o) : RopeReposition(spec, kHeadDim, v, v, a, b, o);
  });
}

// Pre-RoPE keys rotated to consecutive new positions (what loading a pre-RoPE segment does):
// every token has its own angle, so the cos/sin table has a row per token. Alternates forward
// and inverse so the values stay bounded.
void BM_ApplyKeys(benchmark::State& state) {
  const std::vector<int64_t> pos = Iota(state.range(0), 250000);
  RunKeysBench(state, [&](const RopeSpec& spec, const RopeTensorView& v, int64_t, bool flip, const RopeOptions& o) {
    return RopeApply(spec, kHeadDim, v, v, pos, flip ? RopeDirection::kInverse : RopeDirection::kForward, o);
  });
}

void BM_RepositionSegment(benchmark::State& state) {
  const int tokens = static_cast<int>(state.range(0));
  const DType dtype = static_cast<DType>(state.range(1));
  const RopeOptions options{static_cast<int>(state.range(2))};
  ModelSpec m = UniformModelSpec("llama-3.1-8b", kLayers, 32, kKvHeads, kHeadDim, dtype, Llama31Rope(), Hash128{});
  SegmentLayout layout = SegmentLayout::ForModel(m, tokens);
  Bytes p = AllocFilled(layout.NumBytes());
  std::span<std::byte> payload(p.get(), layout.NumBytes());
  std::vector<int64_t> a = Iota(tokens, 1000), b = Iota(tokens, 250000);
  bool flip = false;
  for (auto _ : state) {
    Status st = flip ? RepositionSegmentKeys(m, layout, payload, b, a, options)
                     : RepositionSegmentKeys(m, layout, payload, a, b, options);
    if (!st.ok()) state.SkipWithError(st.ToString().c_str());
    flip = !flip;
    benchmark::ClobberMemory();
  }
  // K planes read + written.
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(layout.NumBytes()));
}

// Thread counts: 1, 2 and every core of the machine.
std::vector<int64_t> ThreadCounts() {
  std::vector<int64_t> t = {1, 2};
  const int64_t hw = std::thread::hardware_concurrency();
  if (hw > 2) t.push_back(hw);
  return t;
}

BENCHMARK(BM_Memcpy)->ArgsProduct({{512}, ThreadCounts()})->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(1.0);
BENCHMARK(BM_ApplyKeys)
    ->ArgsProduct({{1024, 4096, 16384}, {0, 2}, ThreadCounts()})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(1.0);
BENCHMARK(BM_RepositionKeys)
    ->ArgsProduct({{1024, 4096, 16384}, {0, 2}, ThreadCounts()})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(1.0);
BENCHMARK(BM_RepositionSegment)
    ->ArgsProduct({{1024, 4096}, {0, 2}, {2}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(1.0);

}  // namespace
}  // namespace kvagent

BENCHMARK_MAIN();
