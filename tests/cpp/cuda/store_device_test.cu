// The Store's device tier on a GPU: misses load host -> device, hits return the resident bytes,
// disk -> host -> device promotion, eviction never frees bytes in use (handles or recorded
// stream work), evictions copy back what no other tier holds, and concurrent streams.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstddef>
#include <random>
#include <thread>
#include <vector>

#include "kvagent/cuda_kv.h"
#include "kvagent/host_tier.h"
#include "kvagent/store.h"
#include "store/store_test_util.h"
#include "temp_dir.h"

namespace kvagent {
namespace {

using testing::MakeSegment;
using testing::PatternByte;
using testing::TestModel;

#define CUDA_OK(expr)                                                      \
  do {                                                                     \
    cudaError_t e_ = (expr);                                               \
    ASSERT_EQ(e_, cudaSuccess) << #expr << ": " << cudaGetErrorString(e_); \
  } while (0)

// 1 layer x 2 heads x 1024 tokens x 64 dims of bf16: 512 KiB per segment.
constexpr size_t kSegBytes = size_t{512} << 10;
SegmentLayout Layout() { return SegmentLayout{1, 2, 64, 1024, DType::kBF16}; }
Hash128 Key(uint64_t i) { return testing::TestKey(1000 + i); }
std::shared_ptr<Segment> Seg(uint64_t i, int64_t version = 1) { return MakeSegment(Key(i), version, Layout()); }

// Empty if the device bytes of `d` are version `version` of its key's pattern.
std::string CheckDevice(const DeviceSegment& d, int64_t version) {
  std::vector<std::byte> host(d.size());
  cudaError_t e = cudaMemcpy(host.data(), d.data(), d.size(), cudaMemcpyDeviceToHost);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  for (size_t i = 0; i < host.size(); ++i)
    if (host[i] != PatternByte(d.meta()->key, version, i)) return "device byte " + std::to_string(i) + " differs";
  return "";
}

// Waits `ns` nanoseconds on the device, then copies: a reader that outlives its handle.
__global__ void DelayedCopy(const uint4* src, uint4* dst, size_t n, uint64_t ns) {
  if (threadIdx.x == 0) {
    uint64_t start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
      __nanosleep(20000);
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
  }
  __syncthreads();
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += static_cast<size_t>(gridDim.x) * blockDim.x)
    dst[i] = src[i];
}

class StoreDeviceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda::DeviceAvailable()) GTEST_FAIL() << "gpu test needs a CUDA device: " << cuda::CheckDevice().ToString();
  }
  std::unique_ptr<Store> Open(uint64_t device_bytes, uint64_t host_bytes = 1ull << 30, std::string path = "") {
    StoreOptions o;
    o.device_capacity_bytes = device_bytes;
    o.host_capacity_bytes = host_bytes;
    o.path = std::move(path);
    o.write_behind = false;
    o.sync = false;
    auto s = Store::Open(o);
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    return s.ok() ? std::move(s).value() : nullptr;
  }
};

