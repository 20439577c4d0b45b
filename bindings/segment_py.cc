// Python Segment, SegmentLayout and SegmentInfo. K/V cross as DLPack (numpy, torch; CPU).
#include "segment_py.h"

#include <nanobind/ndarray.h>

#include "kvagent/codec.h"
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <array>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "errors.h"
#include "kvagent/segment.h"
#include "registry.h"
#include "segment_glue.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace kvagent::py {
namespace {

using AnyArray = nb::ndarray<nb::ro>;

[[noreturn]] void Raise(const Status& s) {
  ThrowIfError(s);
  throw nb::python_error();  // unreachable: s is not OK
}

bool InterpreterFinalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing();
#else
  return _Py_IsFinalizing();
#endif
}

std::string NameOf(nb::handle type_or_obj) { return nb::cast<std::string>(nb::str(type_or_obj)); }

// Imports `obj` as a CPU array without conversion (no copy); InvalidArgument otherwise.
AnyArray ImportArray(nb::handle obj, const char* what) {
  AnyArray a;
  if (!nb::try_cast(obj, a, /*convert=*/false)) {
    Raise(InvalidArgumentError(std::string(what) + " must be a numpy array or a torch tensor (DLPack), got " +
                               NameOf(obj.type())));
  }
  if (a.device_type() != nb::device::cpu::value)
    Raise(InvalidArgumentError(std::string(what) + " must live in CPU memory (DLPack device type " +
                               std::to_string(a.device_type()) + "); copy it to the host first"));
  return a;
}

ArrayRef RefOf(const AnyArray& a, const char* what) {
  nb::dlpack::dtype dt = a.dtype();
  ArrayRef r;
  r.dtype = ValueOrThrow(PayloadDTypeOf(DlDType{dt.code, dt.bits, dt.lanes}, what));
  r.data = reinterpret_cast<const std::byte*>(a.data());
  r.shape.resize(a.ndim());
  r.strides.resize(a.ndim());
  int64_t acc = 1;
  for (size_t i = a.ndim(); i-- > 0;) {
    r.shape[i] = static_cast<int64_t>(a.shape(i));
    r.strides[i] = a.stride_ptr() != nullptr ? a.stride(i) : acc;
    acc *= r.shape[i];
  }
  return r;
}

// Integers from a 1-D integer array (numpy, torch; copied) or a Python sequence.
template <typename T>
std::vector<T> IntsFrom(nb::handle obj, const char* what) {
  std::vector<T> out;
  AnyArray a;
  if (nb::try_cast(obj, a, /*convert=*/false)) {
    nb::dlpack::dtype dt = a.dtype();
    if (a.device_type() != nb::device::cpu::value || a.ndim() != 1 || (dt.code != 0 && dt.code != 1) || dt.lanes != 1 ||
        (dt.bits != 8 && dt.bits != 16 && dt.bits != 32 && dt.bits != 64))
      Raise(InvalidArgumentError(std::string(what) + " must be a 1-D integer CPU array or a sequence of ints, got " +
                                 std::to_string(a.ndim()) + "-D " + DlDTypeName({dt.code, dt.bits, dt.lanes})));
    out.resize(a.shape(0));
    const auto* base = static_cast<const std::byte*>(a.data());
    const int64_t stride = a.stride_ptr() != nullptr ? a.stride(0) : 1;
    for (size_t i = 0; i < out.size(); ++i) {
      const std::byte* p = base + static_cast<int64_t>(i) * stride * (dt.bits / 8);
      int64_t x = 0;
      uint64_t u = 0;
      switch (dt.bits) {
        case 8:
          x = dt.code == 0 ? int64_t(*reinterpret_cast<const int8_t*>(p))
                           : int64_t(*reinterpret_cast<const uint8_t*>(p));
          break;
        case 16:
          x = dt.code == 0 ? int64_t(*reinterpret_cast<const int16_t*>(p))
                           : int64_t(*reinterpret_cast<const uint16_t*>(p));
          break;
        case 32:
          x = dt.code == 0 ? int64_t(*reinterpret_cast<const int32_t*>(p))
                           : int64_t(*reinterpret_cast<const uint32_t*>(p));
          break;
        default:
          std::memcpy(&u, p, 8);
          if (dt.code == 1 && u > uint64_t(INT64_MAX))
            Raise(InvalidArgumentError(std::string(what) + " value " + std::to_string(u) + " is out of range"));
          x = static_cast<int64_t>(u);
      }
      if (x < int64_t(std::numeric_limits<T>::min()) || x > int64_t(std::numeric_limits<T>::max()))
        Raise(InvalidArgumentError(std::string(what) + " value " + std::to_string(x) + " is out of range"));
      out[i] = static_cast<T>(x);
    }
    return out;
  }
  if (!nb::try_cast(obj, out, /*convert=*/true))
    Raise(InvalidArgumentError(std::string(what) + " must be a 1-D integer array or a sequence of ints in range, got " +
                               NameOf(obj.type())));
  return out;
}

