// Little-endian field encoding used by every on-disk and on-wire format of kv-agent (store
// records, catalogs, serialised specs). Writers append to a std::string; WireReader reads with
// bounds checks and reports DataLoss on truncated or malformed input (never reads out of range).
// Thread-safety: values, no shared state.
#pragma once

#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>

#include "kvagent/status.h"

namespace kvagent {

static_assert(std::endian::native == std::endian::little, "kv-agent formats assume little-endian hosts");

inline void PutU8(std::string* out, uint8_t v) { out->push_back(static_cast<char>(v)); }
inline void PutU32(std::string* out, uint32_t v) { out->append(reinterpret_cast<const char*>(&v), 4); }
inline void PutU64(std::string* out, uint64_t v) { out->append(reinterpret_cast<const char*>(&v), 8); }
inline void PutI64(std::string* out, int64_t v) { PutU64(out, static_cast<uint64_t>(v)); }
inline void PutF64(std::string* out, double v) { out->append(reinterpret_cast<const char*>(&v), 8); }
// u32 length then bytes.
inline void PutBytes(std::string* out, std::string_view s) {
  PutU32(out, static_cast<uint32_t>(s.size()));
  out->append(s);
}

class WireReader {
 public:
  explicit WireReader(std::string_view data) : data_(data) {}

  Status U8(uint8_t* v) { return Fixed(v, 1); }
  Status U32(uint32_t* v) { return Fixed(v, 4); }
  Status U64(uint64_t* v) { return Fixed(v, 8); }
  Status I64(int64_t* v) { return Fixed(v, 8); }
  Status F64(double* v) { return Fixed(v, 8); }
  Status I32(int32_t* v) { return Fixed(v, 4); }
  // Length-prefixed bytes; the view points into the input.
  Status Bytes(std::string_view* v) {
    uint32_t n = 0;
    KVAGENT_RETURN_IF_ERROR(U32(&n));
    if (n > remaining()) return DataLossError("truncated field: need " + std::to_string(n) + " bytes, have " + std::to_string(remaining()));
    *v = data_.substr(pos_, n);
    pos_ += n;
    return Status::Ok();
  }
  Status String(std::string* v) {
    std::string_view s;
    KVAGENT_RETURN_IF_ERROR(Bytes(&s));
    v->assign(s);
    return Status::Ok();
  }
  size_t remaining() const { return data_.size() - pos_; }
  size_t position() const { return pos_; }

 private:
  template <typename T>
  Status Fixed(T* v, size_t n) {
    if (n > remaining()) return DataLossError("truncated input");
    std::memcpy(v, data_.data() + pos_, n);
    pos_ += n;
    return Status::Ok();
  }
  std::string_view data_;
  size_t pos_ = 0;
};

}  // namespace kvagent