TEST_F(StoreDeviceTest, MissLoadsHitReturnsResidentBytes) {
  auto store = Open(4 * kSegBytes);
  ASSERT_TRUE(store);
  // A device tier makes host buffers pinned from then on (the host tier's copy of a Put too).
  EXPECT_STREQ(Buffer::HostAllocatorName(), "cuda_pinned");
  {
    auto b = Buffer::Allocate(1 << 20);
    ASSERT_TRUE(b.ok());
    cudaPointerAttributes host_attr{};
    CUDA_OK(cudaPointerGetAttributes(&host_attr, (*b)->data()));
    EXPECT_EQ(host_attr.type, cudaMemoryTypeHost);
  }
  ASSERT_TRUE(store->Put(Seg(1)).ok());
  auto d = store->GetDevice(Key(1), TestModel());
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->size(), kSegBytes);
  EXPECT_EQ(d->device(), 0);
  EXPECT_EQ(d->meta()->payload, nullptr);
  EXPECT_EQ(d->meta()->layout, Layout());
  EXPECT_EQ(d->meta()->tokens, Seg(1)->tokens);
  EXPECT_EQ(CheckDevice(*d, 1), "");
  cudaPointerAttributes attr{};
  CUDA_OK(cudaPointerGetAttributes(&attr, d->data()));
  EXPECT_EQ(attr.type, cudaMemoryTypeDevice);

  auto again = store->GetDevice(Key(1), TestModel());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->data(), d->data());
  StoreStats st = store->Stats();
  EXPECT_TRUE(st.has_device);
  EXPECT_EQ(st.device.misses, 1u);
  EXPECT_EQ(st.device.hits, 1u);
  EXPECT_EQ(st.device.puts, 1u);
  EXPECT_EQ(st.device.segments, 1u);
  EXPECT_EQ(st.device.bytes, kSegBytes);
  EXPECT_EQ(st.device.capacity_bytes, 4 * kSegBytes);

  EXPECT_EQ(store->GetDevice(Key(1), testing::TestModel(9)).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(store->GetDevice(Key(2), TestModel()).status().code(), StatusCode::kNotFound);
  // Bytes outlive the store.
  ASSERT_TRUE(store->Close().ok());
  store.reset();
  EXPECT_EQ(CheckDevice(*d, 1), "");
}

TEST_F(StoreDeviceTest, PromotesDiskToHostToDevice) {
  testing::TempDir dir;
  const uint64_t charge = HostTier::ChargeOf(*Seg(1));
  auto store = Open(4 * kSegBytes, charge + charge / 2, dir.path());
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->Put(Seg(1)).ok());
  ASSERT_TRUE(store->Put(Seg(2)).ok());  // evicts 1 from the host tier; the disk keeps it
  ASSERT_EQ(store->Stats().host.segments, 1u);
  auto d = store->GetDevice(Key(1), TestModel());
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(CheckDevice(*d, 1), "");
  EXPECT_EQ(store->Stats().promotions, 1u);
}

TEST_F(StoreDeviceTest, EvictionNeverFreesSegmentsInUse) {
  auto store = Open(2 * kSegBytes);
  ASSERT_TRUE(store);
  for (uint64_t i = 0; i < 6; ++i) ASSERT_TRUE(store->Put(Seg(i)).ok());
  auto held = store->GetDevice(Key(0), TestModel());
  ASSERT_TRUE(held.ok());
  for (uint64_t i = 1; i < 6; ++i) {
    auto d = store->GetDevice(Key(i), TestModel());
    ASSERT_TRUE(d.ok()) << i << ": " << d.status().ToString();
    EXPECT_EQ(CheckDevice(*d, 1), "") << i;
    EXPECT_EQ(CheckDevice(*held, 1), "") << "after loading " << i;
  }
  EXPECT_GE(store->Stats().device.evictions, 4u);
  auto again = store->GetDevice(Key(0), TestModel());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->data(), held->data());  // never evicted
  // Both slots held: nothing can be evicted for a third segment.
  auto other = store->GetDevice(Key(5), TestModel());
  ASSERT_TRUE(other.ok());
  EXPECT_EQ(store->GetDevice(Key(3), TestModel()).status().code(), StatusCode::kResourceExhausted);
  // Host copies stay the truth: every segment still reads back.
  for (uint64_t i = 0; i < 6; ++i) EXPECT_TRUE(store->Contains(Key(i))) << i;
}

TEST_F(StoreDeviceTest, EvictionCopiesBackWhatNoOtherTierHolds) {
  const uint64_t charge = HostTier::ChargeOf(*Seg(1));
  auto store = Open(kSegBytes, 2 * charge + charge / 2);
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->Put(Seg(1)).ok());
  ASSERT_TRUE(store->GetDevice(Key(1), TestModel()).ok());
  ASSERT_TRUE(store->Put(Seg(2)).ok());
  ASSERT_TRUE(store->Put(Seg(3)).ok());  // the host tier drops 1; the device still has it
  ASSERT_FALSE(store->Contains(Key(1)));
  auto d2 = store->GetDevice(Key(2), TestModel());  // evicts 1 from the device: copied back
  ASSERT_TRUE(d2.ok()) << d2.status().ToString();
  EXPECT_EQ(store->Stats().device.evictions, 1u);
  ASSERT_TRUE(store->Contains(Key(1)));
  auto back = store->Get(Key(1), TestModel());
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(testing::CheckSegment(**back), "");
}

