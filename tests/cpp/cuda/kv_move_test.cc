// GPU KV moves against a CPU reference (double-precision rotation) over a grid of awkward
// shapes: every dtype, head dims 64/80/128/256, odd token counts, several spans with token
// offsets, paged (block 16/32, separate and fused K|V), token-major, head-major with spare
// capacity, padded strides (narrow vector paths), misaligned canonical data, int8 sources,
// partial rotary, interleaved pairs, NoPE / llama3 / yarn layers, positions near 2^20.
// Outputs are poisoned (all-ones bytes, a NaN in every dtype) before each run; every element
// is checked: written ones bit-exactly (copies) or within rounding (rotations), the rest must
// still hold the poison.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kvagent/cuda_kv.h"
#include "kvagent/device_tier.h"
#include "kvagent/dtype.h"
#include "kvagent/segment.h"

namespace kvagent::cuda {
namespace {

#define CUDA_OK(expr)                                                      \
  do {                                                                     \
    cudaError_t e_ = (expr);                                               \
    ASSERT_EQ(e_, cudaSuccess) << #expr << ": " << cudaGetErrorString(e_); \
  } while (0)

enum class Layout { kPaged, kPagedFused, kTokenMajor, kHeadMajor, kPaddedPaged };

const char* LayoutName(Layout l) {
  switch (l) {
    case Layout::kPaged:
      return "paged";
    case Layout::kPagedFused:
      return "paged_fused";
    case Layout::kTokenMajor:
      return "token_major";
    case Layout::kHeadMajor:
      return "head_major";
    case Layout::kPaddedPaged:
      return "padded_paged";
  }
  return "?";
}

struct Case {
  DType dtype = DType::kBF16;
  int head_dim = 128;
  int heads = 3;
  int layers = 4;             // model layers: 0 default, 1 llama3, 2 yarn, 3 NoPE (repeating)
  bool uniform_rope = false;  // every layer llama3 (one shared table)
  int layer_begin = 0;
  int num_layers = -1;  // -1: layers - layer_begin
  Layout layout = Layout::kPaged;
  int block_size = 16;
  int pad = 0;  // extra elements per head row (kPaddedPaged)
  Rotation rotation = Rotation::kNone;
  bool save = false;  // SaveFromEngine instead of LoadToEngine
  bool int8 = false;
  bool interleaved = false;
  int rotary_dim = 0;  // 0: head_dim
  std::vector<int> span_tokens = {17, 1, 33};
  bool misalign = false;  // canonical data one element past an aligned address
  bool null_slots = false;
  bool null_positions = false;
  bool pinned_source = false;  // canonical spans in mapped pinned host memory

