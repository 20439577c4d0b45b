#include "segment_glue.h"

#include <cstring>
#include <limits>
#include <utility>

namespace kvagent::py {

namespace {

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(shape[i]);
  }
  if (shape.size() == 1) s += ",";
  return s + ")";
}

Status CheckDims(const std::vector<int64_t>& dims, std::string_view what) {
  for (int64_t d : dims) {
    if (d <= 0) return InvalidArgumentError(std::string(what) + " has an empty dimension, shape " + ShapeString(dims));
    if (d > std::numeric_limits<int32_t>::max())
      return InvalidArgumentError(std::string(what) + " dimension " + std::to_string(d) + " is too large");
  }
  return Status::Ok();
}

// Dense C-order strides (in elements) for `shape`.
std::vector<int64_t> DenseStrides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> s(shape.size());
  int64_t acc = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    s[i] = acc;
    acc *= shape[i];
  }
  return s;
}

// Strides match dense C order, ignoring extent-1 dimensions (whose stride never matters).
bool IsDense(const ArrayRef& a) {
  std::vector<int64_t> dense = DenseStrides(a.shape);
  for (size_t i = 0; i < a.shape.size(); ++i) {
    if (a.shape[i] != 1 && a.strides[i] != dense[i]) return false;
  }
  return true;
}

// Copies one [tokens][dim] plane of `a` starting at element offset `src_off` to `dst`.
void CopyPlane(const ArrayRef& a, int64_t src_off, int64_t tok_stride, int64_t dim_stride, const SegmentLayout& l,
               std::byte* dst) {
  const size_t esz = DTypeSize(l.dtype);
  const size_t row_bytes = static_cast<size_t>(l.head_dim) * esz;
  for (int t = 0; t < l.num_tokens; ++t) {
    const std::byte* row = a.data + (src_off + t * tok_stride) * static_cast<int64_t>(esz);
    std::byte* out = dst + static_cast<size_t>(t) * row_bytes;
    if (dim_stride == 1) {
      std::memcpy(out, row, row_bytes);
    } else {
      for (int d = 0; d < l.head_dim; ++d) {
        std::memcpy(out + static_cast<size_t>(d) * esz, row + d * dim_stride * static_cast<int64_t>(esz), esz);
      }
    }
  }
}

}  // namespace

std::string DlDTypeName(DlDType t) {
  std::string base;
  switch (t.code) {
    case 0:
      base = "int";
      break;
    case 1:
      base = "uint";
      break;
    case 2:
      base = "float";
      break;
    case 4:
      base = "bfloat";
      break;
    case 5:
      base = "complex";
      break;
    case 6:
      base = "bool";
      break;
    default:
      base = "dlpack_code" + std::to_string(t.code) + "_";
      break;
  }
  std::string s = t.code == 6 ? base : base + std::to_string(t.bits);
  if (t.lanes != 1) s += "x" + std::to_string(t.lanes);
  return s;
}

StatusOr<DType> PayloadDTypeOf(DlDType t, std::string_view what) {
  if (t.lanes == 1) {
    if (t.code == 2 && t.bits == 32) return DType::kF32;
    if (t.code == 2 && t.bits == 16) return DType::kF16;
    if (t.code == 4 && t.bits == 16) return DType::kBF16;
  }
  return InvalidArgumentError(std::string(what) + " has dtype " + DlDTypeName(t) +
                              "; KV payloads must be float32, float16 or bfloat16");
}

DlDType DlDTypeOf(DType t) {
  switch (t) {
    case DType::kF16:
      return {2, 16, 1};
    case DType::kBF16:
      return {4, 16, 1};
    case DType::kI8:
      return {0, 8, 1};
    case DType::kF32:
      break;
  }
  return {2, 32, 1};
}

StatusOr<SegmentLayout> LayoutOfKv(const ArrayRef& kv) {
  if (kv.shape.size() != 5 || kv.shape[1] != 2)
    return InvalidArgumentError("kv must have shape [layers, 2, kv_heads, tokens, head_dim], got " +
                                ShapeString(kv.shape));
  KVAGENT_RETURN_IF_ERROR(CheckDims(kv.shape, "kv"));
  SegmentLayout l;
  l.num_layers = static_cast<int>(kv.shape[0]);
  l.num_kv_heads = static_cast<int>(kv.shape[2]);
  l.num_tokens = static_cast<int>(kv.shape[3]);
  l.head_dim = static_cast<int>(kv.shape[4]);
  l.dtype = kv.dtype;
  return l;
}