TEST_F(StoreDeviceTest, PutAndDeleteDropTheDeviceCopyButNotHeldBytes) {
  auto store = Open(4 * kSegBytes);
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->Put(Seg(1, 1)).ok());
  auto v1 = store->GetDevice(Key(1), TestModel());
  ASSERT_TRUE(v1.ok());
  ASSERT_TRUE(store->Put(Seg(1, 2)).ok());
  auto v2 = store->GetDevice(Key(1), TestModel());
  ASSERT_TRUE(v2.ok());
  EXPECT_NE(v2->data(), v1->data());
  EXPECT_EQ(v2->meta()->meta.turn, 2);
  EXPECT_EQ(CheckDevice(*v2, 2), "");
  EXPECT_EQ(CheckDevice(*v1, 1), "");
  ASSERT_TRUE(store->Delete(Key(1)).ok());
  EXPECT_EQ(store->GetDevice(Key(1), TestModel()).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(CheckDevice(*v2, 2), "");
  EXPECT_EQ(store->Stats().device.segments, 0u);
}

// Threads read segments on their own streams and drop the handle before the (delayed) read
// runs; with a tier much smaller than the working set, evictions would corrupt the reads if
// recorded stream uses did not hold the bytes.
TEST_F(StoreDeviceTest, ConcurrentStreamsReadWhileTheTierEvicts) {
  constexpr int kThreads = 8, kKeys = 24, kIters = 40;
  auto store = Open(10 * kSegBytes);
  ASSERT_TRUE(store);
  for (int i = 0; i < kKeys; ++i) ASSERT_TRUE(store->Put(Seg(static_cast<uint64_t>(i))).ok());
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      cudaStream_t stream;
      if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess) {
        ++failures;
        return;
      }
      std::mt19937 rng(static_cast<unsigned>(t));
      std::vector<std::byte> host(kSegBytes);
      void* scratch = nullptr;
      if (cudaMalloc(&scratch, kSegBytes) != cudaSuccess) ++failures;
      for (int it = 0; it < kIters && scratch; ++it) {
        const uint64_t k = rng() % kKeys;
        Hash128 key = Key(k);
        {
          auto d = store->GetDevice(key, TestModel());
          if (!d.ok()) {
            ADD_FAILURE() << d.status().ToString();
            ++failures;
            break;
          }
          DelayedCopy<<<64, 256, 0, stream>>>(static_cast<const uint4*>(d->data()), static_cast<uint4*>(scratch),
                                              kSegBytes / sizeof(uint4), 200000);
          if (!d->RecordUse(stream).ok()) ++failures;
        }  // the handle drops while the copy is still waiting on the device
        if (cudaMemcpyAsync(host.data(), scratch, kSegBytes, cudaMemcpyDeviceToHost, stream) != cudaSuccess ||
            cudaStreamSynchronize(stream) != cudaSuccess) {
          ++failures;
          break;
        }
        for (size_t i = 0; i < kSegBytes; ++i)
          if (host[i] != PatternByte(key, 1, i)) {
            ADD_FAILURE() << "thread " << t << " key " << k << " byte " << i << " differs";
            ++failures;
            break;
          }
      }
      cudaFree(scratch);
      cudaStreamDestroy(stream);
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  StoreStats st = store->Stats();
  EXPECT_GT(st.device.evictions, 0u);
  EXPECT_EQ(st.device.hits + st.device.misses, static_cast<uint64_t>(kThreads * kIters));
  EXPECT_LE(st.device.puts, st.device.misses);
  EXPECT_LE(st.device.bytes, 10 * kSegBytes);
}

}  // namespace
}  // namespace kvagent
