// Positioner bindings: arrays cross as nanobind ndarrays (DLPack / buffer protocol, no copy);
// the wrapper in python/kv_agent/rope.py allocates outputs and normalises positions.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/string_view.h>
#include <nanobind/stl/vector.h>

#include <string>

#include "errors.h"
#include "kvagent/rope.h"
#include "registry.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace kvagent::py {
namespace {

using AnyArray = nb::ndarray<nb::device::cpu>;
using Positions = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

StatusOr<DType> DTypeOf(const AnyArray& a) {
  const nb::dlpack::dtype t = a.dtype();
  if (t.lanes == 1 && t.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float)) {
    if (t.bits == 32) return DType::kF32;
    if (t.bits == 16) return DType::kF16;
  }
  if (t.lanes == 1 && t.bits == 16 && t.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat)) {
    return DType::kBF16;
  }
  return InvalidArgumentError("rope: array dtype must be float32, float16 or bfloat16");
}

// [..., tokens, dim] -> [heads][tokens][dim]: the leading dimensions must collapse into one
// stride (true for any contiguous array and for head/token transposes).
StatusOr<RopeTensorView> ViewOf(const AnyArray& a, const char* what) {
  KVAGENT_ASSIGN_OR_RETURN(DType dt, DTypeOf(a));
  const size_t nd = a.ndim();
  if (nd < 2) return InvalidArgumentError(std::string("rope: ") + what + " must have shape [..., tokens, head_dim]");
  RopeTensorView v;
  v.data = a.data();
  v.dtype = dt;
  v.head_dim = static_cast<int64_t>(a.shape(nd - 1));
  v.num_tokens = static_cast<int64_t>(a.shape(nd - 2));
  v.token_stride = a.stride(nd - 2);
  if (v.head_dim > 1 && a.stride(nd - 1) != 1) {
    return InvalidArgumentError(std::string("rope: ") + what + " last dimension must be contiguous");
  }
  v.num_heads = 1;
  v.head_stride = v.num_tokens * v.head_dim;
  bool first = true;
  for (size_t k = nd - 2; k-- > 0;) {  // innermost leading dim first
    const int64_t n = static_cast<int64_t>(a.shape(k));
    if (n == 1) continue;
    if (first) {
      v.head_stride = a.stride(k);
      first = false;
    } else if (a.stride(k) != v.head_stride * v.num_heads) {
      return InvalidArgumentError(std::string("rope: ") + what +
                                  " leading dimensions cannot be viewed as one axis (make it contiguous)");
    }
    v.num_heads *= n;
  }
  return v;
}

void Apply(const AnyArray& x, const AnyArray& out, const Positions& positions, const RopeSpec& rope, int head_dim,
           bool inverse) {
  RopeTensorView in = ValueOrThrow(ViewOf(x, "x"));
  RopeTensorView dst = ValueOrThrow(ViewOf(out, "out"));
  std::span<const int64_t> pos(positions.data(), positions.shape(0));
  Status st;
  {
    nb::gil_scoped_release release;
    st = RopeApply(rope, head_dim, in, dst, pos, inverse ? RopeDirection::kInverse : RopeDirection::kForward);
  }
  ThrowIfError(st);
}

void Reposition(const AnyArray& x, const AnyArray& out, const Positions& from, const Positions& to,
                const RopeSpec& rope, int head_dim) {
  RopeTensorView in = ValueOrThrow(ViewOf(x, "x"));
  RopeTensorView dst = ValueOrThrow(ViewOf(out, "out"));
  std::span<const int64_t> f(from.data(), from.shape(0));
  std::span<const int64_t> t(to.data(), to.shape(0));
  Status st;
  {
    nb::gil_scoped_release release;
    st = RopeReposition(rope, head_dim, in, dst, f, t);
  }
  ThrowIfError(st);
}

void RegisterRope(nb::module_& m) {
  m.def("rope_apply_into", &Apply, "x"_a, "out"_a, "positions"_a, "rope"_a, "head_dim"_a, "inverse"_a = false,
        "Rotates x [..., tokens, head_dim] into out (same shape/dtype, may be x) at int64 positions; "
        "inverse=True: post-RoPE -> pre-RoPE. Releases the GIL.");
  m.def("rope_reposition_into", &Reposition, "x"_a, "out"_a, "from_positions"_a, "to_positions"_a, "rope"_a,
        "head_dim"_a, "Post-RoPE at from -> post-RoPE at to (one rotation). Releases the GIL.");
  m.def(
      "rope_inv_freq",
      [](const RopeSpec& rope, int head_dim) { return ValueOrThrow(ComputeRopeFrequencies(rope, head_dim)).inv_freq; },
      "rope"_a, "head_dim"_a, "The float32 inverse frequencies used for `rope` (rotary_dim / 2 values).");
  m.def("rope_attention_factor", &RopeAttentionFactor, "rope"_a,
        "Factor multiplying cos/sin in the forward direction (YaRN; 1 otherwise).");
  m.def(
      "rope_validate", [](const RopeSpec& rope, int head_dim) { ThrowIfError(ValidateRopeSpec(rope, head_dim)); },
      "rope"_a, "head_dim"_a);
  m.def("rope_supported_types", [] {
    std::vector<std::string> out;
    for (std::string_view t : SupportedRopeTypes()) out.emplace_back(t);
    return out;
  });
}

Registration reg("rope", 10, &RegisterRope);

}  // namespace
}  // namespace kvagent::py
