// libFuzzer target: arbitrary bytes as a serialised ModelSpec (kvagent/model_spec.h), as stored
// next to segments. Deserialize must reject or accept without crashing; an accepted spec is
// valid and survives a round trip unchanged.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "kvagent/model_spec.h"

using namespace kvagent;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto s = ModelSpec::Deserialize(std::string_view(reinterpret_cast<const char*>(data), size));
  if (!s.ok()) return 0;
  if (!s->Validate().ok()) __builtin_trap();
  (void)s->KvBytesPerToken();
  (void)s->EffectiveAttnScale();
  auto again = ModelSpec::Deserialize(s->Serialize());
  if (!again.ok() || !(*again == *s)) __builtin_trap();
  return 0;
}
