#include "kvagent/segment.h"

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "kvagent/model_spec.h"

namespace kvagent {
namespace {

ModelSpec TinySpec() {
  RopeSpec rope;
  rope.theta = 10000;
  return UniformModelSpec("tiny", 2, 4, 2, 8, DType::kF32, rope, HashString("tiny-weights"));
}

Segment MakeSegment(const ModelSpec& spec, int tokens) {
  Segment s;
  s.model = spec.fingerprint;
  s.key = MemoryKey("ns", "s", 0, 0);
  s.layout = SegmentLayout::ForModel(spec, tokens);
  for (int t = 0; t < tokens; ++t) {
    s.tokens.push_back(t + 10);
    s.positions.push_back(t);
  }
  s.payload = Buffer::Allocate(s.layout.NumBytes()).value();
  return s;
}

TEST(ModelSpec, ValidateAndSerialize) {
  ModelSpec spec = TinySpec();
  spec.layers[1].sliding_window = 512;
  spec.layers[1].rope.theta = 1e6;
  spec.layers[1].rope.scaling = RopeScaling::kYarn;
  spec.layers[1].rope.factor = 4;
  ASSERT_TRUE(spec.Validate().ok());
  EXPECT_EQ(spec.KvBytesPerToken(), 2u * 2 * 2 * 8 * 4);
  auto back = ModelSpec::Deserialize(spec.Serialize());
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, spec);
  std::string bytes = spec.Serialize();
  bytes.resize(bytes.size() - 3);
  EXPECT_EQ(ModelSpec::Deserialize(bytes).status().code(), StatusCode::kDataLoss);

  ModelSpec bad = spec;
  bad.num_q_heads = 3;
  EXPECT_EQ(bad.Validate().code(), StatusCode::kInvalidArgument);
  bad = spec;
  bad.layers[0].rope.rotary_dim = 10;
  EXPECT_EQ(bad.Validate().code(), StatusCode::kInvalidArgument);
}

TEST(Segment, Validate) {
  ModelSpec spec = TinySpec();
  Segment s = MakeSegment(spec, 5);
  EXPECT_TRUE(s.ValidateFor(spec).ok());
  EXPECT_EQ(s.PayloadBytes(), 2u * 2 * 2 * 5 * 8 * 4);
  Segment wrong_model = s;
  wrong_model.model = HashString("other");
  EXPECT_EQ(wrong_model.ValidateFor(spec).code(), StatusCode::kFailedPrecondition);
  Segment short_tokens = s;
  short_tokens.tokens.pop_back();
  EXPECT_EQ(short_tokens.Validate().code(), StatusCode::kInvalidArgument);
  Segment wrong_bytes = s;
  wrong_bytes.payload = Buffer::Allocate(7).value();
  EXPECT_EQ(wrong_bytes.Validate().code(), StatusCode::kInvalidArgument);
  Segment wrong_dtype = s;
  wrong_dtype.layout.dtype = DType::kBF16;
  wrong_dtype.payload = Buffer::Allocate(wrong_dtype.layout.NumBytes()).value();
  EXPECT_EQ(wrong_dtype.ValidateFor(spec).code(), StatusCode::kInvalidArgument);
}

TEST(Segment, LayoutOffsets) {
  SegmentLayout l{3, 2, 4, 5, DType::kF16};
  EXPECT_EQ(l.Offset(0, 0, 0, 0), 0u);
  EXPECT_EQ(l.Offset(0, 0, 0, 1), 4u);
  EXPECT_EQ(l.Offset(0, 0, 1, 0), 20u);
  EXPECT_EQ(l.Offset(0, 1, 0, 0), 40u);
  EXPECT_EQ(l.Offset(1, 0, 0, 0), 80u);
  EXPECT_EQ(l.NumElements(), 240u);
}

TEST(Buffer, WrapReleasesOnce) {
  int released = 0;
  {
    std::byte storage[16];
    auto b = Buffer::Wrap(storage, sizeof(storage), [&] { ++released; });
    auto copy = b;
    EXPECT_EQ(copy->size(), 16u);
  }
  EXPECT_EQ(released, 1);
}

// The default allocator's alignment classes: 64 bytes, a page from 64 KiB (direct I/O straight
// from segment memory), 2 MiB from 4 MiB (transparent huge pages); every byte is usable.
TEST(Buffer, AllocateAlignsBySize) {
  if (std::string(Buffer::HostAllocatorName()) != "aligned") GTEST_SKIP() << "another host allocator is installed";
  for (const auto& [size, align] : std::vector<std::pair<size_t, size_t>>{
           {100, 64}, {64 << 10, 4096}, {(1 << 20) + 3, 4096}, {4 << 20, 2 << 20}, {(5 << 20) + 1, 2 << 20}}) {
    auto b = Buffer::Allocate(size);
    ASSERT_TRUE(b.ok());
    EXPECT_EQ(reinterpret_cast<uintptr_t>((*b)->data()) % align, 0u) << size;
    EXPECT_EQ((*b)->size(), size);
    std::memset((*b)->data(), 0x5a, size);
    EXPECT_EQ((*b)->data()[size - 1], std::byte{0x5a});
  }
}

}  // namespace
}  // namespace kvagent
