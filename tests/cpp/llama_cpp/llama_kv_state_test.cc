// The llama.cpp per-sequence state layout (engines/llama_cpp/llama_kv_state.h): golden bytes,
// round trip, and malformed input.
#include "engines/llama_cpp/llama_kv_state.h"

#include <gtest/gtest.h>

#include <cstring>

namespace kvagent::llama_cpp {
namespace {

template <typename T>
void Put(std::vector<uint8_t>* out, T v) {
  const auto* p = reinterpret_cast<const uint8_t*>(&v);
  out->insert(out->end(), p, p + sizeof(T));
}

// Header, then one cache: two cells (positions 7, 8), one layer, f16 rows of 2 bytes... as llama.cpp
// state_write lays it out (llama-kv-cache.cpp).
std::vector<uint8_t> Header() {
  std::vector<uint8_t> b;
  Put<uint32_t>(&b, 0xaf143cd8);  // llama-context.cpp io_magic
  Put<int32_t>(&b, 0);            // seq_id
  return b;
}

// A cache's part without the header.
std::vector<uint8_t> Cache() {
  std::vector<uint8_t> b;
  Put<uint32_t>(&b, 1);  // n_stream
  Put<uint32_t>(&b, 2);  // cell_count
  for (int32_t p : {7, 8}) {
    Put<int32_t>(&b, p);
    Put<uint32_t>(&b, 1);  // n_seq_id
    Put<int32_t>(&b, 0);   // seq_id
  }
  Put<uint32_t>(&b, 0);  // v_trans
  Put<uint32_t>(&b, 1);  // n_layer
  Put<int32_t>(&b, 1);   // k type (GGML_TYPE_F16)
  Put<uint64_t>(&b, 2);  // k row bytes
  for (uint8_t x : {1, 2, 3, 4}) b.push_back(x);
  Put<int32_t>(&b, 8);   // v type (GGML_TYPE_Q8_0)
  Put<uint64_t>(&b, 3);
  for (uint8_t x : {5, 6, 7, 8, 9, 10}) b.push_back(x);
  return b;
}

std::vector<uint8_t> Golden() {
  std::vector<uint8_t> b = Header();
  std::vector<uint8_t> c = Cache();
  b.insert(b.end(), c.begin(), c.end());
  return b;
}

TEST(LlamaKvState, ParsesGoldenLayout) {
  auto r = ParseKvState(Golden(), 1);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->size(), 1u);
  const KvCacheSection& s = (*r)[0];
  EXPECT_EQ(s.positions, (std::vector<int32_t>{7, 8}));
  ASSERT_EQ(s.layers.size(), 1u);
  EXPECT_EQ(s.layers[0].k_type, 1);
  EXPECT_EQ(s.layers[0].k_row, 2u);
  EXPECT_EQ(s.layers[0].k, (std::vector<uint8_t>{1, 2, 3, 4}));
  EXPECT_EQ(s.layers[0].v_type, 8);
  EXPECT_EQ(s.layers[0].v, (std::vector<uint8_t>{5, 6, 7, 8, 9, 10}));
}

TEST(LlamaKvState, SerializeIsTheInverse) {
  auto r = ParseKvState(Golden(), 1);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(SerializeKvState(*r), Golden());
}

TEST(LlamaKvState, EmptySectionAndTwoSections) {
  std::vector<uint8_t> b = Header();
  Put<uint32_t>(&b, 1);
  Put<uint32_t>(&b, 0);  // empty cache
  std::vector<uint8_t> c = Cache();
  b.insert(b.end(), c.begin(), c.end());
  auto r = ParseKvState(b, 2);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE((*r)[0].positions.empty());
  EXPECT_EQ((*r)[1].positions.size(), 2u);
  EXPECT_EQ(SerializeKvState(*r), b);
}

TEST(LlamaKvState, MalformedInputIsDataLoss) {
  const std::vector<uint8_t> g = Golden();
  for (size_t cut = 0; cut < g.size(); ++cut) {
    auto r = ParseKvState(std::span<const uint8_t>(g.data(), cut), 1);
    ASSERT_FALSE(r.ok()) << "prefix of " << cut << " bytes parsed";
    EXPECT_EQ(r.status().code(), StatusCode::kDataLoss);
  }
  std::vector<uint8_t> trailing = g;
  trailing.push_back(0);
  EXPECT_EQ(ParseKvState(trailing, 1).status().code(), StatusCode::kDataLoss);
  std::vector<uint8_t> vtrans = g;
  const size_t vt_off = 8 + 8 + 2 * 12;  // after the header, n_stream, cell_count and two cells
  vtrans[vt_off] = 1;
  EXPECT_EQ(ParseKvState(vtrans, 1).status().code(), StatusCode::kDataLoss);
  std::vector<uint8_t> magic = g;
  magic[0] ^= 1;
  EXPECT_EQ(ParseKvState(magic, 1).status().code(), StatusCode::kDataLoss);
  std::vector<uint8_t> streams = g;
  streams[8] = 2;
  EXPECT_EQ(ParseKvState(streams, 1).status().code(), StatusCode::kDataLoss);
  EXPECT_EQ(ParseKvState(g, 2).status().code(), StatusCode::kDataLoss);  // second cache missing
}

}  // namespace
}  // namespace kvagent::llama_cpp
