#include "kvagent/cuda_kv.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/kv_kernels.cuh"

namespace kvagent::cuda {

namespace k = ::kvagent::cuda::kernels;

namespace {

struct DeviceState {
  Status status;
};

const DeviceState& Probe() {
  static const DeviceState state = [] {
    DeviceState s;
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
      cudaGetLastError();  // clear the sticky "no device" error for later callers
      s.status = UnavailableError(std::string("no usable CUDA device: ") + cudaGetErrorString(e));
    } else if (n == 0) {
      s.status = UnavailableError("no CUDA device");
    }
    return s;
  }();
  return state;
}

bool IsKvDType(DType t) { return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16; }

k::Elem ToElem(DType t) {
  switch (t) {
    case DType::kF16:
      return k::Elem::kF16;
    case DType::kBF16:
      return k::Elem::kBF16;
    default:
      return k::Elem::kF32;
  }
}

bool Aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

const void* Advance(const void* p, int64_t elements, size_t elem_size) {
  return static_cast<const char*>(p) + elements * static_cast<int64_t>(elem_size);
}

Status Move(std::span<const CanonicalSpan> spans, const EngineKvView& view, const MoveOptions& o, Stream stream,
            bool to_engine) {
  const char* what = to_engine ? "LoadToEngine" : "SaveFromEngine";
  auto bad = [what](const std::string& m) { return InvalidArgumentError(std::string(what) + ": " + m); };
  // ---- view ----
  if (!IsKvDType(view.dtype)) return bad("engine dtype must be f32, f16 or bf16");
  if (view.num_kv_heads <= 0 || view.head_dim <= 0) return bad("engine view needs positive kv heads and head_dim");
  if (view.k_layers.size() != view.v_layers.size() || view.k_layers.empty())
    return bad("engine view needs the same non-zero number of K and V layer pointers");
  for (size_t i = 0; i < view.k_layers.size(); ++i)
    if (view.k_layers[i] == nullptr || view.v_layers[i] == nullptr)
      return bad("engine layer pointer " + std::to_string(i) + " is null");
  if (view.block_size < 1) return bad("block_size must be >= 1");
  if (view.num_slots < 1) return bad("engine view has no slots");
  if (view.block_size > 1 && view.num_slots > std::numeric_limits<int32_t>::max())
    return bad("paged view with more than 2^31 slots");
  if (view.stride_block < 0 || view.stride_slot < 0 || view.stride_head < 0) return bad("negative stride");
  // ---- options ----
  const int n_layers = o.num_layers < 0 ? view.num_layers() : o.num_layers;
  if (n_layers < 1 || n_layers > view.num_layers())
    return bad("num_layers " + std::to_string(n_layers) + " outside [1, " + std::to_string(view.num_layers()) + "]");
  if (o.layer_begin < 0) return bad("layer_begin must be >= 0");
  if (o.span_layer_begin < -1) return bad("span_layer_begin must be >= 0, or -1");
  if (o.int8_source && !to_engine) return bad("int8 canonical spans are read-only (dequantised on load)");
  if (!o.int8_source && o.canonical_dtype != view.dtype)
    return bad("canonical dtype " + std::string(DTypeName(o.canonical_dtype)) + " differs from engine dtype " +
               std::string(DTypeName(view.dtype)));
  const RopeDeviceTable* rope = o.rope;
  if (o.rotation != Rotation::kNone) {
    if (rope == nullptr) return bad("rotation needs a RopeDeviceTable");
    if (rope->head_dim() != view.head_dim) return bad("rope table head_dim differs from the view's");
    if (o.layer_begin + n_layers > rope->num_layers())
      return bad("layers [" + std::to_string(o.layer_begin) + ", " + std::to_string(o.layer_begin + n_layers) +
                 ") exceed the rope table's " + std::to_string(rope->num_layers()));
  }
  // ---- spans ----
  if (spans.empty()) return bad("no spans");
  int64_t rows = 0;
  int64_t tiles = 0;
  for (size_t i = 0; i < spans.size(); ++i) {
    const CanonicalSpan& s = spans[i];
    if (s.data == nullptr) return bad("span " + std::to_string(i) + " has no data");
    if (o.int8_source && s.scales == nullptr) return bad("int8 span " + std::to_string(i) + " has no scales");
    if (s.total_tokens < 1 || s.num_tokens < 1 || s.token_begin < 0 ||
        static_cast<int64_t>(s.token_begin) + s.num_tokens > s.total_tokens)
      return bad("span " + std::to_string(i) + " tokens [" + std::to_string(s.token_begin) + ", +" +
                 std::to_string(s.num_tokens) + ") outside its " + std::to_string(s.total_tokens) + " tokens");
    rows += s.num_tokens;
    tiles += (s.num_tokens + k::kTileTokens - 1) / k::kTileTokens;
  }
  if (tiles > std::numeric_limits<int32_t>::max()) return bad("too many tokens in one call");
  if (o.slots == nullptr && (o.slot_base < 0 || o.slot_base + rows > view.num_slots))
    return bad("default slots [" + std::to_string(o.slot_base) + ", " + std::to_string(o.slot_base + rows) +
               ") outside the view's " + std::to_string(view.num_slots) + " slots");
  if (o.rotation == Rotation::kApply || o.rotation == Rotation::kShift)
    if (o.new_positions == nullptr && (o.new_position_base < 0 || o.new_position_base + rows > o.max_position))
      return bad("new positions out of [0, max_position]");
  if (o.rotation == Rotation::kInverse || o.rotation == Rotation::kShift)
    if (o.old_positions == nullptr && (o.old_position_base < 0 || o.old_position_base + rows > o.max_position))
      return bad("old positions out of [0, max_position]");

  // ---- vector width: the widest that every pointer, stride and rotary split allows ----
  const size_t es = DTypeSize(view.dtype);
  const int H = view.num_kv_heads, D = view.head_dim;
  int max_half = 0;
  bool interleaved = false;
  if (o.rotation != Rotation::kNone) {
    interleaved = rope->interleaved();
    for (int l = 0; l < n_layers; ++l) max_half = std::max(max_half, rope->layer(o.layer_begin + l).rotary_dim / 2);
  }
  auto fits = [&](int v) {
    if (D % v != 0) return false;
    if (view.stride_block % v || view.stride_slot % v || view.stride_head % v) return false;
    for (int l = 0; l < n_layers; ++l) {
      if (!Aligned(view.k_layers[static_cast<size_t>(l)], v * es) ||
          !Aligned(view.v_layers[static_cast<size_t>(l)], v * es))
        return false;
      if (o.rotation != Rotation::kNone) {
        const int rd = rope->layer(o.layer_begin + l).rotary_dim;
        if (rd > 0 && (interleaved ? (rd % v != 0 || v < 2) : ((rd / 2) % v != 0))) return false;
      }
    }
    const size_t span_align = o.int8_source ? static_cast<size_t>(v) : v * es;
    for (const CanonicalSpan& s : spans) {
      if (!Aligned(s.data, span_align)) return false;
      if (o.int8_source && !Aligned(s.scales, sizeof(float))) return false;
    }
    return true;
  };
  int vec = 0;
  for (int v = static_cast<int>(16 / es); v >= 1; v /= 2) {
    if (fits(v)) {
      vec = v;
      break;
    }
  }
  if (vec == 0) return bad("pointers or strides are not element-aligned");
  if (interleaved && max_half > 0 && vec < 2) return bad("interleaved rotation needs pointers aligned to 2 elements");
  KVAGENT_RETURN_IF_ERROR(CheckDevice());

  // ---- launches: at most kMaxLayers layers and kMaxItems spans each ----
  const int64_t layer_elems = 2LL * H * D;  // per token; times total_tokens per layer
  for (int l0 = 0; l0 < n_layers; l0 += k::kMaxLayers) {
    const int nl = std::min(k::kMaxLayers, n_layers - l0);
    int64_t row_offset = 0;
    for (size_t i0 = 0; i0 < spans.size(); i0 += k::kMaxItems) {
      const size_t ni = std::min<size_t>(k::kMaxItems, spans.size() - i0);
      // MoveParams is several KB: keep it off the (possibly small) caller thread's stack frame.
      auto p = std::make_unique<k::MoveParams>();
      std::memset(p.get(), 0, sizeof(k::MoveParams));
      for (int l = 0; l < nl; ++l) {
        p->eng.k[l] = view.k_layers[static_cast<size_t>(l0 + l)];
        p->eng.v[l] = view.v_layers[static_cast<size_t>(l0 + l)];
      }
      p->eng.stride_block = view.stride_block;
      p->eng.stride_slot = view.stride_slot;
      p->eng.stride_head = view.stride_head;
      p->eng.num_slots = view.num_slots;
      p->eng.block_size = view.block_size;
      int32_t tile = 0;
      for (size_t i = 0; i < ni; ++i) {
        const CanonicalSpan& s = spans[i0 + i];
        const int64_t first_layer = (o.span_layer_begin < 0 ? o.layer_begin : o.span_layer_begin) + l0;
        k::SegItem& it = p->items[i];
        it.data = Advance(s.data, first_layer * layer_elems * s.total_tokens, o.int8_source ? 1 : es);
        it.scales = o.int8_source ? s.scales + first_layer * layer_elems : nullptr;
        it.row_offset = row_offset;
        it.total_tokens = s.total_tokens;
        it.token_begin = s.token_begin;
        it.num_tokens = s.num_tokens;
        it.tile_begin = tile;
        tile += (s.num_tokens + k::kTileTokens - 1) / k::kTileTokens;
        row_offset += s.num_tokens;
      }
      p->num_items = static_cast<int32_t>(ni);
      p->num_tiles = tile;
      p->num_layers = nl;
      p->layer_begin = o.layer_begin + l0;
      p->num_heads = H;
      p->head_dim = D;
      p->to_engine = to_engine ? 1 : 0;
      p->src_int8 = o.int8_source ? 1 : 0;
      p->elem = ToElem(view.dtype);
      p->mode = static_cast<k::RotMode>(static_cast<int>(o.rotation));
      p->max_half = max_half;
      if (rope != nullptr && o.rotation != Rotation::kNone) {
        p->rope.inv_freq = rope->inv_freq();
        p->rope.rotary_dim = rope->rotary_dim();
        p->rope.attn_factor = rope->attention_factor();
        p->rope.freq_stride = rope->freq_stride();
        p->rope.interleaved = rope->interleaved() ? 1 : 0;
      }
      p->slots = o.slots;
      p->slot_base = o.slot_base;
      p->pos_new = o.new_positions;
      p->pos_new_base = o.new_position_base;
      p->pos_old = o.old_positions;
      p->pos_old_base = o.old_position_base;
      KVAGENT_RETURN_IF_ERROR(CudaStatus(k::LaunchMove(*p, vec, stream), what));
    }
  }
  return Status::Ok();
}

}  // namespace

