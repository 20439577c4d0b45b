// The store's device tier where none can exist (builds without CUDA, machines without a GPU):
// Unavailable, and everything else unchanged. On a GPU machine the no-device cases are skipped.
#include <gtest/gtest.h>

#include "kvagent/store.h"
#include "store/store_test_util.h"
#include "temp_dir.h"
#if defined(KVAGENT_WITH_CUDA)
#include "kvagent/cuda_kv.h"
#endif

namespace kvagent {
namespace {

using testing::MakeSegment;
using testing::TestModel;

bool HaveDevice() {
#if defined(KVAGENT_WITH_CUDA)
  return cuda::DeviceAvailable();
#else
  return false;
#endif
}

TEST(StoreDeviceTier, OpenWithDeviceTierIsUnavailableWithoutDevice) {
  if (HaveDevice()) GTEST_SKIP() << "a CUDA device is present (gpu tests cover it)";
  StoreOptions o;
  o.device_capacity_bytes = 1 << 20;
  auto s = Store::Open(o);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), StatusCode::kUnavailable) << s.status().ToString();
  EXPECT_NE(s.status().message().find("device tier unavailable"), std::string::npos) << s.status().ToString();

  testing::TempDir dir;
  o.path = dir.path();
  auto d = Store::Open(o);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().code(), StatusCode::kUnavailable);
  // The failed open released the directory: a store without a device tier opens there.
  o.device_capacity_bytes = 0;
  auto ok = Store::Open(o);
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
}

TEST(StoreDeviceTier, GetDeviceWithoutDeviceTierIsUnavailableAndChangesNothing) {
  StoreOptions o;
  auto s = Store::Open(o);
  ASSERT_TRUE(s.ok());
  Store& store = **s;
  auto seg = MakeSegment(1, 1);
  ASSERT_TRUE(store.Put(seg).ok());
  const StoreStats before = store.Stats();
  auto d = store.GetDevice(seg->key, TestModel());
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(d.status().message().find("no device tier"), std::string::npos) << d.status().ToString();
  const StoreStats after = store.Stats();
  EXPECT_FALSE(after.has_device);
  EXPECT_EQ(after.device.hits + after.device.misses + after.device.capacity_bytes, 0u);
  EXPECT_EQ(after.host.hits, before.host.hits);
  EXPECT_EQ(after.host.misses, before.host.misses);
  auto g = store.Get(seg->key, TestModel());
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(testing::CheckSegment(**g), "");
  ASSERT_TRUE(store.Close().ok());
  EXPECT_EQ(store.GetDevice(seg->key, TestModel()).status().code(), StatusCode::kFailedPrecondition);
}

TEST(StoreDeviceTier, EmptyDeviceSegment) {
  DeviceSegment d;
  EXPECT_FALSE(d);
  EXPECT_EQ(d.data(), nullptr);
  EXPECT_EQ(d.RecordUse(nullptr).code(), StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace kvagent
