// LatentIndex scoring latency and throughput for a Llama-3.1-8B-shaped index (32 layers, 32
// query heads, 8 KV heads, head_dim 128) with a 30-token query, next to the measured memory
// read bandwidth of this machine (the scoring sweep is a streaming read of the summary matrix).
//
// Two groups:
//   - brute force over random summaries (the exact sweep; the prefilter is off), configs named
//     by size, layers, score kind and storage;
//   - "TwoStage/...": the default options (mean keys, every token votes, softmax, max) on planted,
//     topic-clustered summaries (tests/cpp/index/planted_index_data.h), each size timed as brute
//     force (SearchRequest::exact) and as the two-stage search, with the two-stage recall@10
//     against brute force on the same index and query (random summaries have no meaningful
//     top-k to recall).
//
// Sizes are chosen so the matrix fits a shared 24 GiB machine: the row bytes per segment are
// printed and configs whose matrix (plus the brute-force vote scratch) would not fit in 70% of
// MemAvailable, or over ~4.5 GiB for the random group, are not run.
#include <benchmark/benchmark.h>
#include <sched.h>
#include <sys/resource.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "index/planted_index_data.h"
#include "kvagent/index.h"

namespace kvagent {
namespace {

constexpr int kLayers = 32, kQHeads = 32, kKvHeads = 8, kDim = 128, kQTokens = 30;

ModelSpec LlamaSpec() {
  RopeSpec rope;
  rope.theta = 500000;
  return UniformModelSpec("llama-3.1-8b-shape", kLayers, kQHeads, kKvHeads, kDim, DType::kBF16, rope,
                          HashString("bench"));
}

struct Config {
  const char* name;
  int segments;
  int num_layers;  // 32 = all, else DefaultIndexLayers(32, n)
  ScoreKind score = ScoreKind::kBoundingBox;
  int token_chunks = 4;
  HeadReduce head_reduce = HeadReduce::kMeanQuery;
  DType storage = DType::kF16;
  TokenNorm norm = TokenNorm::kSoftmax;
};

// One index alive at a time (benchmarks run in registration order).
struct Current {
  std::string name;
  std::unique_ptr<LatentIndex> index;
} g_cur;

// A pool of distinct random summaries, reused under different keys (building 1M distinct ones
// would dominate the run; the scoring sweep reads every row either way).
const std::vector<KeySummary>& Pool() {
  static const std::vector<KeySummary> pool = [] {
    std::vector<KeySummary> p;
    std::mt19937 rng(7);
    std::normal_distribution<float> n;
    const int T = 16;
    std::vector<float> k(static_cast<size_t>(kLayers) * kKvHeads * T * kDim);
    for (int i = 0; i < 64; ++i) {
      for (auto& v : k) v = n(rng) + (i % 8) * 0.1f;
      p.push_back(KeySummary::FromKeys(k.data(), DType::kF32, kLayers, kKvHeads, T, kDim).value());
    }
    return p;
  }();
  return pool;
}

double ProcessCpuSeconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + 1e-6 * (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

// Segment i of a benchmark index: one session, 100 tokens.
IndexEntry EntryAt(int i) {
  IndexEntry e;
  e.key = Hash128{static_cast<uint64_t>(i) + 1, 0x5eed};
  e.session = "s";
  e.turn = i;
  e.time_us = i;
  e.num_tokens = 100;
  return e;
}

LatentIndex* Build(const Config& c, benchmark::State& state) {
  if (g_cur.name == c.name) return g_cur.index.get();
  g_cur.index.reset();
  IndexOptions o;
  o.layers = DefaultIndexLayers(kLayers, c.num_layers);
  o.score = c.score;
  o.token_chunks = c.token_chunks;
  o.head_reduce = c.head_reduce;
  o.storage = c.storage;
  o.norm = c.norm;
  o.prefilter_min_segments = 0;  // this group measures the exact sweep
  auto idx = LatentIndex::Create(LlamaSpec(), o).value();
  const size_t bytes = static_cast<size_t>(c.segments) * idx->RowBytes();
  if (bytes > (size_t{9} << 29)) {
    state.SkipWithError("matrix over 4.5 GiB: not run on the shared machine");
    return nullptr;
  }
  const auto& pool = Pool();
  for (int i = 0; i < c.segments; ++i) {
    if (!idx->Add(EntryAt(i), pool[i % pool.size()]).ok()) std::abort();
  }
  g_cur.name = c.name;
  g_cur.index = std::move(idx);
  return g_cur.index.get();
}

void BM_Search(benchmark::State& state, Config c) {
  LatentIndex* idx = Build(c, state);
  if (idx == nullptr) return;
  std::mt19937 rng(9);
  std::normal_distribution<float> n;
  std::vector<uint16_t> q(static_cast<size_t>(idx->layers().size()) * kQHeads * kQTokens * kDim);
  for (auto& v : q) v = F32ToBF16(n(rng));
  QueryView view{q.data(), DType::kBF16, static_cast<int>(idx->layers().size()), kQHeads, kQTokens, kDim};
  SearchRequest req;
  req.top_k = 8;
  const double cpu0 = ProcessCpuSeconds();
  for (auto _ : state) {
    auto hits = idx->Search(view, req);
    if (!hits.ok()) std::abort();
    benchmark::DoNotOptimize(hits->data());
  }
  // CPU seconds of all threads per search: on a machine shared with other jobs the wall time
  // includes waiting for a core; this is the work itself (still inflated by shared caches/DRAM).
  state.counters["cpu_ms_all_threads"] = (ProcessCpuSeconds() - cpu0) * 1e3 / state.iterations();
  const double segs = static_cast<double>(c.segments) * state.iterations();
  state.counters["segments_per_s"] = benchmark::Counter(segs, benchmark::Counter::kIsRate);
  state.counters["matrix_GBps"] = benchmark::Counter(segs * idx->RowBytes() / 1e9, benchmark::Counter::kIsRate);
  state.counters["row_bytes"] = static_cast<double>(idx->RowBytes());
  state.counters["f16_summary_bytes"] = static_cast<double>(Pool()[0].Serialize(DType::kF16).size());
  state.counters["f32_summary_bytes"] = static_cast<double>(Pool()[0].Serialize(DType::kF32).size());
}

// ---- two-stage search on planted data ----

struct TwoStageConfig {
  const char* name;  // shared by the brute-force and two-stage entries of one index
  int segments;
  int num_layers;  // index layers: DefaultIndexLayers(32, n)
};

struct TwoStageIndex {
  std::string name;
  std::unique_ptr<testing_index::PlantedData> data;
  std::unique_ptr<LatentIndex> index;
  double recall = -1;   // two-stage recall@10 against brute force (-1: not measured)
  double planted = -1;  // planted targets in the brute-force top 10 also found by the two-stage search
  std::string note;
} g_two;

size_t MemAvailableBytes() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  size_t kb = 0;
  while (f >> key >> kb) {
    if (key == "MemAvailable:") return kb << 10;
    f.ignore(256, '\n');
  }
  return 0;
}

TwoStageIndex* BuildTwoStage(const TwoStageConfig& c, benchmark::State& state) {
  if (g_two.name == c.name) return &g_two;
  g_two = TwoStageIndex{};
  g_cur.index.reset();
  g_cur.name.clear();
  IndexOptions o;  // defaults, prefilter included
  o.layers = DefaultIndexLayers(kLayers, c.num_layers);
  auto idx = LatentIndex::Create(LlamaSpec(), o).value();
  const size_t votes = static_cast<size_t>(c.segments) * o.layers.size() * kKvHeads * kQTokens;
  const size_t need = static_cast<size_t>(c.segments) * (idx->RowBytes() + idx->PrefilterRowBytes());
  if (need + 4 * std::min(votes, size_t{1} << 30) > MemAvailableBytes() / 10 * 7) {
    state.SkipWithError(("needs " + std::to_string(need >> 20) + " MiB of rows (+ " + std::to_string(votes * 4 >> 20) +
                         " MiB brute-force votes); not run on this machine")
                            .c_str());
    return nullptr;
  }
  testing_index::PlantedSpec ps;
  ps.num_layers = static_cast<int>(o.layers.size());
  ps.model_layers = o.layers;
  ps.q_heads = kQHeads;
  ps.kv_heads = kKvHeads;
  ps.head_dim = kDim;
  ps.query_tokens = kQTokens;
  auto data = std::make_unique<testing_index::PlantedData>(ps, c.segments);
  for (int i = 0; i < c.segments; ++i) {
    if (!idx->Add(EntryAt(i), data->Summary(i)).ok()) std::abort();
  }
  g_two.name = c.name;
  g_two.data = std::move(data);
  g_two.index = std::move(idx);
  SearchRequest r;
  r.top_k = 10;
  SearchRequest exact = r;
  exact.exact = true;
  auto want = g_two.index->Search(g_two.data->View(), exact);
  auto got = g_two.index->Search(g_two.data->View(), r);
  if (!got.ok()) std::abort();
  if (want.ok()) {
    g_two.recall = testing_index::Recall(*got, *want);
    int in_bf = 0, both = 0;
    for (size_t t : g_two.data->targets()) {
      bool a = false, b = false;
      for (const Hit& h : *want) a |= h.entry.turn == static_cast<int64_t>(t);
      for (const Hit& h : *got) b |= h.entry.turn == static_cast<int64_t>(t);
      in_bf += a;
      both += a && b;
    }
    g_two.planted = in_bf ? static_cast<double>(both) / in_bf : -1;
  } else {
    g_two.note = want.status().ToString();
  }
  return &g_two;
}

void BM_TwoStage(benchmark::State& state, TwoStageConfig c, bool exact) {
  TwoStageIndex* t = BuildTwoStage(c, state);
  if (t == nullptr) return;
  SearchRequest req;
  req.top_k = 10;
  req.exact = exact;
  if (exact && !t->note.empty()) {
    state.SkipWithError(("brute force: " + t->note).c_str());
    return;
  }
  const double cpu0 = ProcessCpuSeconds();
  for (auto _ : state) {
    auto hits = t->index->Search(t->data->View(), req);
    if (!hits.ok()) std::abort();
    benchmark::DoNotOptimize(hits->data());
  }
  state.counters["cpu_ms_all_threads"] = (ProcessCpuSeconds() - cpu0) * 1e3 / state.iterations();
  state.counters["segments_per_s"] =
      benchmark::Counter(static_cast<double>(c.segments) * state.iterations(), benchmark::Counter::kIsRate);
  // 1 when the search has more candidates than prefilter_min_segments (else it is brute force).
  state.counters["stage1"] = c.segments > t->index->options().prefilter_min_segments && !exact;
  state.counters["row_bytes"] = static_cast<double>(t->index->RowBytes());
  state.counters["prefilter_row_bytes"] = static_cast<double>(t->index->PrefilterRowBytes());
  state.counters["f16_summary_bytes"] = static_cast<double>(t->data->Summary(0).Serialize(DType::kF16).size());
  if (!exact && t->recall >= 0) {
    state.counters["recall_at_10"] = t->recall;
    state.counters["planted_recall"] = t->planted;
  }
}

// Hardware limit: streaming read of 2 GiB with all hardware threads (sum of floats).
void BM_MemoryReadBandwidth(benchmark::State& state) {
  g_cur.index.reset();
  g_cur.name.clear();
  const size_t n = (size_t{2} << 30) / sizeof(float);
  std::vector<float> buf(n, 1.0f);
  cpu_set_t set;
  CPU_ZERO(&set);
  const int threads = sched_getaffinity(0, sizeof(set), &set) == 0 ? std::max(1, CPU_COUNT(&set)) : 1;
  for (auto _ : state) {
    std::vector<double> part(threads);
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        const float* p = buf.data() + n * t / threads;
        const size_t m = n * (t + 1) / threads - n * t / threads;
        float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
        for (size_t i = 0; i + 4 <= m; i += 4) {
          a0 += p[i];
          a1 += p[i + 1];
          a2 += p[i + 2];
          a3 += p[i + 3];
        }
        part[t] = a0 + a1 + a2 + a3;
      });
    }
    for (auto& th : pool) th.join();
    benchmark::DoNotOptimize(part.data());
  }
  state.counters["GBps"] = benchmark::Counter(static_cast<double>(n * sizeof(float)) * state.iterations() / 1e9,
                                              benchmark::Counter::kIsRate);
}

