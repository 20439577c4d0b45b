#include "engines/llama_cpp/llama_kv_state.h"

#include <cstring>
#include <string>

namespace kvagent::llama_cpp {
namespace {

class Reader {
 public:
  explicit Reader(std::span<const uint8_t> b) : b_(b) {}
  template <typename T>
  bool Get(T* out) {
    if (pos_ + sizeof(T) > b_.size()) return false;
    std::memcpy(out, b_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return true;
  }
  bool Bytes(size_t n, std::vector<uint8_t>* out) {
    if (n > b_.size() - pos_) return false;
    out->assign(b_.begin() + pos_, b_.begin() + pos_ + n);
    pos_ += n;
    return true;
  }
  size_t left() const { return b_.size() - pos_; }

 private:
  std::span<const uint8_t> b_;
  size_t pos_ = 0;
};

template <typename T>
void Put(std::vector<uint8_t>* out, T v) {
  const auto* p = reinterpret_cast<const uint8_t*>(&v);
  out->insert(out->end(), p, p + sizeof(T));
}

Status Bad(const std::string& what) { return DataLossError("llama.cpp sequence state: " + what); }

}  // namespace

StatusOr<std::vector<KvCacheSection>> ParseKvState(std::span<const uint8_t> bytes, int num_sections) {
  Reader r(bytes);
  uint32_t magic = 0;
  int32_t seq_id = 0;
  if (!r.Get(&magic) || magic != kLlamaSeqStateMagic || !r.Get(&seq_id)) return Bad("wrong magic");
  std::vector<KvCacheSection> out(num_sections);
  for (KvCacheSection& s : out) {
    uint32_t n_stream = 0, cells = 0;
    if (!r.Get(&n_stream) || n_stream != 1) return Bad("expected one stream");
    if (!r.Get(&cells)) return Bad("truncated cell count");
    if (cells == 0) continue;
    s.positions.resize(cells);
    for (uint32_t i = 0; i < cells; ++i) {
      uint32_t n_seq = 0;
      int32_t seq = 0;
      if (!r.Get(&s.positions[i]) || !r.Get(&n_seq) || n_seq != 1 || !r.Get(&seq)) return Bad("bad cell metadata");
    }
    uint32_t v_trans = 0, n_layer = 0;
    if (!r.Get(&v_trans) || !r.Get(&n_layer)) return Bad("truncated layer header");
    if (v_trans != 0) return Bad("transposed V (flash attention off) is not supported");
    s.layers.resize(n_layer);
    for (auto& l : s.layers) {
      if (!r.Get(&l.k_type) || !r.Get(&l.k_row) || l.k_row == 0 || l.k_row > r.left() / cells ||
          !r.Bytes(l.k_row * cells, &l.k)) {
        return Bad("truncated keys");
      }
    }
    for (auto& l : s.layers) {
      if (!r.Get(&l.v_type) || !r.Get(&l.v_row) || l.v_row == 0 || l.v_row > r.left() / cells ||
          !r.Bytes(l.v_row * cells, &l.v)) {
        return Bad("truncated values");
      }
    }
  }
  if (r.left() != 0) return Bad(std::to_string(r.left()) + " trailing bytes");
  return out;
}

std::vector<uint8_t> SerializeKvState(const std::vector<KvCacheSection>& sections) {
  std::vector<uint8_t> out;
  Put<uint32_t>(&out, kLlamaSeqStateMagic);
  Put<int32_t>(&out, 0);
  for (const KvCacheSection& s : sections) {
    Put<uint32_t>(&out, 1);
    const auto cells = static_cast<uint32_t>(s.positions.size());
    Put<uint32_t>(&out, cells);
    if (cells == 0) continue;
    for (int32_t p : s.positions) {
      Put<int32_t>(&out, p);
      Put<uint32_t>(&out, 1);
      Put<int32_t>(&out, 0);
    }
    Put<uint32_t>(&out, 0);
    Put<uint32_t>(&out, static_cast<uint32_t>(s.layers.size()));
    for (const auto& l : s.layers) {
      Put<int32_t>(&out, l.k_type);
      Put<uint64_t>(&out, l.k_row);
      out.insert(out.end(), l.k.begin(), l.k.end());
    }
    for (const auto& l : s.layers) {
      Put<int32_t>(&out, l.v_type);
      Put<uint64_t>(&out, l.v_row);
      out.insert(out.end(), l.v.begin(), l.v.end());
    }
  }
  return out;
}

}  // namespace kvagent::llama_cpp
