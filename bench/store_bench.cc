// Store throughput next to this machine's limits, for segment sizes of 64 KiB, 1 MiB, 16 MiB.
//
//   Memcpy/<size>          limit for the host tier: memcpy of a 256 MiB working set in chunks of
//                          <size> (cache-cold, like copying fresh segments into the tier).
//   HostPut/<size>         Store::Put into a host-only store (one copy into tier-owned memory,
//                          LRU eviction at steady state).
//   HostGet/<size>         Store::Get of a resident segment: zero-copy (a handle), so GB/s here
//                          is payload bytes made available per second, not bytes moved.
//   HostGetCopy/<size>     Get plus memcpy of the payload into the caller's buffer.
//   DiskSeqWrite, DiskSeqRead  limit for the disk tier: one 256 MiB file written with pwrite in
//                          1 MiB chunks then fdatasync, and read back with pread after the page
//                          cache was dropped for it (fdatasync, then posix_fadvise DONTNEED).
//   DiskSeqWriteDirect     the same 256 MiB written with O_DIRECT in 16 MiB chunks from distinct
//                          page-aligned memory, then fdatasync: the device without the page
//                          cache (skipped where the file system refuses O_DIRECT). The write
//                          limit is the faster of the two.
//   DiskPut/<size>/<sync>/<direct>  write-behind Puts of 256 MiB of segments into an empty store plus
//                          Flush(); sync=1: the writer syncs each time the queue runs dry (group
//                          commit), sync=0: once in Flush (what DiskSeqWrite does); direct=1: the
//                          disk tier appends with O_DIRECT (the default), 0: buffered write(2).
//   DiskGet/<size>         every segment read once from a reopened store (empty host tier) after
//                          the page cache was dropped for all files in the directory (same
//                          method), so the reads come from the device.
//   DiskPutPaired/<size>, DiskGetPaired/<size>  the same Puts (sync 0, direct I/O) and Gets, each
//                          iteration right after its own limit measurement (write: the faster of
//                          the buffered and the direct sequential write; read: the sequential
//                          read), with counters limit_GBps and ratio = store / limit.
//
// Directory: $KVAGENT_BENCH_DIR or /tmp. Counter GBps = 1e9 bytes per second.
#include <benchmark/benchmark.h>
#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "kvagent/host_tier.h"
#include "kvagent/segment.h"
#include "kvagent/store.h"

