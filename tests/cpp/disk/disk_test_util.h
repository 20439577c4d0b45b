// Helpers shared by the disk-tier tests: deterministic segments, comparison, temp dirs.
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <random>
#include <string>

#include "kvagent/disk_tier.h"
#include "kvagent/segment.h"
#include "temp_dir.h"

namespace kvagent::testing {

inline Hash128 TestModel(uint64_t n = 1) { return Hash128{0x1234 + n, 0xabcd}; }
inline Hash128 TestKey(uint64_t n) { return Hash128{n * 0x9e3779b97f4a7c15ULL + 1, n}; }

// A valid segment whose every byte derives from `seed`.
inline Segment MakeSegment(uint64_t key, uint64_t seed, SegmentLayout layout = {2, 2, 8, 5, DType::kF16},
                           Hash128 model = TestModel()) {
  std::mt19937_64 rng(seed);
  Segment s;
  s.key = TestKey(key);
  s.model = model;
  s.parent = Hash128{seed, key};
  s.layout = layout;
  s.pre_rope = (seed & 1) != 0;
  for (int t = 0; t < layout.num_tokens; ++t) {
    s.tokens.push_back(static_cast<int32_t>(rng() % 50000));
    s.positions.push_back(static_cast<int64_t>(100 + t));
  }
  s.meta.ns = "ns" + std::to_string(key % 3);
  s.meta.agent = "agent";
  s.meta.session = "s" + std::to_string(key % 5);
  s.meta.turn = static_cast<int64_t>(key);
  s.meta.role = "user";
  s.meta.text = "turn " + std::to_string(key) + " seed " + std::to_string(seed);
  s.meta.time_us = static_cast<int64_t>(1000 + key);
  s.summary = std::string(static_cast<size_t>(seed % 7), 'x');
  auto buf = Buffer::Allocate(layout.NumBytes());
  EXPECT_TRUE(buf.ok());
  s.payload = std::move(buf).value();
  if (layout.dtype == DType::kF32) {
    std::normal_distribution<float> nd(0.0f, 2.0f);
    for (size_t i = 0; i < layout.NumElements(); ++i) StoreFromF32(s.payload->data(), layout.dtype, i, nd(rng));
  } else {
    for (size_t i = 0; i < layout.NumBytes(); ++i) s.payload->data()[i] = static_cast<std::byte>(rng());
  }
  return s;
}

// Bit-exact equality of everything a tier stores.
inline ::testing::AssertionResult SameSegment(const Segment& a, const Segment& b) {
  if (a.key != b.key) return ::testing::AssertionFailure() << "key differs";
  if (a.model != b.model) return ::testing::AssertionFailure() << "model differs";
  if (a.parent != b.parent) return ::testing::AssertionFailure() << "parent differs";
  if (!(a.layout == b.layout)) return ::testing::AssertionFailure() << "layout differs";
  if (a.pre_rope != b.pre_rope) return ::testing::AssertionFailure() << "pre_rope differs";
  if (a.tokens != b.tokens) return ::testing::AssertionFailure() << "tokens differ";
  if (a.positions != b.positions) return ::testing::AssertionFailure() << "positions differ";
  if (!(a.meta == b.meta)) return ::testing::AssertionFailure() << "meta differs";
  if (a.summary != b.summary) return ::testing::AssertionFailure() << "summary differs";
  if (!a.payload || !b.payload || a.payload->size() != b.payload->size() ||
      std::memcmp(a.payload->data(), b.payload->data(), a.payload->size()) != 0)
    return ::testing::AssertionFailure() << "payload differs";
  return ::testing::AssertionSuccess();
}

}  // namespace kvagent::testing
