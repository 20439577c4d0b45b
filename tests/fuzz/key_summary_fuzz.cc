// libFuzzer target: arbitrary bytes as a serialised KeySummary (kvagent/index.h), the compressed
// keys a store keeps per segment and an index reloads. Deserialize must reject or accept without
// crashing; an accepted summary is consistent and survives a round trip unchanged.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "kvagent/index.h"

using namespace kvagent;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto s = KeySummary::Deserialize(std::string_view(reinterpret_cast<const char*>(data), size));
  if (!s.ok()) return 0;
  const size_t n = s->layers.size() * static_cast<size_t>(s->num_kv_heads) * static_cast<size_t>(s->head_dim);
  if (s->min.size() != n || s->max.size() != n || s->mean.size() != n || s->num_tokens < 1) __builtin_trap();
  for (size_t i = 0; i < n; ++i)
    if (!(s->min[i] <= s->max[i])) __builtin_trap();
  auto again = KeySummary::Deserialize(s->Serialize(DType::kF32));
  if (!again.ok() || !(*again == *s)) __builtin_trap();
  return 0;
}