  std::string Name() const {
    std::string n = std::string(DTypeName(dtype)) + " D" + std::to_string(head_dim) + " H" + std::to_string(heads) +
                    " " + LayoutName(layout) + " bs" + std::to_string(block_size) + " rot" +
                    std::to_string(static_cast<int>(rotation)) + (save ? " save" : " load") + (int8 ? " int8" : "") +
                    (interleaved ? " interleaved" : "") + " rd" + std::to_string(rotary_dim) + " pad" +
                    std::to_string(pad) + (misalign ? " misaligned" : "") + (null_slots ? " null_slots" : "") +
                    (null_positions ? " null_pos" : "") + (pinned_source ? " pinned" : "") + " layers[" +
                    std::to_string(layer_begin) + "," + std::to_string(num_layers) + "] of " + std::to_string(layers) +
                    (uniform_rope ? " uniform" : "");
    return n;
  }
};

ModelSpec SpecFor(const Case& c) {
  ModelSpec m;
  m.name = "test";
  m.num_layers = c.layers;
  m.num_q_heads = c.heads * 4;
  m.num_kv_heads = c.heads;
  m.head_dim = c.head_dim;
  m.kv_dtype = c.dtype;
  m.fingerprint = HashString("weights");
  for (int l = 0; l < c.layers; ++l) {
    LayerSpec ls;
    RopeSpec& r = ls.rope;
    r.rotary_dim = c.rotary_dim;
    r.style = c.interleaved ? RopeStyle::kInterleaved : RopeStyle::kHalfSplit;
    switch (c.uniform_rope ? 1 : l % 4) {
      case 0:
        r.theta = 10000;
        break;
      case 1:
        r.theta = 500000;
        r.scaling = RopeScaling::kLlama3;
        r.factor = 8;
        r.original_max_position = 8192;
        break;
      case 2:
        r.theta = 1000000;
        r.scaling = RopeScaling::kYarn;
        r.factor = 4;
        r.original_max_position = 32768;
        break;
      case 3:
        r.enabled = false;
        break;
    }
    m.layers.push_back(ls);
  }
  return m;
}

// Host image of a tensor of dtype `t` as raw bytes.
struct HostTensor {
  DType t;
  std::vector<unsigned char> bytes;
  size_t n = 0;
  HostTensor(DType type, size_t count) : t(type), bytes(count * DTypeSize(type), 0xFF), n(count) {}
  float Get(size_t i) const { return LoadAsF32(bytes.data(), t, i); }
  void Set(size_t i, float v) { StoreFromF32(bytes.data(), t, i, v); }
  uint32_t Bits(size_t i) const {
    uint32_t b = 0;
    std::memcpy(&b, bytes.data() + i * DTypeSize(t), DTypeSize(t));
    return b;
  }
  bool IsPoison(size_t i) const {
    for (size_t k = 0; k < DTypeSize(t); ++k)
      if (bytes[i * DTypeSize(t) + k] != 0xFF) return false;
    return true;
  }
};

// Expected value of one element: poison, exact bits, or a double with a tolerance.
struct Expect {
  enum Kind : uint8_t { kPoison, kExact, kNear } kind = kPoison;
  uint32_t bits = 0;
  double value = 0;
  double tol = 0;
};

double RelUlp(DType t) {
  switch (t) {
    case DType::kBF16:
      return std::ldexp(1.0, -8);
    case DType::kF16:
      return std::ldexp(1.0, -11);
    default:
      return std::ldexp(1.0, -24);
  }
}

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) {
    if (cudaMalloc(&p_, bytes + 64) != cudaSuccess) p_ = nullptr;
    n_ = bytes;
  }
  ~DeviceBuffer() {
    if (p_) cudaFree(p_);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr; }
  char* get() const { return static_cast<char*>(p_); }

 private:
  void* p_ = nullptr;
  size_t n_ = 0;
};

class PinnedBuffer {
 public:
  explicit PinnedBuffer(size_t bytes) {
    if (cudaHostAlloc(&p_, bytes + 64, cudaHostAllocMapped | cudaHostAllocPortable) != cudaSuccess) p_ = nullptr;
  }
  ~PinnedBuffer() {
    if (p_) cudaFreeHost(p_);
  }
  char* get() const { return static_cast<char*>(p_); }

 private:
  void* p_ = nullptr;
};