namespace kvagent {
namespace {

constexpr size_t kWorkingSet = 256ull << 20;

std::string BenchDir() {
  const char* d = std::getenv("KVAGENT_BENCH_DIR");
  return d != nullptr ? d : "/tmp";
}

void Check(const Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
    std::abort();
  }
}

// A segment of exactly `bytes` payload bytes (bf16, 8 layers x 8 KV heads x 128 dims: 32 KiB
// per token), filled with non-zero data.
std::shared_ptr<Segment> MakeSegment(size_t bytes) {
  auto s = std::make_shared<Segment>();
  s->model = HashString("bench-model");
  const int tokens = static_cast<int>(bytes / (8 * 2 * 8 * 128 * 2));
  s->layout = SegmentLayout{8, 8, 128, tokens, DType::kBF16};
  s->tokens.assign(tokens, 7);
  s->positions.resize(tokens);
  for (int i = 0; i < tokens; ++i) s->positions[i] = i;
  auto buf = Buffer::Allocate(s->layout.NumBytes());
  Check(buf.status(), "allocate");
  s->payload = std::move(buf).value();
  std::memset(s->payload->data(), 0x5a, s->payload->size());
  return s;
}

// `count` distinct segments of `size` payload bytes (keys "bench-<i>", one shared payload buffer);
// by default 256 MiB of them.
std::vector<std::shared_ptr<Segment>> Segments(size_t size, size_t count = 0) {
  auto proto = MakeSegment(size);
  std::vector<std::shared_ptr<Segment>> segs;
  for (size_t i = 0; i < (count != 0 ? count : kWorkingSet / size); ++i) {
    auto s = std::make_shared<Segment>(*proto);
    s->key = HashString("bench-" + std::to_string(i));
    segs.push_back(std::move(s));
  }
  return segs;
}

void SetRate(benchmark::State& state, double bytes) {
  state.SetBytesProcessed(static_cast<int64_t>(bytes));
  state.counters["GBps"] = benchmark::Counter(bytes / 1e9, benchmark::Counter::kIsRate);
}

// ---- host tier and its limit ----

void BM_Memcpy(benchmark::State& state) {
  const size_t size = state.range(0);
  std::vector<std::byte> src(kWorkingSet, std::byte{1}), dst(kWorkingSet, std::byte{2});
  size_t off = 0;
  double bytes = 0;
  for (auto _ : state) {
    std::memcpy(dst.data() + off, src.data() + off, size);
    benchmark::DoNotOptimize(dst.data());
    off = (off + size) % kWorkingSet;
    bytes += size;
  }
  SetRate(state, bytes);
}

void BM_HostPut(benchmark::State& state) {
  const size_t size = state.range(0);
  StoreOptions o;
  o.host_capacity_bytes = kWorkingSet;
  auto store = Store::Open(o);
  Check(store.status(), "open");
  const size_t ring = 2 * kWorkingSet / size;  // twice the capacity: steady-state eviction
  const auto segs = Segments(size, ring);
  size_t i = 0;
  double bytes = 0;
  for (auto _ : state) {
    Check(store.value()->Put(segs[i]), "put");
    i = (i + 1) % ring;
    bytes += size;
  }
  SetRate(state, bytes);
  state.counters["evictions"] = static_cast<double>(store.value()->Stats().host.evictions);
}

void HostGetImpl(benchmark::State& state, bool copy_out) {
  const size_t size = state.range(0);
  StoreOptions o;
  o.host_capacity_bytes = 2 * kWorkingSet;
  auto store = Store::Open(o);
  Check(store.status(), "open");
  const auto segs = Segments(size);
  for (const auto& s : segs) Check(store.value()->Put(s), "put");
  const size_t n = segs.size();
  std::vector<std::byte> dst(copy_out ? size : 0);
  size_t i = 0;
  double bytes = 0;
  for (auto _ : state) {
    auto got = store.value()->Get(segs[i]->key, segs[i]->model);
    Check(got.status(), "get");
    if (copy_out) std::memcpy(dst.data(), got.value()->payload->data(), size);
    benchmark::DoNotOptimize(got.value().get());
    i = (i + 1) % n;
    bytes += size;
  }
  SetRate(state, bytes);
}
void BM_HostGet(benchmark::State& state) { HostGetImpl(state, false); }
void BM_HostGetCopy(benchmark::State& state) { HostGetImpl(state, true); }

// ---- disk tier and its limit ----

void DropCache(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

void DropCacheDir(const std::string& dir) {
  for (const auto& e : std::filesystem::directory_iterator(dir))
    if (e.is_regular_file()) DropCache(e.path().string());
}

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// One 256 MiB sequential write of `path` then fdatasync, buffered (1 MiB pwrites) or O_DIRECT
// (16 MiB pwrites from distinct page-aligned memory); seconds, or a negative value where the
// file system refuses O_DIRECT.
double SeqWriteSeconds(const std::string& path, bool direct) {
  static std::byte* data = [] {
    auto* d = static_cast<std::byte*>(std::aligned_alloc(4096, kWorkingSet));
    if (d == nullptr) std::abort();
    for (size_t i = 0; i < kWorkingSet; ++i) d[i] = static_cast<std::byte>(i * 131 + (i >> 12));
    return d;
  }();
  const size_t chunk = direct ? (16u << 20) : (1u << 20);
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | (direct ? O_DIRECT : 0), 0644);
  if (fd < 0) {
    if (direct) return -1;
    std::abort();
  }
  const auto t0 = std::chrono::steady_clock::now();
  for (size_t off = 0; off < kWorkingSet; off += chunk) {
    const std::byte* src = direct ? data + off : data;  // buffered: the same hot 1 MiB, as dd does
    if (::pwrite(fd, src, chunk, static_cast<off_t>(off)) != static_cast<ssize_t>(chunk)) std::abort();
  }
  ::fdatasync(fd);
  const double t = Seconds(t0);
  ::close(fd);
  return t;
}

// The write limit: the faster of the buffered and the direct sequential write, in GB/s.
double WriteLimitGBps(const std::string& path) {
  const double buffered = SeqWriteSeconds(path, false);
  const double direct = SeqWriteSeconds(path, true);
  ::unlink(path.c_str());
  const double best = direct > 0 ? std::min(buffered, direct) : buffered;
  return static_cast<double>(kWorkingSet) / best / 1e9;
}

// One sequential read of `path` (1 MiB preads) after dropping it from the page cache; seconds.
double SeqReadSeconds(const std::string& path) {
  static std::vector<std::byte> chunk(1 << 20);
  DropCache(path);
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) std::abort();
  const auto t0 = std::chrono::steady_clock::now();
  for (size_t off = 0; off < kWorkingSet; off += chunk.size())
    if (::pread(fd, chunk.data(), chunk.size(), static_cast<off_t>(off)) != static_cast<ssize_t>(chunk.size()))
      std::abort();
  const double t = Seconds(t0);
  ::close(fd);
  return t;
}

