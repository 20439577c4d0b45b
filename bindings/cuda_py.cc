// GPU KV path bindings: DeviceSegment (device-resident payloads exported to torch through DLPack
// without copies), the device RoPE table, and the fused canonical <-> engine moves. Framework
// arrays cross as nanobind ndarrays; cuda_glue.cc checks them and builds the kernel arguments.
// Launches run with the GIL released. Builds without CUDA register the same names, which raise
// UnavailableError.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cuda_glue.h"
#include "device_segment_py.h"
#include "errors.h"
#include "kvagent/cuda_kv.h"
#include "kvagent/device_tier.h"
#include "registry.h"
#include "segment_glue.h"
#include "segment_py.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace kvagent::py {
namespace {

[[noreturn]] void Raise(const Status& s) {
  ThrowIfError(s);
  throw std::logic_error("unreachable");
}

const DeviceSegment& Get(const PyDeviceSegment& s) {
  if (!s.d) Raise(FailedPreconditionError("empty DeviceSegment"));
  return s.d;
}

// [layers, 2, heads, tokens, dim] (or a K/V half) of the device payload as a CUDA array;
// framework 'torch' gives a torch tensor, 'dlpack' a DLPack capsule.
nb::object ExportDevice(nb::handle owner, const DeviceSegment& d, int kvi, std::optional<int> layer,
                        const std::string& framework) {
  const SegmentLayout& l = d.meta()->layout;
  const int64_t plane = static_cast<int64_t>(l.num_tokens) * l.head_dim;
  std::vector<size_t> shape = {size_t(l.num_kv_heads), size_t(l.num_tokens), size_t(l.head_dim)};
  std::vector<int64_t> strides = {plane, l.head_dim, 1};
  size_t offset = 0;
  if (kvi < 0) {  // both halves
    shape.insert(shape.begin(), {size_t(l.num_layers), 2});
    strides.insert(strides.begin(), {2 * plane * l.num_kv_heads, plane * l.num_kv_heads});
  } else if (layer.has_value()) {
    int li = *layer;
    if (li < -l.num_layers || li >= l.num_layers)
      Raise(OutOfRangeError("layer " + std::to_string(li) + " out of range for a segment with " +
                            std::to_string(l.num_layers) + " layers"));
    if (li < 0) li += l.num_layers;
    offset = l.Offset(li, kvi, 0, 0);
  } else {
    shape.insert(shape.begin(), size_t(l.num_layers));
    strides.insert(strides.begin(), 2 * plane * l.num_kv_heads);
    offset = l.Offset(0, kvi, 0, 0);
  }
  DlDType t = DlDTypeOf(l.dtype);
  nb::dlpack::dtype ndt{t.code, t.bits, t.lanes};
  const auto* data = static_cast<const std::byte*>(d.data()) + offset * DTypeSize(l.dtype);
  if (framework == "torch") {
    nb::ndarray<nb::pytorch, nb::ro> arr(data, shape.size(), shape.data(), owner, strides.data(), ndt,
                                         nb::device::cuda::value, d.device());
    return nb::cast(arr, nb::rv_policy::reference);
  }
  if (framework == "dlpack") {
    nb::ndarray<nb::ro> arr(data, shape.size(), shape.data(), owner, strides.data(), ndt, nb::device::cuda::value,
                            d.device());
    return nb::cast(arr, nb::rv_policy::reference);
  }
  Raise(InvalidArgumentError("framework must be 'torch' or 'dlpack' for device memory, got '" + framework + "'"));
}

void RegisterDeviceSegment(nb::module_& m) {
  nb::class_<PyDeviceSegment>(
      m, "DeviceSegment",
      "A segment's canonical KV payload resident in CUDA memory (Store.get_device). Immutable; tensors exported\n"
      "from it (kv/k/v, torch.from_dlpack) share its memory without copies and keep it alive. The store may\n"
      "evict its entry meanwhile; the bytes are reused only after every reference is gone and the stream work\n"
      "recorded with record_use(stream) has completed.")
      .def_prop_ro("key", [](const PyDeviceSegment& s) { return Get(s).meta()->key; })
      .def_prop_ro("model", [](const PyDeviceSegment& s) { return Get(s).meta()->model; })
      .def_prop_ro("parent", [](const PyDeviceSegment& s) { return Get(s).meta()->parent; })
      .def_prop_ro("layout", [](const PyDeviceSegment& s) { return Get(s).meta()->layout; })
      .def_prop_ro("dtype",
                   [](const PyDeviceSegment& s) { return std::string(DTypeName(Get(s).meta()->layout.dtype)); })
      .def_prop_ro("num_tokens", [](const PyDeviceSegment& s) { return Get(s).meta()->layout.num_tokens; })
      .def_prop_ro("pre_rope", [](const PyDeviceSegment& s) { return Get(s).meta()->pre_rope; })
      .def_prop_ro(
          "meta", [](const PyDeviceSegment& s) { return Get(s).meta()->meta; }, "A copy of the metadata.")
      .def_prop_ro("nbytes", [](const PyDeviceSegment& s) { return Get(s).size(); })
      .def_prop_ro(
          "device", [](const PyDeviceSegment& s) { return Get(s).device(); }, "CUDA device index.")
      .def_prop_ro("data_ptr", [](const PyDeviceSegment& s) { return reinterpret_cast<uintptr_t>(Get(s).data()); })
      .def_prop_ro("tokens",
                   [](nb::handle self) {
                     return ExportVector(self, Get(nb::cast<const PyDeviceSegment&>(self)).meta()->tokens);
                   })
      .def_prop_ro("positions",
                   [](nb::handle self) {
                     return ExportVector(self, Get(nb::cast<const PyDeviceSegment&>(self)).meta()->positions);
                   })
      .def(
          "kv",
          [](nb::handle self, const std::string& framework) {
            return ExportDevice(self, Get(nb::cast<const PyDeviceSegment&>(self)), -1, std::nullopt, framework);
          },
          "framework"_a = "torch",
          "[layers, 2, kv_heads, tokens, head_dim] CUDA tensor over the device payload (no copy). framework:\n"
          "'torch' or 'dlpack' (a DLPack capsule, e.g. for torch.from_dlpack). Treat it as read-only.")
      .def(
          "k",
          [](nb::handle self, std::optional<int> layer, const std::string& framework) {
            return ExportDevice(self, Get(nb::cast<const PyDeviceSegment&>(self)), 0, layer, framework);
          },
          "layer"_a = nb::none(), "framework"_a = "torch",
          "Keys: [kv_heads, tokens, head_dim] of one layer, or [layers, kv_heads, tokens, head_dim].")
      .def(
          "v",
          [](nb::handle self, std::optional<int> layer, const std::string& framework) {
            return ExportDevice(self, Get(nb::cast<const PyDeviceSegment&>(self)), 1, layer, framework);
          },
          "layer"_a = nb::none(), "framework"_a = "torch", "Values, as k().")
      .def(
          "__dlpack__",
          [](nb::handle self, nb::kwargs) {
            // nanobind exports a framework-less ndarray as the DLPack capsule itself, which is
            // what __dlpack__ returns. The bytes are ready on every stream (GetDevice waited for
            // the load), so the consumer's `stream` needs no synchronisation.
            return ExportDevice(self, Get(nb::cast<const PyDeviceSegment&>(self)), -1, std::nullopt, "dlpack");
          },
          "DLPack capsule of kv() (kDLCUDA); keyword arguments (stream, max_version, ...) are accepted and ignored.")
      .def("__dlpack_device__",
           [](const PyDeviceSegment& s) { return nb::make_tuple(int(nb::device::cuda::value), Get(s).device()); })
      .def(
          "record_use",
          [](const PyDeviceSegment& s, uintptr_t stream) {
            ThrowIfError(Get(s).RecordUse(reinterpret_cast<void*>(stream)));
          },
          "stream"_a,
          "Records that work enqueued so far on `stream` (a cudaStream_t as int, e.g.\n"
          "torch.cuda.current_stream().cuda_stream; 0 = legacy default) reads this payload: the bytes are not\n"
          "reused before it completes, even after every reference is dropped.")
      .def("__repr__", [](const PyDeviceSegment& s) {
        if (!s.d) return std::string("DeviceSegment(empty)");
        return "DeviceSegment(key=" + s.d.meta()->key.ToHex() + ", " + LayoutString(s.d.meta()->layout) +
               ", device=cuda:" + std::to_string(s.d.device()) + ")";
      });
}

#if defined(KVAGENT_WITH_CUDA)

struct PyRopeTable {
  std::shared_ptr<const cuda::RopeDeviceTable> t;
};

using AnyArray = nb::ndarray<nb::ro>;

DevArray DevOf(nb::handle h, const std::string& what, std::vector<AnyArray>* keep) {
  AnyArray a;
  if (!nb::try_cast(h, a, false))
    Raise(InvalidArgumentError(what + " must be a CUDA torch tensor (or another DLPack array), got " +
                               nb::cast<std::string>(nb::str(h.type()))));
  DevArray d;
  d.data = const_cast<void*>(a.data());
  for (size_t i = 0; i < a.ndim(); ++i) {
    d.shape.push_back(static_cast<int64_t>(a.shape(i)));
    d.strides.push_back(a.stride(i));
  }
  nb::dlpack::dtype t = a.dtype();
  d.dtype = DlDType{t.code, t.bits, t.lanes};
  d.device_type = a.device_type();
  d.device_id = a.device_id();
  keep->push_back(std::move(a));
  return d;
}

std::vector<DevArray> DevListOf(nb::handle h, const char* what, std::vector<AnyArray>* keep) {
  std::vector<DevArray> out;
  if (h.is_none()) return out;
  if (!nb::isinstance<nb::sequence>(h) || nb::isinstance<nb::str>(h))
    Raise(InvalidArgumentError(std::string(what) + " must be a list of per-layer CUDA tensors"));
  size_t i = 0;
  for (nb::handle x : h) out.push_back(DevOf(x, std::string(what) + "[" + std::to_string(i++) + "]", keep));
  return out;
}

// One fused move; see python/kv_agent/cuda.py for the arguments.
void Move(bool save, nb::handle src, nb::handle k_cache, nb::handle v_cache, const std::string& layout_name,
          const PyRopeTable* rope, const std::string& rotation_name, nb::handle slots, int64_t slot_base,
          nb::handle new_positions, int64_t new_position_base, nb::handle old_positions, int64_t old_position_base,
          int token_begin, std::optional<int> num_tokens, int layer_begin, int span_layer_begin, uintptr_t stream) {
  std::vector<AnyArray> keep;
  const EngineLayout layout = ValueOrThrow(EngineLayoutFromName(layout_name));
  const cuda::Rotation rotation = ValueOrThrow(RotationFromName(rotation_name));
  int device = -1;
  const PyDeviceSegment* dseg = nullptr;
  SegmentLayout canon;
  const void* src_data = nullptr;
  if (nb::try_cast(src, dseg, false) && dseg != nullptr) {
    if (save) Raise(InvalidArgumentError("src: a DeviceSegment is read-only; save into a canonical CUDA tensor"));
    const DeviceSegment& d = Get(*dseg);
    device = d.device();
    canon = d.meta()->layout;
    src_data = d.data();
  }
  std::vector<DevArray> ks = DevListOf(k_cache, "k_cache", &keep);
  std::vector<DevArray> vs = DevListOf(v_cache, "v_cache", &keep);
  cuda::EngineKvView view = ValueOrThrow(EngineViewOf(layout, ks, vs, &device));
  if (src_data == nullptr) {
    DevArray a = DevOf(src, save ? "dst" : "src", &keep);
    canon = ValueOrThrow(CanonicalLayoutOf(a, device, save ? "dst" : "src"));
    src_data = a.data;
  }
  if (rotation != cuda::Rotation::kNone && rope == nullptr)
    Raise(InvalidArgumentError("rotation '" + rotation_name + "' needs rope= (a CudaRopeTable of the model)"));
  cuda::CanonicalSpan span;
  span.data = src_data;
  span.total_tokens = canon.num_tokens;
  span.token_begin = token_begin;
  span.num_tokens = num_tokens.value_or(canon.num_tokens - token_begin);
  if (token_begin < 0 || span.num_tokens < 1 || token_begin + span.num_tokens > canon.num_tokens)
    Raise(InvalidArgumentError("tokens [" + std::to_string(token_begin) + ", " +
                               std::to_string(token_begin + span.num_tokens) + ") out of the segment's " +
                               std::to_string(canon.num_tokens) + " tokens"));
  if (canon.num_kv_heads != view.num_kv_heads || canon.head_dim != view.head_dim)
    Raise(InvalidArgumentError("segment " + LayoutString(canon) + " does not match the cache's kv_heads=" +
                               std::to_string(view.num_kv_heads) + " head_dim=" + std::to_string(view.head_dim)));
  const int64_t rows = span.num_tokens;
  std::vector<DevArray> row_arrays;
  auto row = [&](nb::handle h, int64_t base, const char* what) {
    if (h.is_none()) return ValueOrThrow(RowArgOf(nullptr, base, rows, device, what));
    DevArray a = DevOf(h, what, &keep);
    return ValueOrThrow(RowArgOf(&a, base, rows, device, what));
  };
  cuda::MoveOptions o;
  o.layer_begin = layer_begin;
  o.span_layer_begin = span_layer_begin;
  o.canonical_dtype = canon.dtype;
  o.rotation = rotation;
  o.rope = rope ? rope->t.get() : nullptr;
  RowArg s = row(slots, slot_base, "slots");
  o.slots = s.ptr;
  o.slot_base = s.base;
  RowArg np = row(new_positions, new_position_base, "new_positions");
  o.new_positions = np.ptr;
  o.new_position_base = np.base;
  RowArg op = row(old_positions, old_position_base, "old_positions");
  o.old_positions = op.ptr;
  o.old_position_base = op.base;
  const auto st = reinterpret_cast<cuda::Stream>(stream);
  Status result;
  {
    nb::gil_scoped_release unlocked;
    result = save ? cuda::SaveFromEngine(std::span<const cuda::CanonicalSpan>(&span, 1), view, o, st)
                  : cuda::LoadToEngine(std::span<const cuda::CanonicalSpan>(&span, 1), view, o, st);
    // The store may evict the segment once the Python object is gone: hold its bytes until the
    // stream has read them.
    if (result.ok() && dseg != nullptr) result = dseg->d.RecordUse(st);
  }
  ThrowIfError(result);
}

void RegisterCudaOps(nb::module_& m) {
  m.def("cuda_available", &cuda::DeviceAvailable, "True when this build has CUDA and a device is usable.");
  m.def(
      "cuda_check", [] { ThrowIfError(cuda::CheckDevice()); }, "Raises UnavailableError naming why no device.");
  m.def(
      "cuda_install_pinned_host_allocator", [] { ThrowIfError(cuda::InstallPinnedHostAllocator()); },
      "Makes new host payload buffers pinned (cudaHostAlloc) for full-speed host->device copies. Call once,\n"
      "before creating segments or stores.");
  nb::class_<PyRopeTable>(m, "CudaRopeTable", "Per-layer RoPE frequencies of a model, uploaded to the device.")
      .def(
          "__init__",
          [](PyRopeTable* self, const ModelSpec& spec) {
            StatusOr<std::shared_ptr<const cuda::RopeDeviceTable>> t = [&] {
              nb::gil_scoped_release unlocked;
              return cuda::RopeDeviceTable::Create(spec);
            }();
            new (self) PyRopeTable{ValueOrThrow(std::move(t))};
          },
          "spec"_a)
      .def_prop_ro("num_layers", [](const PyRopeTable& r) { return r.t->num_layers(); })
      .def_prop_ro("head_dim", [](const PyRopeTable& r) { return r.t->head_dim(); });
  m.def("_cuda_move", &Move, "save"_a, "src"_a, "k_cache"_a, "v_cache"_a.none(), "layout"_a, nb::kw_only(),
        "rope"_a.none() = nb::none(), "rotation"_a = "none", "slots"_a.none() = nb::none(), "slot_base"_a = 0,
        "new_positions"_a.none() = nb::none(), "new_position_base"_a = 0, "old_positions"_a.none() = nb::none(),
        "old_position_base"_a = 0, "token_begin"_a = 0, "num_tokens"_a.none() = nb::none(), "layer_begin"_a = 0,
        "span_layer_begin"_a = -1, "stream"_a = 0,
        "Fused canonical <-> engine move on `stream` (see kv_agent.cuda.load / save).");
}

#else  // no CUDA in this build

Status NoCuda() { return UnavailableError("kv-agent was built without CUDA (rebuild with KVAGENT_CUDA=ON)"); }

struct PyRopeTable {};

void RegisterCudaOps(nb::module_& m) {
  m.def(
      "cuda_available", [] { return false; }, "False: this build has no CUDA.");
  m.def("cuda_check", [] { ThrowIfError(NoCuda()); });
  m.def("cuda_install_pinned_host_allocator", [] { ThrowIfError(NoCuda()); });
  nb::class_<PyRopeTable>(m, "CudaRopeTable").def("__init__", [](PyRopeTable*, nb::handle) { ThrowIfError(NoCuda()); });
  m.def("_cuda_move", [](nb::args, nb::kwargs) { ThrowIfError(NoCuda()); });
}

#endif

void Register(nb::module_& m) {
  RegisterDeviceSegment(m);
  RegisterCudaOps(m);
}

Registration reg("cuda", 1, &Register);

}  // namespace
}  // namespace kvagent::py
