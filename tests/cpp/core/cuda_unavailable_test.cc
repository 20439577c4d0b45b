// kvagent/cuda_kv.h in a build without CUDA: the device functions link and return Unavailable
// (nothing else happens); the host parts (views, RoPE tables) work as in a CUDA build.
#include <gtest/gtest.h>

#include <vector>

#include "kvagent/cuda_kv.h"

namespace kvagent::cuda {
namespace {

TEST(CudaUnavailableTest, DeviceFunctionsReturnUnavailable) {
  EXPECT_FALSE(DeviceAvailable());
  EXPECT_EQ(CheckDevice().code(), StatusCode::kUnavailable);
  ModelSpec spec = UniformModelSpec("m", 2, 2, 1, 8, DType::kBF16, RopeSpec{}, Hash128{1, 2});
  EXPECT_EQ(RopeDeviceTable::Create(spec).status().code(), StatusCode::kUnavailable);
  EXPECT_EQ(RopeDeviceTable::Create({}, 8).status().code(), StatusCode::kUnavailable);
  std::vector<uint16_t> engine(2 * 2 * 4 * 8, 7);
  std::vector<uint16_t> canonical(engine.size(), 1);
  EngineKvView view = CanonicalAsView(DType::kBF16, 2, 1, 8, 4, engine.data());
  CanonicalSpan span{canonical.data(), nullptr, 4, 0, 4};
  MoveOptions o;
  EXPECT_EQ(LoadToEngine({&span, 1}, view, o, nullptr).code(), StatusCode::kUnavailable);
  EXPECT_EQ(SaveFromEngine({&span, 1}, view, o, nullptr).code(), StatusCode::kUnavailable);
  for (uint16_t v : engine) ASSERT_EQ(v, 7);  // nothing moved
  for (uint16_t v : canonical) ASSERT_EQ(v, 1);
}

TEST(CudaUnavailableTest, HostPartsWork) {
  EngineKvView v = CanonicalAsView(DType::kF16, 3, 2, 8, 5, nullptr);
  EXPECT_EQ(v.num_layers(), 3);
  EXPECT_EQ(v.stride_head, 5 * 8);
  EXPECT_EQ(v.stride_block, 8);
  EngineKvView paged = EngineKvView::Paged(DType::kBF16, 2, 8, 16, 4, {nullptr}, {nullptr});
  EXPECT_EQ(paged.num_slots, 64);
  EXPECT_EQ(paged.stride_block, 16 * 2 * 8);
  RopeSpec r;
  r.theta = 10000;
  auto table = ComputeRopeTable(r, 8);
  ASSERT_TRUE(table.ok()) << table.status().ToString();
  EXPECT_EQ(table->rotary_dim, 8);
  EXPECT_EQ(table->inv_freq.size(), 4u);
  EXPECT_EQ(table->inv_freq[0], 1.0);
}

}  // namespace
}  // namespace kvagent::cuda