// Python references kept by a zero-copy payload. Dropped with the GIL held, from whichever
// thread releases the last Buffer reference (possibly the store's write-behind thread).
struct Keep {
  AnyArray a;
  AnyArray b;
};

std::function<void()> ReleaseWithGil(Keep* keep) {
  return [keep] {
    // After interpreter shutdown began, taking the GIL from a foreign thread may hang; the
    // references are then leaked (the process is exiting anyway).
    if (!Py_IsInitialized() || InterpreterFinalizing()) return;
    PyGILState_STATE st = PyGILState_Ensure();
    delete keep;
    PyGILState_Release(st);
  };
}

// A read-only framework array over segment memory; `owner` (the Python Segment) stays alive
// as long as the array does.
nb::object ExportArray(nb::handle owner, const std::byte* data, DType dt, std::vector<size_t> shape,
                       std::vector<int64_t> strides, const std::string& framework) {
  DlDType d = DlDTypeOf(dt);
  nb::dlpack::dtype ndt{d.code, d.bits, d.lanes};
  if (framework == "numpy") {
    if (dt == DType::kBF16)
      Raise(InvalidArgumentError("numpy has no bfloat16: export this bf16 segment with framework='torch'"));
    nb::ndarray<nb::numpy, nb::ro> arr(data, shape.size(), shape.data(), owner, strides.data(), ndt);
    return nb::cast(arr, nb::rv_policy::reference);
  }
  if (framework == "torch") {
    nb::ndarray<nb::pytorch, nb::ro> arr(data, shape.size(), shape.data(), owner, strides.data(), ndt);
    return nb::cast(arr, nb::rv_policy::reference);
  }
  Raise(InvalidArgumentError("framework must be 'numpy' or 'torch', got '" + framework + "'"));
}

int CheckLayer(const Segment& s, int layer) {
  if (layer < -s.layout.num_layers || layer >= s.layout.num_layers)
    Raise(OutOfRangeError("layer " + std::to_string(layer) + " out of range for a segment with " +
                          std::to_string(s.layout.num_layers) + " layers"));
  return layer < 0 ? layer + s.layout.num_layers : layer;
}

// K (kvi = 0) or V (kvi = 1): [heads, tokens, dim] of one layer, or [layers, heads, tokens, dim].
nb::object ExportHalf(nb::handle self, const Segment& s, int kvi, std::optional<int> layer,
                      const std::string& framework) {
  const SegmentLayout& l = s.layout;
  const int64_t plane = static_cast<int64_t>(l.num_tokens) * l.head_dim;
  std::vector<size_t> shape = {size_t(l.num_kv_heads), size_t(l.num_tokens), size_t(l.head_dim)};
  std::vector<int64_t> strides = {plane, l.head_dim, 1};
  size_t offset;
  if (layer.has_value()) {
    offset = l.Offset(CheckLayer(s, *layer), kvi, 0, 0);
  } else {
    shape.insert(shape.begin(), size_t(l.num_layers));
    strides.insert(strides.begin(), 2 * plane * l.num_kv_heads);
    offset = l.Offset(0, kvi, 0, 0);
  }
  return ExportArray(self, s.payload->data() + offset * DTypeSize(l.dtype), l.dtype, shape, strides, framework);
}

void InitSegment(PySegment* self, nb::handle kv, nb::handle k, nb::handle v, nb::handle tokens, nb::handle model,
                 nb::handle positions, std::optional<Hash128> key, std::optional<Hash128> parent,
                 std::optional<SegmentMeta> meta, std::optional<std::string> ns, std::optional<std::string> agent,
                 std::optional<std::string> session, std::optional<int64_t> turn, std::optional<int32_t> chunk,
                 std::optional<std::string> role, std::optional<std::string> text, std::optional<int64_t> time_us,
                 bool pre_rope, nb::bytes summary, std::optional<bool> copy) {
  SegmentFields f;
  f.tokens = IntsFrom<int32_t>(tokens, "tokens");
  if (!positions.is_none()) f.positions = IntsFrom<int64_t>(positions, "positions");
  f.key = key;
  f.parent = parent.value_or(Hash128{});
  f.pre_rope = pre_rope;
  f.summary.assign(summary.c_str(), summary.size());

  ModelSpec spec;
  if (nb::try_cast(model, f.model, false)) {
  } else if (nb::try_cast(model, spec, false)) {
    f.model = spec.fingerprint;
    f.spec = &spec;
  } else {
    Raise(InvalidArgumentError("model must be a Hash128 fingerprint or a ModelSpec, got " + NameOf(model.type())));
  }

  bool any_field = ns || agent || session || turn || chunk || role || text || time_us;
  if (meta.has_value()) {
    if (any_field) Raise(InvalidArgumentError("pass either meta= or the individual metadata fields, not both"));
    f.meta = *meta;
  } else {
    f.meta.ns = ns.value_or("");
    f.meta.agent = agent.value_or("");
    f.meta.session = session.value_or("");
    f.meta.turn = turn.value_or(0);
    f.meta.chunk = chunk.value_or(0);
    f.meta.role = role.value_or("");
    f.meta.text = text.value_or("");
    f.meta.time_us = time_us.value_or(0);
  }

  const bool have_kv = !kv.is_none();
  const bool have_k = !k.is_none(), have_v = !v.is_none();
  if (have_kv == (have_k || have_v) || have_k != have_v)
    Raise(
        InvalidArgumentError("pass either kv=[layers, 2, kv_heads, tokens, head_dim] or both k= and v= "
                             "[layers, kv_heads, tokens, head_dim]"));

  auto keep = std::make_unique<Keep>();
  ArrayRef ra, rb;
  SegmentLayout layout;
  const std::byte* base;
  if (have_kv) {
    keep->a = ImportArray(kv, "kv");
    ra = RefOf(keep->a, "kv");
    layout = ValueOrThrow(LayoutOfKv(ra));
    base = CanonicalBaseOfKv(ra, layout);
  } else {
    keep->a = ImportArray(k, "k");
    keep->b = ImportArray(v, "v");
    ra = RefOf(keep->a, "k");
    rb = RefOf(keep->b, "v");
    layout = ValueOrThrow(LayoutOfKAndV(ra, rb));
    base = CanonicalBaseOfKAndV(ra, rb, layout);
  }

  std::shared_ptr<Buffer> payload;
  if (copy == false && base == nullptr)
    Raise(InvalidArgumentError(
        std::string("copy=False needs ") +
        (have_kv ? "a C-contiguous kv array" : "k and v to be the halves kv[:, 0], kv[:, 1] of one C-contiguous kv") +
        " in the canonical layout [layers, 2, kv_heads, tokens, head_dim]; pass copy=True or None"));
  if (copy != true && base != nullptr) {
    Keep* raw = keep.release();
    payload = Buffer::Wrap(const_cast<std::byte*>(base), layout.NumBytes(), ReleaseWithGil(raw));
  } else {
    payload = ValueOrThrow(Buffer::Allocate(layout.NumBytes()));
    nb::gil_scoped_release unlocked;
    if (base != nullptr) {
      std::memcpy(payload->data(), base, layout.NumBytes());
    } else if (have_kv) {
      CopyKvToCanonical(ra, layout, payload->data());
    } else {
      CopyKAndVToCanonical(ra, rb, layout, payload->data());
    }
  }
  SegmentHandle seg = ValueOrThrow(MakeSegment(std::move(f), layout, std::move(payload)));
  new (self) PySegment{std::move(seg)};
}

nb::dict MetaDict(const SegmentMeta& m) {
  nb::dict d;
  d["ns"] = m.ns;
  d["agent"] = m.agent;
  d["session"] = m.session;
  d["turn"] = m.turn;
  d["chunk"] = m.chunk;
  d["role"] = m.role;
  d["text"] = m.text;
  d["time_us"] = m.time_us;
  return d;
}

nb::dict LayoutDict(const SegmentLayout& l) {
  nb::dict d;
  d["num_layers"] = l.num_layers;
  d["num_kv_heads"] = l.num_kv_heads;
  d["num_tokens"] = l.num_tokens;
  d["head_dim"] = l.head_dim;
  d["dtype"] = std::string(DTypeName(l.dtype));
  return d;
}

nb::dict InfoDict(const SegmentInfo& i) {
  nb::dict d;
  d["key"] = i.key.ToHex();
  d["model"] = i.model.ToHex();
  d["parent"] = i.parent.ToHex();
  d["layout"] = LayoutDict(i.layout);
  d["pre_rope"] = i.pre_rope;
  d["meta"] = MetaDict(i.meta);
  d["payload_bytes"] = i.payload_bytes;
  d["stored_bytes"] = i.stored_bytes;
  d["codec"] = std::string(CodecName(static_cast<CodecKind>(i.codec)));
  d["summary_bytes"] = i.summary.size();
  return d;
}

