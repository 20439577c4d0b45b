// CUDA-enabled build, any machine: host-only RoPE tables, argument checking, and the behaviour
// without a device (Unavailable, nothing changed). On a GPU machine the device branch runs.
#include <gtest/gtest.h>

#include <cmath>
#include <utility>
#include <vector>

#include "cuda/index_search.h"
#include "kvagent/cuda_kv.h"
#include "kvagent/device_tier.h"
#include "kvagent/segment.h"

namespace kvagent::cuda {
namespace {

constexpr double kPi = 3.14159265358979323846;

// Tables hold HF's fp32 inv_freq values (the positioner reproduces torch's fp32 op order, whose
// float pow is not always correctly rounded): representable in float and within 4 ulp of the
// double-precision formula.
void ExpectFp32Of(double got, double want, int i) {
  EXPECT_EQ(got, static_cast<double>(static_cast<float>(got))) << "not an fp32 value at " << i;
  EXPECT_NEAR(got, want, std::fabs(want) * 4.8e-7) << i;
}

TEST(RopeTable, DefaultAndLinear) {
  RopeSpec s;
  s.theta = 10000;
  auto t = ComputeRopeTable(s, 80);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  ASSERT_EQ(t->rotary_dim, 80);
  ASSERT_EQ(t->inv_freq.size(), 40u);
  for (int i = 0; i < 40; ++i) ExpectFp32Of(t->inv_freq[i], std::pow(10000.0, -2.0 * i / 80), i);
  EXPECT_EQ(t->attention_factor, 1.0);
  s.scaling = RopeScaling::kLinear;
  s.factor = 4;
  s.rotary_dim = 32;  // partial rotary
  auto lin = ComputeRopeTable(s, 80);
  ASSERT_TRUE(lin.ok());
  ASSERT_EQ(lin->inv_freq.size(), 16u);
  for (int i = 0; i < 16; ++i) ExpectFp32Of(lin->inv_freq[i], std::pow(10000.0, -2.0 * i / 32) / 4, i);
}

TEST(RopeTable, Llama3BandsFollowWavelength) {
  RopeSpec s;
  s.theta = 500000;
  s.scaling = RopeScaling::kLlama3;
  s.factor = 8;
  s.low_freq_factor = 1;
  s.high_freq_factor = 4;
  s.original_max_position = 8192;
  auto t = ComputeRopeTable(s, 128);
  ASSERT_TRUE(t.ok());
  int high = 0, low = 0, mid = 0;
  for (int i = 0; i < 64; ++i) {
    const double base = std::pow(500000.0, -2.0 * i / 128);
    const double wavelen = 2 * kPi / base;
    if (wavelen < 8192.0 / 4) {
      ExpectFp32Of(t->inv_freq[i], base, i);
      ++high;
    } else if (wavelen > 8192.0 / 1) {
      ExpectFp32Of(t->inv_freq[i], base / 8, i);
      ++low;
    } else {
      const double smooth = (8192.0 / wavelen - 1) / (4 - 1);
      ExpectFp32Of(t->inv_freq[i], (1 - smooth) * base / 8 + smooth * base, i);
      EXPECT_LT(t->inv_freq[i], base);
      EXPECT_GT(t->inv_freq[i], base / 8);
      ++mid;
    }
  }
  EXPECT_GT(high, 0);
  EXPECT_GT(low, 0);
  EXPECT_GT(mid, 0);
}

TEST(RopeTable, YarnRampAndAttentionFactor) {
  RopeSpec s;
  s.theta = 10000;
  s.scaling = RopeScaling::kYarn;
  s.factor = 4;
  s.original_max_position = 4096;
  auto t = ComputeRopeTable(s, 64);
  ASSERT_TRUE(t.ok());
  EXPECT_NEAR(t->attention_factor, 0.1 * std::log(4.0) + 1.0, 1e-15);
  // Highest frequencies extrapolate (unchanged), lowest interpolate (divided by factor).
  EXPECT_DOUBLE_EQ(t->inv_freq[0], 1.0);
  ExpectFp32Of(t->inv_freq[31], std::pow(10000.0, -62.0 / 64) / 4, 31);
  for (int i = 1; i < 32; ++i) EXPECT_LE(t->inv_freq[i], t->inv_freq[i - 1]);
  s.attention_factor = 1.25;
  EXPECT_EQ(ComputeRopeTable(s, 64)->attention_factor, 1.25);
}

TEST(RopeTable, DynamicAndErrors) {
  RopeSpec s;
  s.scaling = RopeScaling::kDynamicNtk;
  s.factor = 2;
  s.original_max_position = 2048;
  s.dynamic_max_position = 0;  // not beyond the original length: default frequencies
  auto d0 = ComputeRopeTable(s, 64);
  ASSERT_TRUE(d0.ok());
  ExpectFp32Of(d0->inv_freq[5], std::pow(10000.0, -10.0 / 64), 5);
  s.dynamic_max_position = 8192;
  auto d1 = ComputeRopeTable(s, 64);
  const double base = 10000.0 * std::pow(2.0 * 8192 / 2048 - 1, 64.0 / 62);
  ExpectFp32Of(d1->inv_freq[5], std::pow(base, -10.0 / 64), 5);

  RopeSpec off;
  off.enabled = false;
  EXPECT_EQ(ComputeRopeTable(off, 64)->rotary_dim, 0);
  RopeSpec odd;
  odd.rotary_dim = 7;
  EXPECT_EQ(ComputeRopeTable(odd, 64).status().code(), StatusCode::kInvalidArgument);
  RopeSpec big;
  big.rotary_dim = 128;
  EXPECT_EQ(ComputeRopeTable(big, 64).status().code(), StatusCode::kInvalidArgument);
  RopeSpec small_factor;
  small_factor.scaling = RopeScaling::kLinear;
  small_factor.factor = 0;
  EXPECT_EQ(ComputeRopeTable(small_factor, 64).status().code(), StatusCode::kInvalidArgument);
}

// A view and span that pass every argument check; pointers are never dereferenced when no
// device exists (the device check comes last, after argument checks).
EngineKvView FakeView(void* p) { return EngineKvView::Paged(DType::kBF16, 2, 64, 16, 4, {p, p}, {p, p}); }

TEST(CudaKv, ArgumentErrorsBeforeDeviceUse) {
  void* fake = reinterpret_cast<void*>(uintptr_t{1} << 20);
  CanonicalSpan span{fake, nullptr, 8, 0, 8};
  MoveOptions o;
  o.canonical_dtype = DType::kBF16;
  EngineKvView v = FakeView(fake);
  CanonicalSpan no_data{nullptr, nullptr, 8, 0, 8};
  EXPECT_EQ(LoadToEngine({&no_data, 1}, v, o, nullptr).code(), StatusCode::kInvalidArgument);
  CanonicalSpan past_end{fake, nullptr, 8, 4, 5};
  EXPECT_EQ(LoadToEngine({&past_end, 1}, v, o, nullptr).code(), StatusCode::kInvalidArgument);
  MoveOptions wrong_dtype = o;
  wrong_dtype.canonical_dtype = DType::kF16;
  EXPECT_EQ(LoadToEngine({&span, 1}, v, wrong_dtype, nullptr).code(), StatusCode::kInvalidArgument);
  MoveOptions rot = o;
  rot.rotation = Rotation::kApply;  // no rope table
  EXPECT_EQ(LoadToEngine({&span, 1}, v, rot, nullptr).code(), StatusCode::kInvalidArgument);
  MoveOptions slots_out = o;
  slots_out.slot_base = 60;  // 60 + 8 > 64 slots
  EXPECT_EQ(LoadToEngine({&span, 1}, v, slots_out, nullptr).code(), StatusCode::kInvalidArgument);
  MoveOptions int8_save = o;
  int8_save.int8_source = true;
  CanonicalSpan with_scales{fake, static_cast<const float*>(fake), 8, 0, 8};
  EXPECT_EQ(SaveFromEngine({&with_scales, 1}, v, int8_save, nullptr).code(), StatusCode::kInvalidArgument);
  EngineKvView null_layer = v;
  null_layer.v_layers[1] = nullptr;
  EXPECT_EQ(LoadToEngine({&span, 1}, null_layer, o, nullptr).code(), StatusCode::kInvalidArgument);
  EngineKvView odd = v;
  odd.k_layers[0] = static_cast<char*>(fake) + 1;  // not even element-aligned
  EXPECT_EQ(LoadToEngine({&span, 1}, odd, o, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(LoadToEngine({}, v, o, nullptr).code(), StatusCode::kInvalidArgument);
}

TEST(CudaKv, ViewsDescribeTheirLayouts) {
  std::vector<void*> ks{reinterpret_cast<void*>(0x1000)}, vs{reinterpret_cast<void*>(0x2000)};
  EngineKvView p = EngineKvView::Paged(DType::kF16, 8, 128, 16, 10, ks, vs);
  EXPECT_EQ(p.num_slots, 160);
  EXPECT_EQ(p.stride_slot, 8 * 128);
  EXPECT_EQ(p.stride_block, 16 * 8 * 128);
  EXPECT_EQ(p.stride_head, 128);
  EngineKvView f = EngineKvView::PagedFused(DType::kF16, 8, 128, 16, 10, ks);
  EXPECT_EQ(static_cast<char*>(f.v_layers[0]) - static_cast<char*>(f.k_layers[0]), 160 * 8 * 128 * 2);
  EngineKvView h = EngineKvView::HeadMajor(DType::kF32, 4, 64, 100, ks, vs);
  EXPECT_EQ(h.stride_head, 100 * 64);
  EXPECT_EQ(h.stride_block, 64);
  EngineKvView t = EngineKvView::TokenMajor(DType::kF32, 4, 64, 100, ks, vs);
  EXPECT_EQ(t.stride_block, 4 * 64);
  EngineKvView c = CanonicalAsView(DType::kBF16, 2, 3, 64, 10, reinterpret_cast<void*>(0x10000));
  EXPECT_EQ(static_cast<char*>(c.v_layers[1]) - static_cast<char*>(c.k_layers[0]), 3 * 3 * 10 * 64 * 2);
  EXPECT_EQ(c.stride_head, 10 * 64);
}

TEST(CudaKv, WithoutDeviceEverythingIsUnavailable) {
  if (DeviceAvailable()) {
    // GPU machine: the same entry points work.
    EXPECT_TRUE(CheckDevice().ok());
    DeviceTierOptions o;
    o.capacity_bytes = 1 << 20;
    EXPECT_TRUE(DeviceTier::Open(o).ok());
    EXPECT_TRUE(TransferEngine::Create().ok());
    return;
  }
  EXPECT_EQ(CheckDevice().code(), StatusCode::kUnavailable);
  void* fake = reinterpret_cast<void*>(uintptr_t{1} << 20);
  CanonicalSpan span{fake, nullptr, 8, 0, 8};
  MoveOptions o;
  o.canonical_dtype = DType::kBF16;
  EXPECT_EQ(LoadToEngine({&span, 1}, FakeView(fake), o, nullptr).code(), StatusCode::kUnavailable);
  EXPECT_EQ(SaveFromEngine({&span, 1}, FakeView(fake), o, nullptr).code(), StatusCode::kUnavailable);
  ModelSpec spec = UniformModelSpec("m", 2, 4, 2, 64, DType::kBF16, RopeSpec{}, HashString("w"));
  EXPECT_EQ(RopeDeviceTable::Create(spec).status().code(), StatusCode::kUnavailable);
  DeviceTierOptions to;
  to.capacity_bytes = 1 << 20;
  EXPECT_EQ(DeviceTier::Open(to).status().code(), StatusCode::kUnavailable);
  EXPECT_EQ(TransferEngine::Create().status().code(), StatusCode::kUnavailable);
  const std::string before = Buffer::HostAllocatorName();
  EXPECT_EQ(InstallPinnedHostAllocator().code(), StatusCode::kUnavailable);
  EXPECT_EQ(std::string(Buffer::HostAllocatorName()), before);
  int x = 0;
  EXPECT_EQ(MappedDevicePointer(&x).status().code(), StatusCode::kUnavailable);
  // Host buffers still work with the default allocator.
  auto b = Buffer::Allocate(1000);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b.value()->size(), 1000u);
}

TEST(RopeDeviceTable, TableErrorsBeforeDeviceUse) {
  RopeTable ok;
  ok.rotary_dim = 8;
  ok.inv_freq = {1, 0.5, 0.25, 0.125};
  RopeTable short_freq = ok;
  short_freq.inv_freq.pop_back();
  EXPECT_EQ(RopeDeviceTable::Create({ok, short_freq}, 64).status().code(), StatusCode::kInvalidArgument);
  RopeTable interleaved = ok;
  interleaved.style = RopeStyle::kInterleaved;
  EXPECT_EQ(RopeDeviceTable::Create({ok, interleaved}, 64).status().code(), StatusCode::kInvalidArgument);
  RopeTable zero_factor = ok;
  zero_factor.attention_factor = 0;
  EXPECT_EQ(RopeDeviceTable::Create({zero_factor}, 64).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(RopeDeviceTable::Create({ok}, 4).status().code(), StatusCode::kInvalidArgument);  // rd > head_dim
  EXPECT_EQ(RopeDeviceTable::Create(std::vector<RopeTable>{}, 64).status().code(), StatusCode::kInvalidArgument);
  auto good = RopeDeviceTable::Create({ok, RopeTable{}}, 64);  // a NoPE layer is fine
  EXPECT_EQ(good.ok(), DeviceAvailable()) << good.status().ToString();
}

TEST(CudaIndexSearch, ArgumentErrorsBeforeDeviceUse) {
  float* fake = reinterpret_cast<float*>(uintptr_t{1} << 20);
  int32_t* fake_rows = reinterpret_cast<int32_t*>(fake);
  RowSearch s{fake, true, 10, 2, 8, fake, 3, TokenNorm::kSoftmax, Aggregation::kMax, 5};
  ASSERT_TRUE(SearchRowsWorkspaceBytes(s).ok());
  const size_t need = *SearchRowsWorkspaceBytes(s);
  EXPECT_GE(need, 10u * 2 * 3 * sizeof(float));
  using Mutation = void (*)(RowSearch&);
  const std::pair<Mutation, StatusCode> cases[] = {
      {[](RowSearch& t) { t.blocks = 0; }, StatusCode::kInvalidArgument},
      {[](RowSearch& t) { t.blocks = 65536; }, StatusCode::kInvalidArgument},
      {[](RowSearch& t) { t.width = 0; }, StatusCode::kInvalidArgument},
      {[](RowSearch& t) { t.nq = 0; }, StatusCode::kInvalidArgument},
      {[](RowSearch& t) { t.top_k = 0; }, StatusCode::kInvalidArgument},
      {[](RowSearch& t) { t.top_k = kMaxSearchTopK + 1; }, StatusCode::kInvalidArgument},
      {[](RowSearch& t) { t.num_rows = size_t{1} << 31; }, StatusCode::kInvalidArgument},
      {[](RowSearch& t) { t.norm = static_cast<TokenNorm>(7); }, StatusCode::kInvalidArgument},
      {[](RowSearch& t) { t.agg = Aggregation::kTopP; }, StatusCode::kUnimplemented},
  };
  for (const auto& [mutate, want] : cases) {
    RowSearch t = s;
    mutate(t);
    EXPECT_EQ(SearchRowsWorkspaceBytes(t).status().code(), want);
    EXPECT_EQ(SearchRows(t, fake, need, fake, fake_rows, nullptr).code(), want);
  }
  EXPECT_EQ(SearchRows(s, fake, need - 1, fake, fake_rows, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(SearchRows(s, reinterpret_cast<char*>(fake) + 8, need, fake, fake_rows, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(SearchRows(s, fake, need, nullptr, fake_rows, nullptr).code(), StatusCode::kInvalidArgument);
  RowSearch t = s;
  t.rows = nullptr;
  EXPECT_EQ(SearchRows(t, fake, need, fake, fake_rows, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ScoreVotes(reinterpret_cast<char*>(fake) + 1, true, 4, 1, 8, fake, 1, fake, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(ScoreVotes(fake, true, 4, 1, 8, fake, 0, fake, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(VoteStats(fake, 4, 0, TokenNorm::kSoftmax, fake, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(AggregateVotes(fake, 4, 3, TokenNorm::kSoftmax, Aggregation::kMax, nullptr, fake, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(AggregateVotes(fake, 4, 3, TokenNorm::kNone, Aggregation::kTopP, nullptr, fake, nullptr).code(),
            StatusCode::kUnimplemented);
  EXPECT_EQ(TopKRows(fake, 4, 0, fake, 1 << 20, fake, fake_rows, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(TopKRows(fake, 5000, 8, fake, TopKWorkspaceBytes(5000, 8) - 1, fake, fake_rows, nullptr).code(),
            StatusCode::kInvalidArgument);
  // Nothing to do is fine and touches nothing.
  t = s;
  t.num_rows = 0;
  EXPECT_EQ(*SearchRowsWorkspaceBytes(t), 0u);
  EXPECT_TRUE(SearchRows(t, nullptr, 0, nullptr, nullptr, nullptr).ok());
  EXPECT_TRUE(VoteStats(fake, 4, 3, TokenNorm::kNone, nullptr, nullptr).ok());  // kNone has no statistics
  if (DeviceAvailable()) return;  // the fake pointers below would reach a kernel
  EXPECT_EQ(SearchRows(s, fake, need, fake, fake_rows, nullptr).code(), StatusCode::kUnavailable);
  EXPECT_EQ(ScoreVotes(fake, true, 4, 1, 8, fake, 1, fake, nullptr).code(), StatusCode::kUnavailable);
  EXPECT_EQ(VoteStats(fake, 4, 3, TokenNorm::kZScore, fake, nullptr).code(), StatusCode::kUnavailable);
  EXPECT_EQ(AggregateVotes(fake, 4, 3, TokenNorm::kNone, Aggregation::kMean, nullptr, fake, nullptr).code(),
            StatusCode::kUnavailable);
  EXPECT_EQ(TopKRows(fake, 4, 2, fake, TopKWorkspaceBytes(4, 2), fake, fake_rows, nullptr).code(),
            StatusCode::kUnavailable);
}

TEST(DeviceTier, OptionErrors) {
  DeviceTierOptions o;
  o.capacity_bytes = 0;
  EXPECT_EQ(DeviceTier::Open(o).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvagent::cuda