void RunCase(const Case& c, uint32_t seed) {
  SCOPED_TRACE(c.Name());
  std::mt19937_64 rng(seed);
  const ModelSpec spec = SpecFor(c);
  ASSERT_TRUE(spec.Validate().ok()) << spec.Validate().ToString();
  const int L = c.layers, H = c.heads, D = c.head_dim;
  const int nl = c.num_layers < 0 ? L - c.layer_begin : c.num_layers;
  const size_t es = DTypeSize(c.dtype);

  // ---- spans: each its own canonical segment with spare tokens around the moved range ----
  struct SpanHost {
    int total, begin, count;
    HostTensor data;  // dtype, or unused for int8
    std::vector<int8_t> q;
    std::vector<float> scales;
  };
  std::vector<SpanHost> spans;
  std::uniform_real_distribution<float> val(-2.f, 2.f);
  std::uniform_int_distribution<int> qd(-127, 127);
  std::uniform_real_distribution<float> sd(1e-3f, 5e-2f);
  int rows = 0;
  for (size_t i = 0; i < c.span_tokens.size(); ++i) {
    const int count = c.span_tokens[i];
    const int begin = static_cast<int>(i % 3);  // 0, 1, 2: token offsets inside the segment
    const int total = begin + count + static_cast<int>(i % 2) * 3;
    const size_t elems = static_cast<size_t>(L) * 2 * H * total * D;
    SpanHost s{total, begin, count, HostTensor(c.dtype, elems), {}, {}};
    if (c.int8) {
      s.q.resize(elems);
      for (auto& q : s.q) q = static_cast<int8_t>(qd(rng));
      s.scales.resize(static_cast<size_t>(L) * 2 * H * D);
      for (auto& x : s.scales) x = sd(rng);
    } else if (!c.save) {
      for (size_t e = 0; e < elems; ++e) s.data.Set(e, val(rng));
    }
    spans.push_back(std::move(s));
    rows += count;
  }

  // ---- engine geometry ----
  const int bs = (c.layout == Layout::kPaged || c.layout == Layout::kPagedFused || c.layout == Layout::kPaddedPaged)
                     ? c.block_size
                     : 1;
  const int64_t num_slots = (rows + 7 + bs - 1) / bs * bs + bs;  // spare slots that stay untouched
  const int64_t num_blocks = num_slots / bs;
  EngineKvView view;
  int64_t layer_elems = 0;  // elements of one layer's K (or V) allocation
  int64_t v_offset = 0;     // fused: V after K in the same allocation
  switch (c.layout) {
    case Layout::kPaged:
    case Layout::kPagedFused:
      layer_elems = num_slots * H * D;
      view = EngineKvView::Paged(c.dtype, H, D, bs, num_blocks, {}, {});
      if (c.layout == Layout::kPagedFused) v_offset = layer_elems;
      break;
    case Layout::kPaddedPaged:
      view = EngineKvView::Paged(c.dtype, H, D, bs, num_blocks, {}, {});
      view.stride_head = D + c.pad;
      view.stride_slot = static_cast<int64_t>(H) * (D + c.pad) + c.pad;
      view.stride_block = view.stride_slot * bs + c.pad;
      layer_elems = view.stride_block * num_blocks;
      break;
    case Layout::kTokenMajor:
      view = EngineKvView::TokenMajor(c.dtype, H, D, num_slots, {}, {});
      layer_elems = num_slots * H * D;
      break;
    case Layout::kHeadMajor:
      view = EngineKvView::HeadMajor(c.dtype, H, D, num_slots, {}, {});
      layer_elems = num_slots * H * D;
      break;
  }
  const int64_t alloc_elems = c.layout == Layout::kPagedFused ? 2 * layer_elems : layer_elems;
  // One allocation per (layer, K/V) (fused: per layer), all poisoned or filled.
  const int n_allocs = c.layout == Layout::kPagedFused ? nl : 2 * nl;
  std::vector<DeviceBuffer> eng_dev;
  std::vector<HostTensor> eng_host;  // initial contents
  for (int a = 0; a < n_allocs; ++a) {
    eng_dev.emplace_back(alloc_elems * es);
    ASSERT_NE(eng_dev.back().get(), nullptr);
    HostTensor h(c.dtype, static_cast<size_t>(alloc_elems));
    if (c.save)
      for (size_t e = 0; e < h.n; ++e) h.Set(e, val(rng));
    CUDA_OK(cudaMemcpy(eng_dev.back().get(), h.bytes.data(), h.bytes.size(), cudaMemcpyHostToDevice));
    eng_host.push_back(std::move(h));
  }
  // Address of (launch layer l, kv) -> (allocation index, element offset of the allocation start).
  auto alloc_of = [&](int l, int kv) -> std::pair<int, int64_t> {
    if (c.layout == Layout::kPagedFused) return {l, kv ? v_offset : 0};
    return {2 * l + kv, 0};
  };
  for (int l = 0; l < nl; ++l) {
    auto [ak, ok] = alloc_of(l, 0);
    auto [av, ov] = alloc_of(l, 1);
    view.k_layers.push_back(eng_dev[ak].get() + ok * es);
    view.v_layers.push_back(eng_dev[av].get() + ov * es);
  }
  auto eng_off = [&](int64_t slot, int head, int d) {
    return (slot / bs) * view.stride_block + (slot % bs) * view.stride_slot + head * view.stride_head + d;
  };

  // ---- rows: slots and positions ----
  std::vector<int64_t> slots(rows), pos_new(rows), pos_old(rows);
  {
    std::vector<int64_t> perm(num_slots);
    for (int64_t i = 0; i < num_slots; ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int r = 0; r < rows; ++r) slots[r] = perm[r];
    if (rows > 4) {
      slots[1] = -1;                // skipped rows
      slots[rows - 2] = num_slots;  // out of range: skipped too
    }
  }
  const int64_t slot_base = 3;
  const int64_t new_base = 1000003, old_base = 17;
  std::uniform_int_distribution<int64_t> pd(0, int64_t{1} << 20);
  for (int r = 0; r < rows; ++r) {
    pos_new[r] = pd(rng);
    pos_old[r] = pd(rng);
  }
  if (c.null_slots)
    for (int r = 0; r < rows; ++r) slots[r] = slot_base + r;
  if (c.null_positions)
    for (int r = 0; r < rows; ++r) {
      pos_new[r] = new_base + r;
      pos_old[r] = old_base + r;
    }
  DeviceBuffer slots_dev(rows * 8), pn_dev(rows * 8), po_dev(rows * 8);
  CUDA_OK(cudaMemcpy(slots_dev.get(), slots.data(), rows * 8, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(pn_dev.get(), pos_new.data(), rows * 8, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(po_dev.get(), pos_old.data(), rows * 8, cudaMemcpyHostToDevice));

  // ---- canonical buffers on the device (or pinned host) ----
  std::vector<DeviceBuffer> can_dev;
  std::vector<std::unique_ptr<PinnedBuffer>> can_pinned;
  std::vector<DeviceBuffer> scale_dev;
  std::vector<CanonicalSpan> cspans;
  for (const SpanHost& s : spans) {
    const size_t bytes = c.int8 ? s.q.size() : s.data.bytes.size();
    const void* src = c.int8 ? static_cast<const void*>(s.q.data()) : s.data.bytes.data();
    const size_t shift = c.misalign ? (c.int8 ? 1 : es) : 0;
    char* base;
    if (c.pinned_source) {
      can_pinned.push_back(std::make_unique<PinnedBuffer>(bytes + 64));
      ASSERT_NE(can_pinned.back()->get(), nullptr);
      base = can_pinned.back()->get() + shift;
      std::memcpy(base, src, bytes);
      auto mapped = MappedDevicePointer(base);
      ASSERT_TRUE(mapped.ok()) << mapped.status().ToString();
      base = const_cast<char*>(static_cast<const char*>(mapped.value()));
    } else {
      can_dev.emplace_back(bytes + 64);
      ASSERT_NE(can_dev.back().get(), nullptr);
      base = can_dev.back().get() + shift;
      CUDA_OK(cudaMemcpy(base, src, bytes, cudaMemcpyHostToDevice));
    }
    CanonicalSpan cs;
    cs.data = base;
    cs.total_tokens = s.total;
    cs.token_begin = s.begin;
    cs.num_tokens = s.count;
    if (c.int8) {
      scale_dev.emplace_back(s.scales.size() * 4);
      CUDA_OK(cudaMemcpy(scale_dev.back().get(), s.scales.data(), s.scales.size() * 4, cudaMemcpyHostToDevice));
      cs.scales = reinterpret_cast<const float*>(scale_dev.back().get());
    }
    cspans.push_back(cs);
  }

  auto rope = RopeDeviceTable::Create(spec);
  ASSERT_TRUE(rope.ok()) << rope.status().ToString();
  MoveOptions o;
  o.layer_begin = c.layer_begin;
  o.num_layers = c.num_layers;
  o.int8_source = c.int8;
  o.canonical_dtype = c.dtype;
  o.rotation = c.rotation;
  o.rope = rope.value().get();
  o.slots = c.null_slots ? nullptr : reinterpret_cast<const int64_t*>(slots_dev.get());
  o.slot_base = slot_base;
  o.new_positions = c.null_positions ? nullptr : reinterpret_cast<const int64_t*>(pn_dev.get());
  o.new_position_base = new_base;
  o.old_positions = c.null_positions ? nullptr : reinterpret_cast<const int64_t*>(po_dev.get());
  o.old_position_base = old_base;

  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  Status st = c.save ? SaveFromEngine(cspans, view, o, stream) : LoadToEngine(cspans, view, o, stream);
  ASSERT_TRUE(st.ok()) << st.ToString();
  CUDA_OK(cudaStreamSynchronize(stream));
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaStreamDestroy(stream));

  // ---- reference ----
  std::vector<RopeTable> tables;
  for (int l = 0; l < L; ++l) tables.push_back(ComputeRopeTable(spec.layers[l].rope, D).value());
  auto src_value = [&](const SpanHost& s, int l, int kv, int h, int tok, int d) -> double {
    const size_t idx = ((static_cast<size_t>(l) * 2 + kv) * H + h) * s.total * D + static_cast<size_t>(tok) * D + d;
    if (c.int8)
      return static_cast<double>(static_cast<float>(s.q[idx]) *
                                 s.scales[(static_cast<size_t>(l) * 2 + kv) * H * D + h * D + d]);
    return s.data.Get(idx);
  };
  auto src_bits = [&](const SpanHost& s, int l, int kv, int h, int tok, int d) -> uint32_t {
    const size_t idx = ((static_cast<size_t>(l) * 2 + kv) * H + h) * s.total * D + static_cast<size_t>(tok) * D + d;
    if (c.int8) {
      HostTensor one(c.dtype, 1);
      one.Set(0, static_cast<float>(s.q[idx]) * s.scales[(static_cast<size_t>(l) * 2 + kv) * H * D + h * D + d]);
      return one.Bits(0);
    }
    return s.data.Bits(idx);
  };
  // Reads element d of a row from the source side as double / exact bits.
  // Fills `row_out[d]` with the expected result of one (layer, kv, head, row).
  auto expect_row = [&](int model_layer, int kv, auto&& get_val, auto&& get_bits, int64_t pn, int64_t po,
                        std::vector<Expect>& out) {
    const RopeTable& tb = tables[model_layer];
    const int rd = (c.rotation == Rotation::kNone || kv == 1) ? 0 : tb.rotary_dim;
    for (int d = 0; d < D; ++d) {
      out[d].kind = Expect::kExact;
      out[d].bits = get_bits(d);
    }
    if (rd == 0 && !c.int8) return;
    for (int d = 0; d < D; ++d)
      if (c.int8) out[d].bits = get_bits(d);  // dequantised and rounded: exact too
    if (rd == 0) return;
    int64_t p;
    double scale;
    switch (c.rotation) {
      case Rotation::kApply:
        p = pn;
        scale = tb.attention_factor;
        break;
      case Rotation::kInverse:
        p = -po;
        scale = 1.0 / static_cast<double>(static_cast<float>(tb.attention_factor));
        break;
      default:
        p = pn - po;
        scale = 1.0;
        break;
    }
    if (c.rotation == Rotation::kApply) scale = static_cast<float>(tb.attention_factor);
    for (int i = 0; i < rd / 2; ++i) {
      const int a = c.interleaved ? 2 * i : i;
      const int b = c.interleaved ? 2 * i + 1 : i + rd / 2;
      const double th = static_cast<double>(p) * tb.inv_freq[i];
      const double cs = std::cos(th), sn = std::sin(th);
      const double xa = get_val(a), xb = get_val(b);
      const double ya = (xa * cs - xb * sn) * scale, yb = (xb * cs + xa * sn) * scale;
      const double mag = (std::fabs(xa) + std::fabs(xb)) * scale;
      out[a] = Expect{Expect::kNear, 0, ya, RelUlp(c.dtype) * std::fabs(ya) * 1.01 + 4e-6 * mag + 1e-7};
      out[b] = Expect{Expect::kNear, 0, yb, RelUlp(c.dtype) * std::fabs(yb) * 1.01 + 4e-6 * mag + 1e-7};
    }
  };

  int failures = 0;
  double err2 = 0, ref2 = 0;
  auto check = [&](const HostTensor& got, size_t idx, const Expect& e, const std::string& where) {
    bool ok = true;
    if (e.kind == Expect::kPoison) {
      ok = got.IsPoison(idx);
    } else if (e.kind == Expect::kExact) {
      ok = got.Bits(idx) == e.bits;
    } else {
      const double g = got.Get(idx);
      ok = std::isfinite(g) && std::fabs(g - e.value) <= e.tol;
      err2 += (g - e.value) * (g - e.value);
      ref2 += e.value * e.value;
    }
    if (!ok && ++failures <= 5)
      ADD_FAILURE() << where << " element " << idx << ": got bits " << std::hex << got.Bits(idx) << std::dec << " ("
                    << got.Get(idx) << "), want kind " << int(e.kind) << " bits " << std::hex << e.bits << std::dec
                    << " value " << e.value << " tol " << e.tol;
  };

  std::vector<Expect> row(D);
  if (!c.save) {
    // Expected engine images: initial poison plus every moved row.
    std::vector<std::vector<Expect>> want(n_allocs, std::vector<Expect>(alloc_elems));
    int r = 0;
    for (const SpanHost& s : spans) {
      for (int t = 0; t < s.count; ++t, ++r) {
        const int64_t slot = c.null_slots ? slot_base + r : slots[r];
        if (slot < 0 || slot >= num_slots) continue;
        const int64_t pn = pos_new[r], po = pos_old[r];
        for (int l = 0; l < nl; ++l)
          for (int kv = 0; kv < 2; ++kv)
            for (int h = 0; h < H; ++h) {
              const int ml = c.layer_begin + l;
              expect_row(
                  ml, kv, [&](int d) { return src_value(s, ml, kv, h, s.begin + t, d); },
                  [&](int d) { return src_bits(s, ml, kv, h, s.begin + t, d); }, pn, po, row);
              auto [ai, a0] = alloc_of(l, kv);
              for (int d = 0; d < D; ++d) want[ai][a0 + eng_off(slot, h, d)] = row[d];
            }
      }
    }
    for (int a = 0; a < n_allocs && failures < 5; ++a) {
      HostTensor got(c.dtype, static_cast<size_t>(alloc_elems));
      CUDA_OK(cudaMemcpy(got.bytes.data(), eng_dev[a].get(), got.bytes.size(), cudaMemcpyDeviceToHost));
      for (int64_t i = 0; i < alloc_elems; ++i) check(got, i, want[a][i], "engine alloc " + std::to_string(a));
    }
  } else {
    int r = 0;
    for (size_t si = 0; si < spans.size(); ++si) {
      const SpanHost& s = spans[si];
      const size_t elems = static_cast<size_t>(L) * 2 * H * s.total * D;
      std::vector<Expect> want(elems);
      for (int t = 0; t < s.count; ++t, ++r) {
        const int64_t slot = c.null_slots ? slot_base + r : slots[r];
        if (slot < 0 || slot >= num_slots) continue;
        for (int l = 0; l < nl; ++l)
          for (int kv = 0; kv < 2; ++kv)
            for (int h = 0; h < H; ++h) {
              auto [ai, a0] = alloc_of(l, kv);
              const HostTensor& src = eng_host[ai];
              const int64_t base = a0 + eng_off(slot, h, 0);
              expect_row(
                  c.layer_begin + l, kv, [&](int d) { return static_cast<double>(src.Get(base + d)); },
                  [&](int d) { return src.Bits(base + d); }, pos_new[r], pos_old[r], row);
              const size_t cbase = ((static_cast<size_t>(c.layer_begin + l) * 2 + kv) * H + h) * s.total * D +
                                   static_cast<size_t>(s.begin + t) * D;
              for (int d = 0; d < D; ++d) want[cbase + d] = row[d];
            }
      }
      HostTensor got(c.dtype, elems);
      CUDA_OK(cudaMemcpy(got.bytes.data(), cspans[si].data, got.bytes.size(), cudaMemcpyDeviceToHost));
      for (size_t i = 0; i < elems && failures < 5; ++i) check(got, i, want[i], "span " + std::to_string(si));
    }
  }
  EXPECT_EQ(failures, 0);
  if (ref2 > 0) {
    const double rel = std::sqrt(err2 / ref2);
    EXPECT_LT(rel, c.dtype == DType::kBF16 ? 5e-3 : (c.dtype == DType::kF16 ? 1e-3 : 2e-6)) << "relative L2 error";
  }
}

class KvMoveGrid : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!DeviceAvailable()) GTEST_FAIL() << "gpu test needs a CUDA device: " << CheckDevice().ToString();
  }
};

