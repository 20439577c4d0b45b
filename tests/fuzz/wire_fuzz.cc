// libFuzzer target: the bounds checks of WireReader (kvagent/wire.h), which every format reader
// builds on. The input is both a program (which field to read next) and the bytes read: no read
// goes past the end, a failed read consumes at most its length prefix, every view points into the
// input.
#include <bit>  // kvagent/wire.h uses std::endian without including <bit>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "kvagent/wire.h"

using namespace kvagent;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const size_t nops = data[0] % 32;
  if (nops + 1 > size) return 0;
  std::string_view input(reinterpret_cast<const char*>(data + 1 + nops), size - 1 - nops);
  WireReader r(input);
  for (size_t i = 0; i < nops; ++i) {
    const size_t before = r.position();
    Status st;
    size_t width = 0;
    switch (data[1 + i] % 7) {
      case 0: { uint8_t v; st = r.U8(&v); width = 1; break; }
      case 1: { uint32_t v; st = r.U32(&v); width = 4; break; }
      case 2: { uint64_t v; st = r.U64(&v); width = 8; break; }
      case 3: { int32_t v; st = r.I32(&v); width = 4; break; }
      case 4: { double v; st = r.F64(&v); width = 8; break; }
      case 5: {
        std::string_view v;
        st = r.Bytes(&v);
        if (st.ok()) {
          if (v.data() < input.data() || v.data() + v.size() > input.data() + input.size()) __builtin_trap();
          width = 4 + v.size();
        }
        break;
      }
      default: { std::string v; st = r.String(&v); width = st.ok() ? 4 + v.size() : 0; break; }
    }
    if (st.ok() && r.position() != before + width) __builtin_trap();
    if (!st.ok() && (r.position() < before || r.position() > before + 4)) __builtin_trap();
    if (r.position() > input.size() || r.remaining() != input.size() - r.position()) __builtin_trap();
  }
  return 0;
}
