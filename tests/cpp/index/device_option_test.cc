// IndexOptions::device and SearchRequest::backend where no device can serve them: a build without
// CUDA, or a CUDA build on a machine without a GPU (CI). The device must never be replaced by the
// CPU silently; kAutoDevice is the only option that may pick the CPU. (The device search itself is
// tested against the CPU in tests/cpp/cuda_index/latent_index_device_test.cc, gpu label.)
#include <gtest/gtest.h>

#include <random>

#include "index_test_util.h"
#include "kvagent/index.h"
#if defined(KVAGENT_WITH_CUDA)
#include "kvagent/cuda_kv.h"
#endif

namespace kvagent {
namespace {

using testing_index::RandomKeys;
using testing_index::RandomQuery;
using testing_index::Spec;

bool DeviceUsable() {
#if defined(KVAGENT_WITH_CUDA)
  return cuda::DeviceAvailable();
#else
  return false;
#endif
}

TEST(IndexDeviceOption, DeviceWithoutCudaIsUnavailable) {
  if (DeviceUsable()) GTEST_SKIP() << "a CUDA device is usable here";
  const ModelSpec spec = Spec(2, 4, 2, 16);
  for (int device : {0, 1, 7}) {
    IndexOptions o;
    o.device = device;
    auto idx = LatentIndex::Create(spec, o);
    ASSERT_FALSE(idx.ok());
    EXPECT_EQ(idx.status().code(), StatusCode::kUnavailable) << idx.status().ToString();
    EXPECT_NE(idx.status().message().find("device"), std::string::npos) << idx.status().ToString();
  }
}

TEST(IndexDeviceOption, AutoFallsBackToCpuAndSearches) {
  if (DeviceUsable()) GTEST_SKIP() << "a CUDA device is usable here";
  const ModelSpec spec = Spec(2, 4, 2, 16);
  IndexOptions o;
  o.device = kAutoDevice;
  auto made = LatentIndex::Create(spec, o);
  ASSERT_TRUE(made.ok()) << made.status().ToString();
  LatentIndex& idx = **made;
  EXPECT_EQ(idx.device(), kCpuDevice);
  EXPECT_EQ(idx.options().device, kCpuDevice);
  EXPECT_EQ(idx.DeviceMemoryBytes(), 0u);
  std::mt19937 rng(3);
  for (int i = 0; i < 20; ++i) {
    auto k = RandomKeys(rng, 2, 2, 3, 16);
    auto s = KeySummary::FromKeys(k.data(), DType::kF32, 2, 2, 3, 16).value();
    IndexEntry e;
    e.key = MemoryKey("ns", "s", i, 0);
    e.num_tokens = 3;
    ASSERT_TRUE(idx.Add(e, s).ok());
  }
  std::vector<float> q = RandomQuery(rng, 2, 4, 2, 16);
  const QueryView view{q.data(), DType::kF32, 2, 4, 2, 16};
  SearchRequest r;
  auto hits = idx.Search(view, r);
  ASSERT_TRUE(hits.ok()) << hits.status().ToString();
  EXPECT_EQ(hits->size(), 5u);
  r.backend = SearchBackend::kCpu;
  EXPECT_TRUE(idx.Search(view, r).ok());
  // Asking a CPU index for the device is an error, not a CPU search.
  r.backend = SearchBackend::kDevice;
  auto dev = idx.Search(view, r);
  ASSERT_FALSE(dev.ok());
  EXPECT_EQ(dev.status().code(), StatusCode::kUnavailable) << dev.status().ToString();
}

TEST(IndexDeviceOption, CpuIndexRejectsDeviceBackend) {
  // Holds on every machine: the default index has no device.
  const ModelSpec spec = Spec(2, 4, 2, 16);
  auto made = LatentIndex::Create(spec, IndexOptions{});
  ASSERT_TRUE(made.ok());
  EXPECT_EQ((*made)->device(), kCpuDevice);
  std::mt19937 rng(4);
  std::vector<float> q = RandomQuery(rng, 2, 4, 1, 16);
  SearchRequest r;
  r.backend = SearchBackend::kDevice;
  auto dev = (*made)->Search(QueryView{q.data(), DType::kF32, 2, 4, 1, 16}, r);
  ASSERT_FALSE(dev.ok());
  EXPECT_EQ(dev.status().code(), StatusCode::kUnavailable);
  r.backend = static_cast<SearchBackend>(9);
  EXPECT_EQ((*made)->Search(QueryView{q.data(), DType::kF32, 2, 4, 1, 16}, r).status().code(),
            StatusCode::kInvalidArgument);
}

TEST(IndexDeviceOption, BadDeviceValueIsInvalid) {
  IndexOptions o;
  o.device = -3;
  auto idx = LatentIndex::Create(Spec(2, 4, 2, 16), o);
  ASSERT_FALSE(idx.ok());
  EXPECT_EQ(idx.status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvagent
