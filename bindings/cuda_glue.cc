#include "cuda_glue.h"

#if defined(KVAGENT_WITH_CUDA)

namespace kvagent::py {

namespace {

Status Bad(std::string_view what, const std::string& msg) {
  return InvalidArgumentError(std::string(what) + ": " + msg);
}

std::string ShapeString(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

Status CheckOnDevice(const DevArray& a, int device, std::string_view what) {
  if (a.device_type != kDlCuda)
    return Bad(what, "must be a CUDA tensor (DLPack device type 2, kDLCUDA), got device type " +
                         std::to_string(a.device_type));
  if (a.device_id != device)
    return Bad(what,
               "is on CUDA device " + std::to_string(a.device_id) + ", expected device " + std::to_string(device));
  if (a.data == nullptr) return Bad(what, "has no data");
  return Status::Ok();
}

}  // namespace

StatusOr<EngineLayout> EngineLayoutFromName(std::string_view n) {
  if (n == "token_major") return EngineLayout::kTokenMajor;
  if (n == "head_major") return EngineLayout::kHeadMajor;
  if (n == "paged") return EngineLayout::kPaged;
  if (n == "paged_fused") return EngineLayout::kPagedFused;
  return InvalidArgumentError("layout must be 'token_major', 'head_major', 'paged' or 'paged_fused', got '" +
                              std::string(n) + "'");
}

StatusOr<cuda::Rotation> RotationFromName(std::string_view n) {
  if (n == "none") return cuda::Rotation::kNone;
  if (n == "apply") return cuda::Rotation::kApply;
  if (n == "inverse") return cuda::Rotation::kInverse;
  if (n == "shift") return cuda::Rotation::kShift;
  return InvalidArgumentError("rotation must be 'none', 'apply', 'inverse' or 'shift', got '" + std::string(n) + "'");
}

StatusOr<cuda::EngineKvView> EngineViewOf(EngineLayout layout, const std::vector<DevArray>& k,
                                          const std::vector<DevArray>& v, int* device) {
  const bool fused = layout == EngineLayout::kPagedFused;
  if (k.empty()) return InvalidArgumentError("k_cache: no layers");
  if (fused && !v.empty()) return InvalidArgumentError("v_cache: must be None for layout 'paged_fused'");
  if (!fused && v.size() != k.size())
    return InvalidArgumentError("v_cache: " + std::to_string(v.size()) + " layers, k_cache has " +
                                std::to_string(k.size()));
  const size_t want_nd = layout == EngineLayout::kPaged ? 4 : fused ? 5 : 3;
  const DevArray& ref = k[0];
  if (*device < 0) *device = ref.device_id;
  KVAGENT_ASSIGN_OR_RETURN(DType dt, PayloadDTypeOf(ref.dtype, "k_cache"));
  auto check = [&](const DevArray& a, const std::string& what) -> Status {
    KVAGENT_RETURN_IF_ERROR(CheckOnDevice(a, *device, what));
    if (a.shape.size() != want_nd)
      return Bad(what, "must have " + std::to_string(want_nd) + " dimensions for this layout, got shape " +
                           ShapeString(a.shape));
    if (a.dtype.code != ref.dtype.code || a.dtype.bits != ref.dtype.bits || a.dtype.lanes != ref.dtype.lanes)
      return Bad(what, "dtype " + DlDTypeName(a.dtype) + " differs from k_cache[0]'s " + DlDTypeName(ref.dtype));
    if (a.shape != ref.shape)
      return Bad(what, "shape " + ShapeString(a.shape) + " differs from k_cache[0]'s " + ShapeString(ref.shape));
    if (a.strides != ref.strides) return Bad(what, "strides differ from k_cache[0]'s (one layout for every layer)");
    if (a.shape.back() > 1 && a.strides.back() != 1) return Bad(what, "last (head_dim) axis must be contiguous");
    for (int64_t s : a.strides)
      if (s < 0) return Bad(what, "negative strides are not supported");
    return Status::Ok();
  };
  for (size_t i = 0; i < k.size(); ++i) KVAGENT_RETURN_IF_ERROR(check(k[i], "k_cache[" + std::to_string(i) + "]"));
  for (size_t i = 0; i < v.size(); ++i) KVAGENT_RETURN_IF_ERROR(check(v[i], "v_cache[" + std::to_string(i) + "]"));

  const auto& s = ref.shape;
  const auto& st = ref.strides;
  cuda::EngineKvView view;
  view.dtype = dt;
  const int64_t es = static_cast<int64_t>(DTypeSize(dt));
  for (size_t i = 0; i < k.size(); ++i) {
    view.k_layers.push_back(k[i].data);
    if (fused) {
      view.v_layers.push_back(static_cast<char*>(k[i].data) + st[0] * es);
    } else {
      view.v_layers.push_back(v[i].data);
    }
  }
  switch (layout) {
    case EngineLayout::kTokenMajor:  // [tokens, heads, dim]
      view.num_kv_heads = static_cast<int>(s[1]);
      view.head_dim = static_cast<int>(s[2]);
      view.block_size = 1;
      view.num_slots = s[0];
      view.stride_block = st[0];
      view.stride_head = st[1];
      break;
    case EngineLayout::kHeadMajor:  // [heads, tokens, dim]
      view.num_kv_heads = static_cast<int>(s[0]);
      view.head_dim = static_cast<int>(s[2]);
      view.block_size = 1;
      view.num_slots = s[1];
      view.stride_block = st[1];
      view.stride_head = st[0];
      break;
    case EngineLayout::kPaged:  // [blocks, block_size, heads, dim]
    case EngineLayout::kPagedFused: {
      const size_t o = fused ? 1 : 0;
      if (fused && s[0] != 2) return InvalidArgumentError("k_cache: paged_fused tensors must have 2 at axis 0 (K, V)");
      view.num_kv_heads = static_cast<int>(s[o + 2]);
      view.head_dim = static_cast<int>(s[o + 3]);
      view.block_size = static_cast<int>(s[o + 1]);
      view.num_slots = s[o] * s[o + 1];
      view.stride_block = st[o];
      view.stride_slot = st[o + 1];
      view.stride_head = st[o + 2];
      break;
    }
  }
  return view;
}

StatusOr<SegmentLayout> CanonicalLayoutOf(const DevArray& a, int device, std::string_view what) {
  KVAGENT_RETURN_IF_ERROR(CheckOnDevice(a, device, what));
  if (a.shape.size() != 5 || a.shape[1] != 2)
    return Bad(what, "must have shape [layers, 2, kv_heads, tokens, head_dim], got " + ShapeString(a.shape));
  int64_t expect = 1;
  for (size_t i = a.shape.size(); i-- > 0;) {
    if (a.shape[i] > 1 && a.strides[i] != expect) return Bad(what, "must be C-contiguous (the canonical layout)");
    expect *= a.shape[i];
  }
  KVAGENT_ASSIGN_OR_RETURN(DType dt, PayloadDTypeOf(a.dtype, what));
  SegmentLayout l;
  l.num_layers = static_cast<int>(a.shape[0]);
  l.num_kv_heads = static_cast<int>(a.shape[2]);
  l.num_tokens = static_cast<int>(a.shape[3]);
  l.head_dim = static_cast<int>(a.shape[4]);
  l.dtype = dt;
  if (l.NumElements() == 0) return Bad(what, "is empty");
  return l;
}

StatusOr<RowArg> RowArgOf(const DevArray* a, int64_t base, int64_t rows, int device, std::string_view what) {
  RowArg r;
  r.base = base;
  if (a == nullptr) return r;
  KVAGENT_RETURN_IF_ERROR(CheckOnDevice(*a, device, what));
  if (a->dtype.code != 0 || a->dtype.bits != 64 || a->dtype.lanes != 1)
    return Bad(what, "must be int64, got " + DlDTypeName(a->dtype));
  if (a->shape.size() != 1 || a->shape[0] != rows)
    return Bad(what, "must have shape [" + std::to_string(rows) + "] (one entry per moved token), got " +
                         ShapeString(a->shape));
  if (rows > 1 && a->strides[0] != 1) return Bad(what, "must be contiguous");
  r.ptr = static_cast<const int64_t*>(a->data);
  return r;
}

}  // namespace kvagent::py

#endif  // KVAGENT_WITH_CUDA