void BM_DiskSeqWrite(benchmark::State& state) {
  const std::string path = BenchDir() + "/kvagent-bench-seq";
  for (auto _ : state) state.SetIterationTime(SeqWriteSeconds(path, false));
  SetRate(state, static_cast<double>(kWorkingSet) * state.iterations());
}

void BM_DiskSeqWriteDirect(benchmark::State& state) {
  const std::string path = BenchDir() + "/kvagent-bench-seq-direct";
  for (auto _ : state) {
    const double t = SeqWriteSeconds(path, true);
    if (t < 0) {
      state.SkipWithError("O_DIRECT not supported here");
      break;
    }
    state.SetIterationTime(t);
  }
  ::unlink(path.c_str());
  SetRate(state, static_cast<double>(kWorkingSet) * state.iterations());
}

void BM_DiskSeqRead(benchmark::State& state) {
  const std::string path = BenchDir() + "/kvagent-bench-seq";  // left by BM_DiskSeqWrite, else written here
  if (!std::filesystem::exists(path)) SeqWriteSeconds(path, false);  // e.g. a second repetition
  for (auto _ : state) state.SetIterationTime(SeqReadSeconds(path));
  SetRate(state, static_cast<double>(kWorkingSet) * state.iterations());
  ::unlink(path.c_str());
}

std::string FreshStoreDir(const char* tag, size_t size) {
  std::string dir = BenchDir() + "/kvagent-bench-" + tag + "-" + std::to_string(size);
  std::filesystem::remove_all(dir);
  return dir;
}

StoreOptions DiskStoreOptions(const std::string& dir, bool sync, bool direct) {
  StoreOptions o;
  o.path = dir;
  o.sync = sync;
  o.disk_direct_io = direct;
  o.host_capacity_bytes = 64ull << 20;
  return o;
}

// Write-behind Puts of `segs` into an empty store plus Flush; seconds.
double PutSeconds(const std::vector<std::shared_ptr<Segment>>& segs, size_t size, bool sync, bool direct) {
  const std::string dir = FreshStoreDir("put", size);
  auto store = Store::Open(DiskStoreOptions(dir, sync, direct));
  Check(store.status(), "open");
  const auto t0 = std::chrono::steady_clock::now();
  for (const auto& s : segs) Check(store.value()->Put(s), "put");
  Check(store.value()->Flush(), "flush");
  const double t = Seconds(t0);
  Check(store.value()->Close(), "close");
  std::filesystem::remove_all(dir);
  return t;
}

// A store directory holding `segs` (written once, synced, closed).
std::string WrittenStore(const std::vector<std::shared_ptr<Segment>>& segs, size_t size) {
  const std::string dir = FreshStoreDir("get", size);
  auto store = Store::Open(DiskStoreOptions(dir, false, true));
  Check(store.status(), "open");
  for (const auto& s : segs) Check(store.value()->Put(s), "put");
  Check(store.value()->Close(), "close");
  return dir;
}

// Every segment read once from a reopened store (empty host tier) after the page cache was
// dropped for its files; seconds.
double GetSeconds(const std::string& dir, const std::vector<std::shared_ptr<Segment>>& segs) {
  DropCacheDir(dir);
  auto store = Store::Open(DiskStoreOptions(dir, false, true));
  Check(store.status(), "open");
  const auto t0 = std::chrono::steady_clock::now();
  for (const auto& s : segs) {
    auto got = store.value()->Get(s->key, s->model);
    Check(got.status(), "get");
    benchmark::DoNotOptimize(got.value().get());
  }
  const double t = Seconds(t0);
  Check(store.value()->Close(), "close");
  return t;
}

