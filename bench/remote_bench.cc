// Remote (Redis) tier throughput and latency: synchronous RemoteTier::Put (one MULTI/EXEC of the
// segment's chunks and metadata) and Get (metadata, then the chunks pipelined, verified, copied
// into one buffer) at 64 KiB / 1 MiB / 16 MiB payloads, against a running server:
//   KVAGENT_REDIS_URL=redis://127.0.0.1:6390 build/bench/remote_bench
// Compare with `redis-benchmark -p 6390 -c 1 -t set,get -d <bytes>` on the same server
// (docs/benchmarks.md, "Remote tier"). Reports bytes/s and p50/p99 per operation.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <vector>

#include "kvagent/remote_tier.h"

namespace kvagent {
namespace {

std::unique_ptr<RemoteTier> OpenTier() {
  RemoteOptions o;
  const char* url = std::getenv("KVAGENT_REDIS_URL");
  o.url = url ? url : "redis://127.0.0.1:6379";
  o.ns = "bench";
  o.command_timeout_ms = 10000;
  StatusOr<std::unique_ptr<RemoteTier>> t = RemoteTier::Open(o);
  if (!t.ok()) return nullptr;
  return std::move(t).value();
}

void Percentiles(benchmark::State& state, std::vector<double>& us) {
  if (us.empty()) return;
  std::sort(us.begin(), us.end());
  state.counters["p50_us"] = us[us.size() / 2];
  state.counters["p99_us"] = us[std::min(us.size() - 1, us.size() * 99 / 100)];
}

std::shared_ptr<Segment> BenchSegment(size_t bytes) {
  // 8 layers x 8 heads x 128 dims x f16: 32 KiB per token.
  auto s = std::make_shared<Segment>();
  s->layout = SegmentLayout{8, 8, 128, static_cast<int>(bytes / (8 * 2 * 8 * 128 * 2)), DType::kF16};
  s->key = HashString("remote-bench-" + std::to_string(bytes));
  s->model = HashString("remote-bench-model");
  for (int t = 0; t < s->layout.num_tokens; ++t) {
    s->tokens.push_back(t);
    s->positions.push_back(t);
  }
  s->payload = Buffer::Allocate(s->layout.NumBytes()).value();
  for (size_t i = 0; i < s->PayloadBytes(); ++i) s->payload->data()[i] = static_cast<std::byte>(i * 131 + 7);
  return s;
}

void BM_RemotePut(benchmark::State& state) {
  auto tier = OpenTier();
  if (!tier) return state.SkipWithError("cannot open the remote tier (set KVAGENT_REDIS_URL)");
  auto seg = BenchSegment(static_cast<size_t>(state.range(0)));
  std::vector<double> us;
  for (auto _ : state) {
    auto t0 = std::chrono::steady_clock::now();
    Status s = tier->Put(*seg);
    us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
    if (!s.ok()) return state.SkipWithError(s.ToString().c_str());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(seg->PayloadBytes()));
  Percentiles(state, us);
}

void BM_RemoteGet(benchmark::State& state) {
  auto tier = OpenTier();
  if (!tier) return state.SkipWithError("cannot open the remote tier (set KVAGENT_REDIS_URL)");
  auto seg = BenchSegment(static_cast<size_t>(state.range(0)));
  if (!tier->Put(*seg).ok()) return state.SkipWithError("put failed");
  std::vector<double> us;
  for (auto _ : state) {
    auto t0 = std::chrono::steady_clock::now();
    StatusOr<SegmentHandle> h = tier->Get(seg->key, seg->model, nullptr);
    us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
    if (!h.ok()) return state.SkipWithError(h.status().ToString().c_str());
    benchmark::DoNotOptimize(h);
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(seg->PayloadBytes()));
  Percentiles(state, us);
}

BENCHMARK(BM_RemotePut)->Arg(64 << 10)->Arg(1 << 20)->Arg(16 << 20)->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_RemoteGet)->Arg(64 << 10)->Arg(1 << 20)->Arg(16 << 20)->UseRealTime()->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace kvagent

BENCHMARK_MAIN();