const DType kDTypes[] = {DType::kBF16, DType::kF16, DType::kF32};
const int kHeadDims[] = {64, 80, 128, 256};

TEST_F(KvMoveGrid, LayoutsDtypesHeadDimsWithRotation) {
  uint32_t seed = 1;
  for (DType dt : kDTypes)
    for (int D : kHeadDims)
      for (Layout lay : {Layout::kPaged, Layout::kPagedFused, Layout::kTokenMajor, Layout::kHeadMajor}) {
        Case c;
        c.dtype = dt;
        c.head_dim = D;
        c.layout = lay;
        c.block_size = (D == 80 || D == 256) ? 32 : 16;
        c.heads = D == 256 ? 1 : (D == 80 ? 3 : 8);
        c.rotation = Rotation::kApply;
        RunCase(c, seed++);
        if (HasFailure()) return;
      }
}

TEST_F(KvMoveGrid, PlainCopiesAreBitExact) {
  uint32_t seed = 100;
  for (DType dt : kDTypes)
    for (int D : kHeadDims) {
      Case c;
      c.dtype = dt;
      c.head_dim = D;
      c.block_size = 32;
      c.rotation = Rotation::kNone;
      c.span_tokens = {5, 31, 1, 64, 3};
      RunCase(c, seed++);
      c.save = true;
      RunCase(c, seed++);
      if (HasFailure()) return;
    }
}

