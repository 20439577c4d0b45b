#include "kvagent/hash.h"

#include <gtest/gtest.h>

#include <set>
#include <vector>

namespace kvagent {
namespace {

TEST(Hash, HexRoundTrip) {
  Hash128 h = HashString("kv-agent");
  auto back = Hash128::FromHex(h.ToHex());
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(*back, h);
  EXPECT_FALSE(Hash128::FromHex("xyz").ok());
  EXPECT_FALSE(Hash128::FromHex(std::string(32, 'g')).ok());
}

TEST(Hash, PrefixKeyChainsAndDistinguishes) {
  Hash128 model = HashString("model-a");
  std::vector<int32_t> a{1, 2, 3}, b{1, 2, 4};
  Hash128 ka = PrefixKey(model, {}, a);
  EXPECT_EQ(ka, PrefixKey(model, {}, a));
  EXPECT_NE(ka, PrefixKey(model, {}, b));
  EXPECT_NE(ka, PrefixKey(HashString("model-b"), {}, a));
  // Same tokens after a different parent are a different key.
  EXPECT_NE(PrefixKey(model, ka, a), PrefixKey(model, PrefixKey(model, {}, b), a));
}

TEST(Hash, MemoryKeyFieldsAreLengthPrefixed) {
  EXPECT_NE(MemoryKey("ab", "c", 1, 0), MemoryKey("a", "bc", 1, 0));
  EXPECT_NE(MemoryKey("ns", "s", 1, 0), MemoryKey("ns", "s", 1, 1));
  EXPECT_NE(MemoryKey("ns", "s", 1, 0), MemoryKey("ns", "s", 2, 0));
  EXPECT_EQ(MemoryKey("ns", "s", 7, 3), MemoryKey("ns", "s", 7, 3));
}

TEST(Hash, NoCollisionsOnManyKeys) {
  std::set<Hash128> seen;
  for (int t = 0; t < 20000; ++t) seen.insert(MemoryKey("ns", "session", t, t % 3));
  EXPECT_EQ(seen.size(), 20000u);
}

}  // namespace
}  // namespace kvagent
