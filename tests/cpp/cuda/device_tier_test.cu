// DeviceTier and TransferEngine on a GPU: contents survive, LRU eviction copies to host,
// entries in use are never evicted or reused, frees wait for recorded stream work, concurrent
// threads and streams, batched transfers with events.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "kvagent/device_tier.h"

namespace kvagent::cuda {
namespace {

#define CUDA_OK(expr)                                                      \
  do {                                                                     \
    cudaError_t e_ = (expr);                                               \
    ASSERT_EQ(e_, cudaSuccess) << #expr << ": " << cudaGetErrorString(e_); \
  } while (0)

Hash128 Key(uint64_t i) { return Hash128{i * 0x9E3779B97F4A7C15ULL + 1, i + 7}; }

__global__ void FillKernel(uint32_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += static_cast<size_t>(gridDim.x) * blockDim.x)
    p[i] = seed * 2654435761u + static_cast<uint32_t>(i);
}

// Sleeps ~`ns` nanoseconds, then counts the words that differ from the fill pattern.
__global__ void DelayedCheckKernel(const uint32_t* p, size_t n, uint32_t seed, uint64_t ns, unsigned* bad) {
  if (threadIdx.x == 0) {
    uint64_t start;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    uint64_t now = start;
    while (now - start < ns) {
      __nanosleep(100000);
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    }
  }
  __syncthreads();
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += static_cast<size_t>(gridDim.x) * blockDim.x)
    if (p[i] != seed * 2654435761u + static_cast<uint32_t>(i)) atomicAdd(bad, 1u);
}

bool HostMatches(const std::vector<uint32_t>& v, uint32_t seed) {
  for (size_t i = 0; i < v.size(); ++i)
    if (v[i] != seed * 2654435761u + static_cast<uint32_t>(i)) return false;
  return true;
}

class DeviceTierTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!DeviceAvailable()) GTEST_FAIL() << "gpu test needs a CUDA device: " << CheckDevice().ToString();
  }
};

