// The CUDA bindings' glue (bindings/cuda_glue.cc): array descriptions -> EngineKvView, canonical
// layouts and per-row arguments. Pure checks on DLPack metadata: no device is touched, so this
// runs on the CPU machine (CUDA builds only).
#include "cuda_glue.h"

#include <gtest/gtest.h>

#include <vector>

namespace kvagent::py {
namespace {

constexpr DlDType kBf16{4, 16, 1};
constexpr DlDType kF16{2, 16, 1};
constexpr DlDType kI64{0, 64, 1};

// A C-contiguous CUDA array description at a fake address.
DevArray Arr(std::vector<int64_t> shape, DlDType t = kBf16, uintptr_t addr = 0x100000, int dev_type = kDlCuda) {
  DevArray a;
  a.data = reinterpret_cast<void*>(addr);
  a.shape = shape;
  a.strides.assign(shape.size(), 1);
  for (size_t i = shape.size() - 1; i-- > 0;) a.strides[i] = a.strides[i + 1] * shape[i + 1];
  a.dtype = t;
  a.device_type = dev_type;
  return a;
}

TEST(CudaGlue, TokenAndHeadMajorViewsFollowStrides) {
  int dev = -1;
  auto v = EngineViewOf(EngineLayout::kTokenMajor, {Arr({64, 4, 128})}, {Arr({64, 4, 128}, kBf16, 0x200000)}, &dev);
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(dev, 0);
  EXPECT_EQ(v->num_kv_heads, 4);
  EXPECT_EQ(v->head_dim, 128);
  EXPECT_EQ(v->num_slots, 64);
  EXPECT_EQ(v->block_size, 1);
  EXPECT_EQ(v->stride_block, 4 * 128);
  EXPECT_EQ(v->stride_head, 128);
  EXPECT_EQ(v->dtype, DType::kBF16);

  // A head-major view of a slice of a larger cache: strides, not shapes, place the elements.
  DevArray hm = Arr({4, 64, 128});
  hm.strides = {1000 * 128, 128, 1};
  dev = -1;
  auto h = EngineViewOf(EngineLayout::kHeadMajor, {hm}, {hm}, &dev);
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_EQ(h->num_slots, 64);
  EXPECT_EQ(h->stride_block, 128);
  EXPECT_EQ(h->stride_head, 1000 * 128);
}

TEST(CudaGlue, PagedAndFusedViews) {
  int dev = -1;
  auto p = EngineViewOf(EngineLayout::kPaged, {Arr({10, 16, 8, 64})}, {Arr({10, 16, 8, 64})}, &dev);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->block_size, 16);
  EXPECT_EQ(p->num_slots, 160);
  EXPECT_EQ(p->stride_block, 16 * 8 * 64);
  EXPECT_EQ(p->stride_slot, 8 * 64);
  EXPECT_EQ(p->stride_head, 64);
  dev = -1;
  DevArray f = Arr({2, 10, 16, 8, 64}, kF16, 0x1000);
  auto fused = EngineViewOf(EngineLayout::kPagedFused, {f, f}, {}, &dev);
  ASSERT_TRUE(fused.ok()) << fused.status().ToString();
  ASSERT_EQ(fused->num_layers(), 2);
  EXPECT_EQ(fused->dtype, DType::kF16);
  EXPECT_EQ(static_cast<char*>(fused->v_layers[0]) - static_cast<char*>(fused->k_layers[0]), 10 * 16 * 8 * 64 * 2);
  EXPECT_EQ(fused->num_slots, 160);
}

TEST(CudaGlue, RejectsWrongDeviceDtypeShapeAndStrides) {
  auto code = [](EngineLayout l, std::vector<DevArray> k, std::vector<DevArray> v) {
    int dev = -1;
    return EngineViewOf(l, k, v, &dev).status();
  };
  const auto tm = EngineLayout::kTokenMajor;
  Status s = code(tm, {Arr({8, 2, 64}, kBf16, 0x1000, kDlCpu)}, {Arr({8, 2, 64})});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("CUDA"), std::string::npos) << s.ToString();
  EXPECT_EQ(code(tm, {Arr({8, 2, 64})}, {Arr({8, 2, 64}, kF16)}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(code(tm, {Arr({8, 2, 64})}, {Arr({8, 4, 64})}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(code(tm, {Arr({8, 64})}, {Arr({8, 64})}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(code(tm, {Arr({8, 2, 64})}, {}).code(), StatusCode::kInvalidArgument);  // layer counts differ
  EXPECT_EQ(code(tm, {}, {}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(code(tm, {Arr({8, 2, 64}, kI64)}, {Arr({8, 2, 64}, kI64)}).code(), StatusCode::kInvalidArgument);
  DevArray strided = Arr({8, 2, 64});
  strided.strides = {256, 128, 2};  // dim axis not contiguous
  EXPECT_EQ(code(tm, {strided}, {strided}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(code(EngineLayout::kPagedFused, {Arr({3, 4, 16, 2, 64})}, {}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(code(EngineLayout::kPagedFused, {Arr({2, 4, 16, 2, 64})}, {Arr({2, 4, 16, 2, 64})}).code(),
            StatusCode::kInvalidArgument);
  DevArray other_gpu = Arr({8, 2, 64});
  other_gpu.device_id = 1;
  EXPECT_EQ(code(tm, {Arr({8, 2, 64})}, {other_gpu}).code(), StatusCode::kInvalidArgument);
}

TEST(CudaGlue, CanonicalLayoutAndRowArguments) {
  auto l = CanonicalLayoutOf(Arr({3, 2, 4, 17, 80}), 0, "src");
  ASSERT_TRUE(l.ok()) << l.status().ToString();
  EXPECT_EQ(*l, (SegmentLayout{3, 4, 80, 17, DType::kBF16}));
  DevArray t = Arr({3, 2, 4, 17, 80});
  std::swap(t.strides[2], t.strides[3]);
  EXPECT_EQ(CanonicalLayoutOf(t, 0, "src").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(CanonicalLayoutOf(Arr({3, 3, 4, 17, 80}), 0, "src").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(CanonicalLayoutOf(Arr({3, 2, 4, 17, 80}), 1, "src").status().code(), StatusCode::kInvalidArgument);

  auto base = RowArgOf(nullptr, 42, 5, 0, "slots");
  ASSERT_TRUE(base.ok());
  EXPECT_EQ(base->ptr, nullptr);
  EXPECT_EQ(base->base, 42);
  DevArray rows = Arr({5}, kI64, 0x5000);
  auto arr = RowArgOf(&rows, 0, 5, 0, "slots");
  ASSERT_TRUE(arr.ok());
  EXPECT_EQ(arr->ptr, reinterpret_cast<const int64_t*>(0x5000));
  EXPECT_EQ(RowArgOf(&rows, 0, 6, 0, "slots").status().code(), StatusCode::kInvalidArgument);
  DevArray i32 = Arr({5}, DlDType{0, 32, 1});
  EXPECT_EQ(RowArgOf(&i32, 0, 5, 0, "slots").status().code(), StatusCode::kInvalidArgument);

  EXPECT_EQ(EngineLayoutFromName("paged").value(), EngineLayout::kPaged);
  EXPECT_FALSE(EngineLayoutFromName("vllm").ok());
  EXPECT_EQ(RotationFromName("shift").value(), cuda::Rotation::kShift);
  EXPECT_FALSE(RotationFromName("rotate").ok());
}

}  // namespace
}  // namespace kvagent::py