bool DeviceAvailable() { return Probe().status.ok(); }
Status CheckDevice() { return Probe().status; }

// ---- RopeDeviceTable ----

StatusOr<std::shared_ptr<const RopeDeviceTable>> RopeDeviceTable::Create(const ModelSpec& spec) {
  if (spec.num_layers <= 0 || spec.head_dim <= 0 || spec.layers.size() != static_cast<size_t>(spec.num_layers))
    return InvalidArgumentError("RopeDeviceTable: model spec needs num_layers layer specs and a head_dim");
  std::vector<RopeTable> tables;
  for (int l = 0; l < spec.num_layers; ++l) {
    KVAGENT_ASSIGN_OR_RETURN(RopeTable rt, ComputeRopeTable(spec.layers[static_cast<size_t>(l)].rope, spec.head_dim));
    tables.push_back(std::move(rt));
  }
  return Create(std::move(tables), spec.head_dim);
}

StatusOr<std::shared_ptr<const RopeDeviceTable>> RopeDeviceTable::Create(std::vector<RopeTable> tables, int head_dim) {
  if (tables.empty() || head_dim <= 0) return InvalidArgumentError("RopeDeviceTable: no layers or no head_dim");
  std::shared_ptr<RopeDeviceTable> t(new RopeDeviceTable());
  t->head_dim_ = head_dim;
  t->freq_stride_ = std::max(1, head_dim / 2);
  bool have_style = false;
  for (size_t l = 0; l < tables.size(); ++l) {
    const RopeTable& rt = tables[l];
    const std::string at = " (layer " + std::to_string(l) + ")";
    if (rt.rotary_dim < 0 || rt.rotary_dim % 2 != 0 || rt.rotary_dim > head_dim ||
        rt.inv_freq.size() != static_cast<size_t>(rt.rotary_dim / 2))
      return InvalidArgumentError("RopeDeviceTable: rotary_dim and inv_freq disagree" + at);
    if (!(rt.attention_factor > 0)) return InvalidArgumentError("RopeDeviceTable: attention factor must be > 0" + at);
    if (rt.rotary_dim > 0) {
      const bool il = rt.style == RopeStyle::kInterleaved;
      if (have_style && il != t->interleaved_)
        return InvalidArgumentError("RopeDeviceTable: layers mix half-split and interleaved rotation");
      t->interleaved_ = il;
      have_style = true;
    }
  }
  t->host_ = std::move(tables);
  KVAGENT_RETURN_IF_ERROR(CheckDevice());
  const size_t L = t->host_.size();
  std::vector<double> inv(L * static_cast<size_t>(t->freq_stride_), 0.0);
  std::vector<int32_t> rd(L);
  std::vector<float> af(L);
  for (size_t l = 0; l < L; ++l) {
    const RopeTable& rt = t->host_[l];
    std::copy(rt.inv_freq.begin(), rt.inv_freq.end(), inv.begin() + static_cast<ptrdiff_t>(l * t->freq_stride_));
    rd[l] = rt.rotary_dim;
    af[l] = static_cast<float>(rt.attention_factor);
  }
  KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaMalloc(&t->inv_freq_, inv.size() * sizeof(double)), "rope table"));
  KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaMalloc(&t->rotary_dim_, rd.size() * sizeof(int32_t)), "rope table"));
  KVAGENT_RETURN_IF_ERROR(CudaStatus(cudaMalloc(&t->attn_, af.size() * sizeof(float)), "rope table"));
  KVAGENT_RETURN_IF_ERROR(CudaStatus(
      cudaMemcpy(t->inv_freq_, inv.data(), inv.size() * sizeof(double), cudaMemcpyHostToDevice), "rope table"));
  KVAGENT_RETURN_IF_ERROR(CudaStatus(
      cudaMemcpy(t->rotary_dim_, rd.data(), rd.size() * sizeof(int32_t), cudaMemcpyHostToDevice), "rope table"));
  KVAGENT_RETURN_IF_ERROR(
      CudaStatus(cudaMemcpy(t->attn_, af.data(), af.size() * sizeof(float), cudaMemcpyHostToDevice), "rope table"));
  return std::shared_ptr<const RopeDeviceTable>(std::move(t));
}

RopeDeviceTable::~RopeDeviceTable() {
  // Freed memory may still be read by queued kernels: cudaFree synchronises the device first.
  if (inv_freq_) cudaFree(inv_freq_);
  if (rotary_dim_) cudaFree(rotary_dim_);
  if (attn_) cudaFree(attn_);
}

Status LoadToEngine(std::span<const CanonicalSpan> spans, const EngineKvView& view, const MoveOptions& options,
                    Stream stream) {
  return Move(spans, view, options, stream, /*to_engine=*/true);
}

Status SaveFromEngine(std::span<const CanonicalSpan> spans, const EngineKvView& view, const MoveOptions& options,
                      Stream stream) {
  return Move(spans, view, options, stream, /*to_engine=*/false);
}

}  // namespace kvagent::cuda