void Register() {
  benchmark::RegisterBenchmark("MemoryReadBandwidth", BM_MemoryReadBandwidth)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime()
      ->Iterations(5);
  const Config configs[] = {
      {"1k/32L/bbox/f16", 1000, 32},
      {"1k/8L/bbox/f16", 1000, 8},
      {"1k/8L/bbox/f16/tokens30", 1000, 8, ScoreKind::kBoundingBox, 0},
      {"1k/8L/bbox/f16/per_head_max", 1000, 8, ScoreKind::kBoundingBox, 4, HeadReduce::kMaxScore},
      {"10k/32L/bbox/f16", 10000, 32},
      {"10k/32L/mean/f16", 10000, 32, ScoreKind::kMeanKey},
      {"100k/8L/bbox/f16", 100000, 8},
      {"100k/8L/bbox/f16/tokens30", 100000, 8, ScoreKind::kBoundingBox, 0},
      {"100k/8L/bbox/f16/zscore", 100000, 8, ScoreKind::kBoundingBox, 4, HeadReduce::kMeanQuery, DType::kF16,
       TokenNorm::kZScore},
      {"100k/8L/mean/f16", 100000, 8, ScoreKind::kMeanKey},
      {"100k/4L/bbox/f16", 100000, 4},
      {"100k/8L/bbox/f32", 100000, 8, ScoreKind::kBoundingBox, 4, HeadReduce::kMeanQuery, DType::kF32},
      {"100k/32L/bbox/f16", 100000, 32},
      {"1M/1L/bbox/f16", 1000000, 1},
      {"1M/2L/mean/f16", 1000000, 2, ScoreKind::kMeanKey},
      {"1M/8L/bbox/f16", 1000000, 8},
  };
  for (const Config& c : configs) {
    auto* b = benchmark::RegisterBenchmark(c.name, BM_Search, c)->Unit(benchmark::kMillisecond)->UseRealTime();
    if (c.segments >= 100000) b->Iterations(c.segments >= 1000000 ? 2 : 3);
  }
  const TwoStageConfig two_stage[] = {
      {"1k/8L", 1000, 8},    {"1k/32L", 1000, 32},  {"10k/32L", 10000, 32}, {"100k/8L", 100000, 8},
      {"1M/8L", 1000000, 8}, {"1M/2L", 1000000, 2},  // fits 24 GiB: 2 index layers (then stage 1 reads both)
  };
  for (const TwoStageConfig& c : two_stage) {
    for (bool exact : {true, false}) {
      const std::string name = std::string("TwoStage/") + c.name + "/mean/f16/" + (exact ? "brute" : "two_stage");
      auto* b = benchmark::RegisterBenchmark(name.c_str(), BM_TwoStage, c, exact)
                    ->Unit(benchmark::kMillisecond)
                    ->UseRealTime();
      if (c.segments >= 100000) b->Iterations(exact ? 2 : 10);
    }
  }
}

}  // namespace
}  // namespace kvagent

int main(int argc, char** argv) {
  kvagent::Register();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