TEST_F(DeviceTierTest, AllocateLookupEraseKeepContents) {
  DeviceTierOptions o;
  o.capacity_bytes = 8 << 20;
  o.arena_bytes = 2 << 20;
  auto tier = DeviceTier::Open(o);
  ASSERT_TRUE(tier.ok()) << tier.status().ToString();
  DeviceTier& t = *tier.value();
  const size_t sizes[] = {4, 1000, 4096, 65536, 1 << 20, 3 * (1 << 20)};  // last exceeds an arena
  for (size_t i = 0; i < std::size(sizes); ++i) {
    auto h = t.Allocate(Key(i), sizes[i]);
    ASSERT_TRUE(h.ok()) << h.status().ToString();
    EXPECT_EQ(h->size(), sizes[i]);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(h->data()) % 256, 0u);
    FillKernel<<<64, 256>>>(static_cast<uint32_t*>(h->data()), sizes[i] / 4, static_cast<uint32_t>(i));
    CUDA_OK(cudaGetLastError());
  }
  CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(t.Allocate(Key(0), 16).status().code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(t.Allocate(Key(99), 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(t.Allocate(Key(99), (8 << 20) + 1).status().code(), StatusCode::kResourceExhausted);
  for (size_t i = 0; i < std::size(sizes); ++i) {
    auto h = t.Lookup(Key(i));
    ASSERT_TRUE(h.ok());
    std::vector<uint32_t> v(sizes[i] / 4);
    CUDA_OK(cudaMemcpy(v.data(), h->data(), v.size() * 4, cudaMemcpyDeviceToHost));
    EXPECT_TRUE(HostMatches(v, static_cast<uint32_t>(i))) << i;
  }
  EXPECT_TRUE(t.Erase(Key(2)).ok());
  EXPECT_EQ(t.Erase(Key(2)).code(), StatusCode::kNotFound);
  EXPECT_EQ(t.Lookup(Key(2)).status().code(), StatusCode::kNotFound);
  EXPECT_FALSE(t.Contains(Key(2)));
  auto st = t.GetStats();
  EXPECT_EQ(st.entries, std::size(sizes) - 1);
  EXPECT_LE(st.reserved_bytes, o.capacity_bytes);
  EXPECT_LE(st.allocated_bytes, st.reserved_bytes);
}

TEST_F(DeviceTierTest, EvictsLeastRecentlyUsedToHostAndSkipsEntriesInUse) {
  std::mutex mu;
  std::map<uint64_t, std::vector<uint32_t>> host;  // evicted copies, keyed by Key(i).hi - 7
  std::vector<cudaStream_t> seen_streams;
  DeviceTierOptions o;
  o.capacity_bytes = 4 << 20;
  o.arena_bytes = 1 << 20;
  o.on_evict = [&](const Hash128& key, const void* ptr, size_t bytes, Stream stream) -> Status {
    std::lock_guard<std::mutex> l(mu);
    auto& v = host[key.hi - 7];
    v.resize(bytes / 4);
    if (cudaMemcpyAsync(v.data(), ptr, bytes, cudaMemcpyDeviceToHost, stream) != cudaSuccess)
      return InternalError("copy");
    seen_streams.push_back(stream);
    return Status::Ok();
  };
  auto tier = DeviceTier::Open(o);
  ASSERT_TRUE(tier.ok());
  DeviceTier& t = *tier.value();
  const size_t kBytes = 512 << 10;  // 8 fit
  // Entry 0 stays referenced for the whole test.
  auto pinned = t.Allocate(Key(0), kBytes);
  ASSERT_TRUE(pinned.ok());
  FillKernel<<<64, 256>>>(static_cast<uint32_t*>(pinned->data()), kBytes / 4, 0);
  for (uint64_t i = 1; i < 40; ++i) {
    auto h = t.Allocate(Key(i), kBytes);
    ASSERT_TRUE(h.ok()) << i << ": " << h.status().ToString();
    FillKernel<<<64, 256>>>(static_cast<uint32_t*>(h->data()), kBytes / 4, static_cast<uint32_t>(i));
    CUDA_OK(cudaGetLastError());
    CUDA_OK(cudaDeviceSynchronize());                // the fill is not recorded as a use: finish it first
    if (i == 5) ASSERT_TRUE(t.Lookup(Key(1)).ok());  // touch: key 1 becomes most recent
  }
  {
    std::lock_guard<std::mutex> l(mu);
    for (cudaStream_t s : seen_streams) CUDA_OK(cudaStreamSynchronize(s));
  }
  EXPECT_TRUE(t.Contains(Key(0))) << "an entry with a live handle was evicted";
  EXPECT_EQ(host.count(0), 0u);
  EXPECT_EQ(host.count(2), 1u) << "least recently used entry 2 should be the first victim";
  EXPECT_EQ(host.count(1) ? 1 : 0, t.Contains(Key(1)) ? 0 : 1);
  for (auto& [i, v] : host) EXPECT_TRUE(HostMatches(v, static_cast<uint32_t>(i))) << "evicted copy of " << i;
  std::vector<uint32_t> v(kBytes / 4);
  CUDA_OK(cudaMemcpy(v.data(), pinned->data(), kBytes, cudaMemcpyDeviceToHost));
  EXPECT_TRUE(HostMatches(v, 0)) << "memory under a live handle was reused";
  auto st = t.GetStats();
  EXPECT_GE(st.evictions, 30u);
  EXPECT_EQ(st.pinned_entries, 1u);
  EXPECT_LE(st.reserved_bytes, o.capacity_bytes);

  // Every entry referenced: no room, no victim.
  std::vector<DeviceHandle> hold;
  for (uint64_t i = 100; i < 200; ++i) {
    auto h = t.Allocate(Key(i), kBytes);
    if (!h.ok()) {
      EXPECT_EQ(h.status().code(), StatusCode::kResourceExhausted);
      break;
    }
    hold.push_back(h.value());
  }
  EXPECT_LT(hold.size(), 8u);
  EXPECT_TRUE(t.Contains(Key(0)));
}

TEST_F(DeviceTierTest, ErasedMemoryIsNotReusedBeforeRecordedWorkCompletes) {
  DeviceTierOptions o;
  o.capacity_bytes = 1 << 20;  // room for exactly one entry: a new one must reuse the block
  o.arena_bytes = 1 << 20;
  auto tier = DeviceTier::Open(o);
  ASSERT_TRUE(tier.ok());
  DeviceTier& t = *tier.value();
  cudaStream_t s1, s2;
  CUDA_OK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
  CUDA_OK(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking));
  unsigned* bad;
  CUDA_OK(cudaMalloc(&bad, sizeof(unsigned)));
  CUDA_OK(cudaMemset(bad, 0, sizeof(unsigned)));
  CUDA_OK(cudaDeviceSynchronize());  // s1 is non-blocking: finish the memset first
  const size_t n = (1 << 20) / 4;
  {
    auto a = t.Allocate(Key(1), n * 4);
    ASSERT_TRUE(a.ok());
    FillKernel<<<64, 256, 0, s1>>>(static_cast<uint32_t*>(a->data()), n, 11);
    // Reads the bytes 200 ms later on s1.
    DelayedCheckKernel<<<64, 256, 0, s1>>>(static_cast<const uint32_t*>(a->data()), n, 11, 200'000'000ull, bad);
    CUDA_OK(cudaGetLastError());
    ASSERT_TRUE(a->RecordUse(s1).ok());
    ASSERT_TRUE(t.Erase(Key(1)).ok());
  }                                    // last handle dropped while s1 still uses the memory
  auto b = t.Allocate(Key(2), n * 4);  // must wait for s1's event before reusing the block
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  CUDA_OK(cudaMemsetAsync(b->data(), 0x5A, n * 4, s2));
  CUDA_OK(cudaDeviceSynchronize());
  unsigned host_bad = 1;
  CUDA_OK(cudaMemcpy(&host_bad, bad, sizeof(unsigned), cudaMemcpyDeviceToHost));
  EXPECT_EQ(host_bad, 0u) << "memory was reused while a recorded stream still read it";
  CUDA_OK(cudaFree(bad));
  CUDA_OK(cudaStreamDestroy(s1));
  CUDA_OK(cudaStreamDestroy(s2));
}

TEST_F(DeviceTierTest, ConcurrentThreadsAndStreams) {
  DeviceTierOptions o;
  o.capacity_bytes = 6 << 20;
  o.arena_bytes = 2 << 20;
  std::atomic<int> evicted{0};
  o.on_evict = [&](const Hash128&, const void*, size_t, Stream) -> Status {
    evicted.fetch_add(1);
    return Status::Ok();
  };
  auto tier = DeviceTier::Open(o);
  ASSERT_TRUE(tier.ok());
  DeviceTier& t = *tier.value();
  constexpr int kThreads = 4, kIters = 150;
  std::atomic<int> errors{0}, mismatches{0}, exhausted{0};
  std::vector<std::thread> threads;
  for (int th = 0; th < kThreads; ++th) {
    threads.emplace_back([&, th] {
      cudaStream_t s;
      if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) != cudaSuccess) {
        errors++;
        return;
      }
      std::mt19937 rng(th);
      std::vector<uint32_t> v;
      for (int it = 0; it < kIters; ++it) {
        const uint64_t id = static_cast<uint64_t>(th) * 100000 + it;
        const size_t bytes = (1 + rng() % 64) * 4096;
        auto h = t.Allocate(Key(id), bytes);
        if (!h.ok()) {
          if (h.status().code() == StatusCode::kResourceExhausted)
            exhausted++;
          else
            errors++;
          continue;
        }
        FillKernel<<<32, 256, 0, s>>>(static_cast<uint32_t*>(h->data()), bytes / 4, static_cast<uint32_t>(id));
        if (!h->RecordUse(s).ok()) errors++;
        v.assign(bytes / 4, 0);
        if (cudaMemcpyAsync(v.data(), h->data(), bytes, cudaMemcpyDeviceToHost, s) != cudaSuccess ||
            cudaStreamSynchronize(s) != cudaSuccess)
          errors++;
        if (!HostMatches(v, static_cast<uint32_t>(id))) mismatches++;
        if (rng() % 3 == 0) {
          (void)t.Erase(Key(id));  // may already be evicted by another thread: NotFound is fine
        }
        if (it > 0 && rng() % 2 == 0) {
          auto old = t.Lookup(Key(id - 1));
          if (old.ok() && !old->RecordUse(s).ok()) errors++;
        }
      }
      cudaStreamSynchronize(s);
      cudaStreamDestroy(s);
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(mismatches.load(), 0) << "an entry's bytes changed while its handle was held";
  auto st = t.GetStats();
  EXPECT_LE(st.reserved_bytes, o.capacity_bytes);
  EXPECT_EQ(st.pinned_entries, 0u);
  EXPECT_GT(evicted.load(), 0);
  // Few allocations may fail while other threads hold their entries; most succeed.
  EXPECT_LT(exhausted.load(), kThreads * kIters / 10);
}

TEST_F(DeviceTierTest, HandlesOutliveTheTier) {
  DeviceHandle h;
  {
    DeviceTierOptions o;
    o.capacity_bytes = 1 << 20;
    auto tier = DeviceTier::Open(o);
    ASSERT_TRUE(tier.ok());
    auto a = tier.value()->Allocate(Key(1), 4096);
    ASSERT_TRUE(a.ok());
    h = a.value();
  }
  FillKernel<<<1, 256>>>(static_cast<uint32_t*>(h.data()), 1024, 3);
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<uint32_t> v(1024);
  CUDA_OK(cudaMemcpy(v.data(), h.data(), 4096, cudaMemcpyDeviceToHost));
  EXPECT_TRUE(HostMatches(v, 3));
}

TEST_F(DeviceTierTest, TransferEngineBatchesAndEvents) {
  auto te = TransferEngine::Create();
  ASSERT_TRUE(te.ok()) << te.status().ToString();
  constexpr int kCopies = 300;
  std::vector<size_t> sizes(kCopies);
  std::mt19937 rng(5);
  size_t total = 0;
  for (auto& s : sizes) {
    s = 1 + rng() % 20000;  // odd sizes, many small
    total += (s + 255) / 256 * 256;
  }
  char *hsrc, *hdst, *dev;
  CUDA_OK(cudaHostAlloc(&hsrc, total, cudaHostAllocDefault));
  CUDA_OK(cudaHostAlloc(&hdst, total, cudaHostAllocDefault));
  CUDA_OK(cudaMalloc(&dev, total));
  for (size_t i = 0; i < total; ++i) hsrc[i] = static_cast<char>(rng());
  std::memset(hdst, 0xEE, total);
  std::vector<CopyRequest> up, down;
  size_t off = 0;
  for (size_t s : sizes) {
    up.push_back({dev + off, hsrc + off, s});
    down.push_back({hdst + off, dev + off, s});
    off += (s + 255) / 256 * 256;
  }
  auto e1 = te.value()->HostToDevice(up);
  ASSERT_TRUE(e1.ok()) << e1.status().ToString();
  auto e2 = te.value()->DeviceToHost(down, e1.value());  // ordered after the upload by the event
  ASSERT_TRUE(e2.ok()) << e2.status().ToString();
  ASSERT_TRUE(e2->Wait().ok());
  auto ready = e2->Ready();
  ASSERT_TRUE(ready.ok());
  EXPECT_TRUE(ready.value());
  off = 0;
  size_t wrong = 0;
  for (size_t s : sizes) {
    wrong += std::memcmp(hsrc + off, hdst + off, s) != 0;
    for (size_t k = s; k < (s + 255) / 256 * 256; ++k) wrong += static_cast<unsigned char>(hdst[off + k]) != 0xEE;
    off += (s + 255) / 256 * 256;
  }
  EXPECT_EQ(wrong, 0u);
  // A compute stream that waits for an upload sees its bytes.
  cudaStream_t compute;
  CUDA_OK(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking));
  std::vector<uint32_t> pattern(1 << 16);
  for (size_t i = 0; i < pattern.size(); ++i) pattern[i] = 9 * 2654435761u + static_cast<uint32_t>(i);
  std::memcpy(hsrc, pattern.data(), pattern.size() * 4);
  CopyRequest one{dev, hsrc, pattern.size() * 4};
  auto e3 = te.value()->HostToDevice({&one, 1});
  ASSERT_TRUE(e3.ok());
  ASSERT_TRUE(e3->MakeStreamWait(compute).ok());
  unsigned* bad;
  CUDA_OK(cudaMalloc(&bad, 4));
  CUDA_OK(cudaMemsetAsync(bad, 0, 4, compute));
  DelayedCheckKernel<<<32, 256, 0, compute>>>(reinterpret_cast<const uint32_t*>(dev), pattern.size(), 9, 0, bad);
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaStreamSynchronize(compute));
  unsigned hb = 1;
  CUDA_OK(cudaMemcpy(&hb, bad, 4, cudaMemcpyDeviceToHost));
  EXPECT_EQ(hb, 0u);
  CopyRequest null_copy{nullptr, hsrc, 4};
  EXPECT_EQ(te.value()->HostToDevice({&null_copy, 1}).status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(TransferEvent().Wait().ok());
  CUDA_OK(cudaFree(bad));
  CUDA_OK(cudaStreamDestroy(compute));
  CUDA_OK(cudaFree(dev));
  CUDA_OK(cudaFreeHost(hsrc));
  CUDA_OK(cudaFreeHost(hdst));
}

}  // namespace
}  // namespace kvagent::cuda