TEST_F(KvMoveGrid, InverseShiftAndSave) {
  uint32_t seed = 200;
  for (DType dt : kDTypes)
    for (int D : kHeadDims) {
      Case c;
      c.dtype = dt;
      c.head_dim = D;
      c.rotation = Rotation::kInverse;
      c.save = true;  // capture: engine post-RoPE -> canonical pre-RoPE
      RunCase(c, seed++);
      c.save = false;
      c.rotation = Rotation::kShift;
      c.layout = Layout::kPagedFused;
      RunCase(c, seed++);
      if (HasFailure()) return;
    }
}

TEST_F(KvMoveGrid, Int8DequantisationFused) {
  uint32_t seed = 300;
  for (DType dt : kDTypes)
    for (int D : kHeadDims)
      for (Rotation rot : {Rotation::kNone, Rotation::kApply}) {
        Case c;
        c.dtype = dt;
        c.head_dim = D;
        c.int8 = true;
        c.rotation = rot;
        c.block_size = 32;
        RunCase(c, seed++);
        if (HasFailure()) return;
      }
}

TEST_F(KvMoveGrid, AwkwardViewsAndVariants) {
  uint32_t seed = 400;
  for (DType dt : kDTypes) {
    Case base;
    base.dtype = dt;
    base.rotation = Rotation::kApply;
    // Padded strides force narrower vectors: pad 4 (bf16/f16 -> 4-wide), pad 1 (scalar path).
    for (int pad : {4, 1, 2}) {
      Case c = base;
      c.layout = Layout::kPaddedPaged;
      c.pad = pad;
      c.head_dim = 80;
      RunCase(c, seed++);
      c.save = true;
      c.rotation = Rotation::kInverse;
      RunCase(c, seed++);
    }
    {
      Case c = base;  // canonical data one element off alignment
      c.misalign = true;
      RunCase(c, seed++);
      c.int8 = true;
      RunCase(c, seed++);
    }
    {
      Case c = base;  // GPT-J interleaved pairs, partial rotary
      c.interleaved = true;
      c.rotary_dim = 64;
      c.head_dim = 128;
      RunCase(c, seed++);
      c.interleaved = false;
      c.rotary_dim = 32;
      c.head_dim = 80;
      RunCase(c, seed++);
    }
    {
      Case c = base;  // a layer sub-range, default slots and positions near 1M
      c.layer_begin = 1;
      c.num_layers = 2;
      c.null_slots = true;
      c.null_positions = true;
      c.layout = Layout::kHeadMajor;
      RunCase(c, seed++);
      c.rotation = Rotation::kShift;
      RunCase(c, seed++);
    }
    {
      Case c = base;  // many small segments in one call (more than one launch's worth)
      c.span_tokens.assign(200, 1);
      for (size_t i = 0; i < c.span_tokens.size(); i += 7) c.span_tokens[i] = 3;
      c.head_dim = 64;
      c.heads = 2;
      c.block_size = 16;
      RunCase(c, seed++);
    }
    {
      Case c = base;  // zero-copy: canonical spans read from mapped pinned host memory
      c.pinned_source = true;
      c.layout = Layout::kPaged;
      RunCase(c, seed++);
    }
    if (HasFailure()) return;
  }
}