void BM_DiskPut(benchmark::State& state) {
  const size_t size = state.range(0);
  const auto segs = Segments(size);
  for (auto _ : state) state.SetIterationTime(PutSeconds(segs, size, state.range(1) != 0, state.range(2) != 0));
  SetRate(state, static_cast<double>(segs.size() * size) * state.iterations());
}

void BM_DiskGet(benchmark::State& state) {
  const size_t size = state.range(0);
  const auto segs = Segments(size);
  const std::string dir = WrittenStore(segs, size);
  for (auto _ : state) state.SetIterationTime(GetSeconds(dir, segs));
  SetRate(state, static_cast<double>(segs.size() * size) * state.iterations());
  std::filesystem::remove_all(dir);
}

// Paired: each iteration measures the limit right before the store does the same amount of
// work, so both see the same device state (this VM's disk moves by 2x within minutes). Counters:
// GBps (the store), limit_GBps and ratio = store / limit, both averaged over the iterations.
void SetPaired(benchmark::State& state, double bytes, double limit_sum, double ratio_sum) {
  SetRate(state, bytes);
  const double n = static_cast<double>(state.iterations());
  state.counters["limit_GBps"] = limit_sum / n;
  state.counters["ratio"] = ratio_sum / n;
}

void BM_DiskPutPaired(benchmark::State& state) {
  const size_t size = state.range(0);
  const auto segs = Segments(size);
  const std::string seq = BenchDir() + "/kvagent-bench-seq-paired";
  double limit_sum = 0, ratio_sum = 0;
  for (auto _ : state) {
    const double limit = WriteLimitGBps(seq);
    const double t = PutSeconds(segs, size, false, true);
    state.SetIterationTime(t);
    limit_sum += limit;
    ratio_sum += static_cast<double>(kWorkingSet) / t / 1e9 / limit;
  }
  SetPaired(state, static_cast<double>(segs.size() * size) * state.iterations(), limit_sum, ratio_sum);
}

void BM_DiskGetPaired(benchmark::State& state) {
  const size_t size = state.range(0);
  const auto segs = Segments(size);
  // The limit's file is written just before the store's, so neither is fresher in a cache
  // below this machine (the VM host's) than the other.
  const std::string seq = BenchDir() + "/kvagent-bench-seq-paired";
  SeqWriteSeconds(seq, false);
  const std::string dir = WrittenStore(segs, size);
  double limit_sum = 0, ratio_sum = 0;
  for (auto _ : state) {
    const double limit = static_cast<double>(kWorkingSet) / SeqReadSeconds(seq) / 1e9;
    const double t = GetSeconds(dir, segs);
    state.SetIterationTime(t);
    limit_sum += limit;
    ratio_sum += static_cast<double>(kWorkingSet) / t / 1e9 / limit;
  }
  SetPaired(state, static_cast<double>(segs.size() * size) * state.iterations(), limit_sum, ratio_sum);
  ::unlink(seq.c_str());
  std::filesystem::remove_all(dir);
}

#define KV_SIZES Arg(64 << 10)->Arg(1 << 20)->Arg(16 << 20)
BENCHMARK(BM_Memcpy)->KV_SIZES->MinTime(0.5);
BENCHMARK(BM_HostPut)->KV_SIZES->MinTime(0.5);
BENCHMARK(BM_HostGet)->KV_SIZES->MinTime(0.5);
BENCHMARK(BM_HostGetCopy)->KV_SIZES->MinTime(0.5);
BENCHMARK(BM_DiskSeqWrite)->UseManualTime()->Iterations(3)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DiskSeqWriteDirect)->UseManualTime()->Iterations(3)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DiskSeqRead)->UseManualTime()->Iterations(3)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DiskPut)
    ->ArgsProduct({{64 << 10, 1 << 20, 16 << 20}, {0, 1}, {1, 0}})
    ->UseManualTime()
    ->Iterations(2)
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DiskGet)->KV_SIZES->UseManualTime()->Iterations(3)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DiskPutPaired)->KV_SIZES->UseManualTime()->Iterations(3)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DiskGetPaired)->KV_SIZES->UseManualTime()->Iterations(3)->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace kvagent

BENCHMARK_MAIN();