StatusOr<SegmentLayout> LayoutOfKAndV(const ArrayRef& k, const ArrayRef& v) {
  if (k.shape.size() != 4)
    return InvalidArgumentError("k must have shape [layers, kv_heads, tokens, head_dim], got " + ShapeString(k.shape));
  if (v.shape != k.shape)
    return InvalidArgumentError("k and v must have the same shape, got k " + ShapeString(k.shape) + " and v " +
                                ShapeString(v.shape));
  if (k.dtype != v.dtype)
    return InvalidArgumentError("k and v must have the same dtype, got " + std::string(DTypeName(k.dtype)) + " and " +
                                std::string(DTypeName(v.dtype)));
  KVAGENT_RETURN_IF_ERROR(CheckDims(k.shape, "k"));
  SegmentLayout l;
  l.num_layers = static_cast<int>(k.shape[0]);
  l.num_kv_heads = static_cast<int>(k.shape[1]);
  l.num_tokens = static_cast<int>(k.shape[2]);
  l.head_dim = static_cast<int>(k.shape[3]);
  l.dtype = k.dtype;
  return l;
}

const std::byte* CanonicalBaseOfKv(const ArrayRef& kv, const SegmentLayout& layout) {
  (void)layout;
  return IsDense(kv) ? kv.data : nullptr;
}

const std::byte* CanonicalBaseOfKAndV(const ArrayRef& k, const ArrayRef& v, const SegmentLayout& l) {
  // k must look like kv[:, 0]: heads, tokens, dim dense; layers 2 planes-blocks apart.
  const int64_t block = static_cast<int64_t>(l.num_kv_heads) * l.num_tokens * l.head_dim;
  std::vector<int64_t> inner = {static_cast<int64_t>(l.num_tokens) * l.head_dim, l.head_dim, 1};
  for (const ArrayRef* a : {&k, &v}) {
    if (l.num_layers > 1 && a->strides[0] != 2 * block) return nullptr;
    for (int i = 0; i < 3; ++i) {
      if (a->shape[i + 1] != 1 && a->strides[i + 1] != inner[i]) return nullptr;
    }
  }
  if (v.data != k.data + block * static_cast<int64_t>(DTypeSize(l.dtype))) return nullptr;
  return k.data;
}

void CopyKvToCanonical(const ArrayRef& kv, const SegmentLayout& l, std::byte* dst) {
  for (int layer = 0; layer < l.num_layers; ++layer) {
    for (int kvi = 0; kvi < 2; ++kvi) {
      for (int h = 0; h < l.num_kv_heads; ++h) {
        int64_t off = layer * kv.strides[0] + kvi * kv.strides[1] + h * kv.strides[2];
        CopyPlane(kv, off, kv.strides[3], kv.strides[4], l, dst + l.Offset(layer, kvi, h, 0) * DTypeSize(l.dtype));
      }
    }
  }
}

void CopyKAndVToCanonical(const ArrayRef& k, const ArrayRef& v, const SegmentLayout& l, std::byte* dst) {
  for (int layer = 0; layer < l.num_layers; ++layer) {
    for (int kvi = 0; kvi < 2; ++kvi) {
      const ArrayRef& a = kvi == 0 ? k : v;
      for (int h = 0; h < l.num_kv_heads; ++h) {
        int64_t off = layer * a.strides[0] + h * a.strides[1];
        CopyPlane(a, off, a.strides[2], a.strides[3], l, dst + l.Offset(layer, kvi, h, 0) * DTypeSize(l.dtype));
      }
    }
  }
}

StatusOr<SegmentHandle> MakeSegment(SegmentFields f, const SegmentLayout& layout, std::shared_ptr<Buffer> payload) {
  auto seg = std::make_shared<Segment>();
  seg->layout = layout;
  seg->model = f.model;
  seg->parent = f.parent;
  seg->pre_rope = f.pre_rope;
  seg->tokens = std::move(f.tokens);
  if (f.positions.has_value()) {
    seg->positions = std::move(*f.positions);
  } else {
    seg->positions.resize(seg->tokens.size());
    for (size_t i = 0; i < seg->positions.size(); ++i) seg->positions[i] = static_cast<int64_t>(i);
  }
  seg->meta = std::move(f.meta);
  seg->key = f.key.has_value() ? *f.key : MemoryKey(seg->meta.ns, seg->meta.session, seg->meta.turn, seg->meta.chunk);
  seg->summary = std::move(f.summary);
  seg->payload = std::move(payload);
  if (f.spec != nullptr) {
    KVAGENT_RETURN_IF_ERROR(seg->ValidateFor(*f.spec));
  } else {
    KVAGENT_RETURN_IF_ERROR(seg->Validate());
  }
  return SegmentHandle(std::move(seg));
}

std::string LayoutString(const SegmentLayout& l) {
  return "layers=" + std::to_string(l.num_layers) + " kv_heads=" + std::to_string(l.num_kv_heads) +
         " tokens=" + std::to_string(l.num_tokens) + " head_dim=" + std::to_string(l.head_dim) +
         " dtype=" + std::string(DTypeName(l.dtype));
}

}  // namespace kvagent::py