// The pair kernel moves several layers per block: force groups of 4 layers over the mixed
// default / llama3 / yarn / NoPE layers (per-layer tables, copy-only layers), partial rotary
// (generic fallback inside the block) and both directions; and the generic kernel alone.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) { setenv(name, value, 1); }
  ~ScopedEnv() { unsetenv(name_); }

 private:
  const char* name_;
};

TEST_F(KvMoveGrid, PairKernelLayerGroupsAndGenericKernel) {
  uint32_t seed = 500;
  for (const char* mode : {"pair_groups", "generic"}) {
    ScopedEnv lpb("KVAGENT_KV_MOVE_LPB", "4");
    ScopedEnv which("KVAGENT_KV_MOVE", std::strcmp(mode, "generic") == 0 ? "generic" : "pair");
    for (DType dt : kDTypes)
      for (int D : {64, 128, 256}) {
        Case c;
        c.dtype = dt;
        c.head_dim = D;
        c.heads = D == 256 ? 2 : 4;
        c.rotation = Rotation::kApply;
        c.span_tokens = {17, 1, 40};
        for (bool uniform : {false, true}) {
          c.uniform_rope = uniform;
          c.layers = uniform ? 6 : 4;  // groups of 4 and 2 layers
          c.save = false;
          c.rotation = Rotation::kApply;
          RunCase(c, seed++);
          c.save = true;
          c.rotation = Rotation::kInverse;
          RunCase(c, seed++);
          c.save = false;
          c.rotation = Rotation::kNone;
          RunCase(c, seed++);
        }
        if (HasFailure()) return;
      }
    for (bool il : {false, true}) {
      Case c;  // partial rotary on a pair-kernel shape
      c.interleaved = il;
      c.rotary_dim = 64;
      c.head_dim = 128;
      c.rotation = Rotation::kShift;
      c.layout = Layout::kPagedFused;
      RunCase(c, seed++);
      if (HasFailure()) return;
    }
  }
}