const SegmentHandle& Get(const PySegment& s) { return s.seg; }

void RegisterSegment(nb::module_& m) {
  nb::class_<SegmentLayout>(m, "SegmentLayout", "Shape of a canonical payload [layer][k|v][kv_head][token][dim].")
      .def(nb::init<>())
      .def_rw("num_layers", &SegmentLayout::num_layers)
      .def_rw("num_kv_heads", &SegmentLayout::num_kv_heads)
      .def_rw("head_dim", &SegmentLayout::head_dim)
      .def_rw("num_tokens", &SegmentLayout::num_tokens)
      .def_rw("dtype", &SegmentLayout::dtype)
      .def_prop_ro(
          "shape",
          [](const SegmentLayout& l) {
            return nb::make_tuple(l.num_layers, 2, l.num_kv_heads, l.num_tokens, l.head_dim);
          },
          "(layers, 2, kv_heads, tokens, head_dim)")
      .def_prop_ro("nbytes", &SegmentLayout::NumBytes)
      .def("to_dict", &LayoutDict)
      .def("__eq__", [](const SegmentLayout& a, const SegmentLayout& b) { return a == b; })
      .def("__repr__", [](const SegmentLayout& l) { return "SegmentLayout(" + LayoutString(l) + ")"; });

  nb::class_<SegmentInfo>(m, "SegmentInfo",
                          "Metadata and sizes of a stored segment, without its payload. Attributes, plus "
                          "dict-style access: info['meta']['turn'], info.keys(), info.to_dict().")
      .def_ro("key", &SegmentInfo::key)
      .def_ro("model", &SegmentInfo::model)
      .def_ro("parent", &SegmentInfo::parent)
      .def_ro("layout", &SegmentInfo::layout)
      .def_ro("pre_rope", &SegmentInfo::pre_rope)
      .def_ro("meta", &SegmentInfo::meta)
      .def_ro("payload_bytes", &SegmentInfo::payload_bytes, "Canonical (decoded) payload bytes.")
      .def_ro("stored_bytes", &SegmentInfo::stored_bytes, "Bytes in the tier holding it (after the codec).")
      .def_prop_ro("codec", [](const SegmentInfo& i) { return std::string(CodecName(static_cast<CodecKind>(i.codec))); },
                   "Codec of the tier holding it: 'raw' or 'int8'.")
      .def_prop_ro("summary", [](const SegmentInfo& i) { return nb::bytes(i.summary.data(), i.summary.size()); },
                   "Compressed keys (kv_agent.index.summarize bytes), empty if none.")
      .def("to_dict", &InfoDict, "Plain dict; hashes as hex strings, dtype as its name.")
      .def("keys", [](const SegmentInfo& i) { return InfoDict(i).attr("keys")(); })
      .def("__getitem__",
           [](const SegmentInfo& i, const std::string& name) -> nb::object {
             nb::dict d = InfoDict(i);
             if (!d.contains(name.c_str())) throw nb::key_error(name.c_str());
             return d[name.c_str()];
           })
      .def("__repr__", [](const SegmentInfo& i) {
        return "SegmentInfo(key=" + i.key.ToHex() + ", ns='" + i.meta.ns + "', session='" + i.meta.session +
               "', turn=" + std::to_string(i.meta.turn) + ", " + LayoutString(i.layout) + ")";
      });

  nb::class_<PySegment>(
      m, "Segment",
      "An immutable span of tokens with its KV payload, positions and metadata.\n\n"
      "Construct from ONE array kv of shape [layers, 2, kv_heads, tokens, head_dim] or TWO arrays k, v of\n"
      "shape [layers, kv_heads, tokens, head_dim] (numpy or CPU torch; float32, float16 or bfloat16 --\n"
      "bfloat16 through torch). copy follows numpy 2's asarray: None (default) wraps the arrays without a\n"
      "copy when they already are one C-contiguous canonical block (a contiguous kv, or its halves\n"
      "kv[:, 0] and kv[:, 1]) and copies otherwise; False never copies (InvalidArgumentError if a copy is\n"
      "needed); True always copies. A wrapped array is referenced, not copied: do not mutate it while the\n"
      "Segment lives (Store.put copies the payload, so what was stored is not affected afterwards).\n"
      "Copies run with the GIL released.\n"
      "key defaults to memory_key(ns, session, turn, chunk); positions default to 0..tokens-1.\n"
      "model is the weights' fingerprint (Hash128) or a ModelSpec (then the layout must match it).")
      .def("__init__", &InitSegment, "kv"_a = nb::none(), nb::kw_only(), "k"_a = nb::none(), "v"_a = nb::none(),
           "tokens"_a, "model"_a, "positions"_a = nb::none(), "key"_a = nb::none(), "parent"_a = nb::none(),
           "meta"_a = nb::none(), "ns"_a = nb::none(), "agent"_a = nb::none(), "session"_a = nb::none(),
           "turn"_a = nb::none(), "chunk"_a = nb::none(), "role"_a = nb::none(), "text"_a = nb::none(),
           "time_us"_a = nb::none(), "pre_rope"_a = true, "summary"_a = nb::bytes(""), "copy"_a = nb::none())
      .def_prop_ro("key", [](const PySegment& s) { return Get(s)->key; })
      .def_prop_ro("model", [](const PySegment& s) { return Get(s)->model; })
      .def_prop_ro("parent", [](const PySegment& s) { return Get(s)->parent; })
      .def_prop_ro("layout", [](const PySegment& s) { return Get(s)->layout; })
      .def_prop_ro("dtype", [](const PySegment& s) { return Get(s)->layout.dtype; })
      .def_prop_ro("num_tokens", [](const PySegment& s) { return Get(s)->layout.num_tokens; })
      .def_prop_ro(
          "nbytes", [](const PySegment& s) { return Get(s)->PayloadBytes(); }, "Payload bytes.")
      .def_prop_ro("pre_rope", [](const PySegment& s) { return Get(s)->pre_rope; })
      .def_prop_ro(
          "meta", [](const PySegment& s) { return Get(s)->meta; }, "A copy of the metadata.")
      .def_prop_ro("summary",
                   [](const PySegment& s) { return nb::bytes(Get(s)->summary.data(), Get(s)->summary.size()); })
      .def_prop_ro(
          "tokens", [](nb::handle self) { return ExportVector(self, Get(nb::cast<PySegment&>(self))->tokens); },
          "Token ids: read-only int32 numpy view.")
      .def_prop_ro(
          "positions", [](nb::handle self) { return ExportVector(self, Get(nb::cast<PySegment&>(self))->positions); },
          "Original positions: read-only int64 numpy view.")
      .def(
          "kv",
          [](nb::handle self, const std::string& framework) {
            const Segment& s = *Get(nb::cast<PySegment&>(self));
            const SegmentLayout& l = s.layout;
            std::vector<size_t> shape = {size_t(l.num_layers), 2, size_t(l.num_kv_heads), size_t(l.num_tokens),
                                         size_t(l.head_dim)};
            std::vector<int64_t> strides = {2 * int64_t(l.num_kv_heads) * int64_t(l.PlaneElements()),
                                            int64_t(l.num_kv_heads) * int64_t(l.PlaneElements()),
                                            int64_t(l.PlaneElements()), l.head_dim, 1};
            return ExportArray(self, s.payload->data(), l.dtype, shape, strides, framework);
          },
          "framework"_a = "numpy",
          "The payload [layers, 2, kv_heads, tokens, head_dim] as a read-only view (no copy) that keeps the "
          "segment alive. numpy cannot hold bf16: use framework='torch'. Torch has no read-only tensors: "
          "never write to the returned tensor.")
      .def(
          "k",
          [](nb::handle self, std::optional<int> layer, const std::string& framework) {
            return ExportHalf(self, *Get(nb::cast<PySegment&>(self)), 0, layer, framework);
          },
          "layer"_a = nb::none(), "framework"_a = "numpy",
          "K of one layer [kv_heads, tokens, head_dim], or of all layers [layers, kv_heads, tokens, head_dim] "
          "(strided), as a read-only view.")
      .def(
          "v",
          [](nb::handle self, std::optional<int> layer, const std::string& framework) {
            return ExportHalf(self, *Get(nb::cast<PySegment&>(self)), 1, layer, framework);
          },
          "layer"_a = nb::none(), "framework"_a = "numpy", "V views, as k().")
      .def("content_hash", [](const PySegment& s) { return Get(s)->Content(); })
      .def("info", [](const PySegment& s) { return InfoOf(*Get(s)); })
      .def("__len__", [](const PySegment& s) { return Get(s)->layout.num_tokens; })
      .def("__repr__", [](const PySegment& s) {
        const Segment& g = *Get(s);
        return "Segment(key=" + g.key.ToHex() + ", ns='" + g.meta.ns + "', session='" + g.meta.session +
               "', turn=" + std::to_string(g.meta.turn) + ", " + LayoutString(g.layout) + ")";
      });
}

Registration reg("segment", 1, &RegisterSegment);

}  // namespace
}  // namespace kvagent::py