TEST_F(KvMoveGrid, ApplyThenInverseRoundTrips) {
  // Load pre-RoPE keys rotated to new positions, capture them back with the inverse rotation
  // at the same positions: keys come back within rounding, values bit-exactly.
  const int L = 4, H = 2, D = 128, T = 37;
  Case c;
  ModelSpec spec = SpecFor(c);
  spec.num_kv_heads = H;
  spec.num_q_heads = 8;
  spec.kv_dtype = DType::kF32;
  auto rope = RopeDeviceTable::Create(spec);
  ASSERT_TRUE(rope.ok());
  const size_t elems = static_cast<size_t>(L) * 2 * H * T * D;
  std::vector<float> x(elems);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> val(-1, 1);
  for (float& v : x) v = val(rng);
  DeviceBuffer src(elems * 4), back(elems * 4), cache(static_cast<size_t>(2) * L * 64 * 16 * H * D * 4);
  CUDA_OK(cudaMemcpy(src.get(), x.data(), elems * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(back.get(), 0xFF, elems * 4));
  std::vector<void*> kv;
  for (int l = 0; l < L; ++l) kv.push_back(cache.get() + static_cast<size_t>(l) * 2 * 64 * 16 * H * D * 4);
  EngineKvView view = EngineKvView::PagedFused(DType::kF32, H, D, 16, 64, kv);
  CanonicalSpan in{src.get(), nullptr, T, 0, T};
  CanonicalSpan out{back.get(), nullptr, T, 0, T};
  MoveOptions o;
  o.canonical_dtype = DType::kF32;
  o.rope = rope.value().get();
  o.rotation = Rotation::kApply;
  o.slot_base = 100;
  o.new_position_base = 999'990;
  ASSERT_TRUE(LoadToEngine({&in, 1}, view, o, nullptr).ok());
  o.rotation = Rotation::kInverse;
  o.old_position_base = 999'990;
  ASSERT_TRUE(SaveFromEngine({&out, 1}, view, o, nullptr).ok());
  std::vector<float> y(elems);
  CUDA_OK(cudaMemcpy(y.data(), back.get(), elems * 4, cudaMemcpyDeviceToHost));
  double worst = 0;
  for (size_t i = 0; i < elems; ++i) worst = std::max(worst, static_cast<double>(std::fabs(y[i] - x[i])));
  EXPECT_LT(worst, 2e-6);
}

TEST_F(KvMoveGrid, PinnedHostAllocatorFeedsKernelsDirectly) {
  ASSERT_TRUE(InstallPinnedHostAllocator().ok());
  EXPECT_STREQ(Buffer::HostAllocatorName(), "cuda_pinned");
  const int L = 2, H = 2, D = 64, T = 9;
  const size_t elems = static_cast<size_t>(L) * 2 * H * T * D;
  auto buf = Buffer::Allocate(elems * 2);
  ASSERT_TRUE(buf.ok());
  std::vector<uint16_t> host(elems);
  for (size_t i = 0; i < elems; ++i) host[i] = F32ToBF16(static_cast<float>(i % 251) - 125.f);
  std::memcpy(buf.value()->data(), host.data(), elems * 2);
  auto mapped = MappedDevicePointer(buf.value()->data());
  ASSERT_TRUE(mapped.ok()) << mapped.status().ToString();
  DeviceBuffer dst(elems * 2);
  CUDA_OK(cudaMemset(dst.get(), 0xFF, elems * 2));
  EngineKvView view = CanonicalAsView(DType::kBF16, L, H, D, T, dst.get());
  CanonicalSpan in{mapped.value(), nullptr, T, 0, T};
  MoveOptions o;
  ASSERT_TRUE(LoadToEngine({&in, 1}, view, o, nullptr).ok());
  std::vector<uint16_t> got(elems);
  CUDA_OK(cudaMemcpy(got.data(), dst.get(), elems * 2, cudaMemcpyDeviceToHost));
  EXPECT_EQ(got, host);
}

}  // namespace
}  // namespace kvagent::cuda
