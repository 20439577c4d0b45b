// Core value types: Hash128, DType, RopeSpec, LayerSpec, ModelSpec, SegmentMeta.
#include <nanobind/nanobind.h>
#include <nanobind/operators.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/string_view.h>
#include <nanobind/stl/vector.h>

#include "errors.h"
#include "kvagent/hash.h"
#include "kvagent/model_spec.h"
#include "kvagent/segment.h"
#include "registry.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace kvagent::py {
namespace {

void RegisterCore(nb::module_& m) {
  nb::class_<Hash128>(m, "Hash128", "128-bit xxh3 identity (segment keys, model fingerprints).")
      .def(nb::init<>())
      .def_rw("lo", &Hash128::lo)
      .def_rw("hi", &Hash128::hi)
      .def("hex", &Hash128::ToHex, "32 lowercase hex digits.")
      .def_static("from_hex", [](std::string_view s) { return ValueOrThrow(Hash128::FromHex(s)); }, "hex"_a)
      .def_static("of_bytes", [](nb::bytes b) { return HashString(std::string_view(b.c_str(), b.size())); },
                  "data"_a, "xxh3-128 of raw bytes.")
      .def_static("of_str", [](std::string_view s) { return HashString(s); }, "text"_a)
      .def("is_zero", &Hash128::IsZero)
      .def(nb::self == nb::self)
      .def(nb::self != nb::self)
      .def("__hash__", [](const Hash128& h) { return static_cast<Py_ssize_t>(Hash128Hasher{}(h)); })
      .def("__repr__", [](const Hash128& h) { return "Hash128('" + h.ToHex() + "')"; })
      .def("__str__", &Hash128::ToHex);

  m.def("memory_key", &MemoryKey, "ns"_a, "session"_a, "turn"_a, "chunk"_a = 0,
        "Key of a memory slot (namespace, session, turn, chunk).");
  m.def("prefix_key",
        [](const Hash128& model, const Hash128& parent, const std::vector<int32_t>& tokens) {
          return PrefixKey(model, parent, tokens);
        },
        "model"_a, "parent"_a, "tokens"_a, "Prefix-chained key of `tokens` after the block keyed `parent`.");
  m.def("content_hash", [](const Hash128& model, const std::vector<int32_t>& tokens) { return ContentHash(model, tokens); },
        "model"_a, "tokens"_a);

  nb::enum_<DType>(m, "DType")
      .value("f32", DType::kF32)
      .value("f16", DType::kF16)
      .value("bf16", DType::kBF16)
      .value("i8", DType::kI8);

  nb::enum_<RopeStyle>(m, "RopeStyle")
      .value("half_split", RopeStyle::kHalfSplit)
      .value("interleaved", RopeStyle::kInterleaved);
  nb::enum_<RopeScaling>(m, "RopeScaling")
      .value("none", RopeScaling::kNone)
      .value("linear", RopeScaling::kLinear)
      .value("llama3", RopeScaling::kLlama3)
      .value("yarn", RopeScaling::kYarn)
      .value("dynamic", RopeScaling::kDynamicNtk);

  nb::class_<RopeSpec>(m, "RopeSpec", "Rotary embedding of one layer (mirrors HF rope_parameters).")
      .def(nb::init<>())
      .def_rw("enabled", &RopeSpec::enabled)
      .def_rw("theta", &RopeSpec::theta)
      .def_rw("rotary_dim", &RopeSpec::rotary_dim)
      .def_rw("style", &RopeSpec::style)
      .def_rw("scaling", &RopeSpec::scaling)
      .def_rw("factor", &RopeSpec::factor)
      .def_rw("low_freq_factor", &RopeSpec::low_freq_factor)
      .def_rw("high_freq_factor", &RopeSpec::high_freq_factor)
      .def_rw("original_max_position", &RopeSpec::original_max_position)
      .def_rw("beta_fast", &RopeSpec::beta_fast)
      .def_rw("beta_slow", &RopeSpec::beta_slow)
      .def_rw("attention_factor", &RopeSpec::attention_factor)
      .def_rw("dynamic_max_position", &RopeSpec::dynamic_max_position)
      .def(nb::self == nb::self);

  nb::class_<LayerSpec>(m, "LayerSpec")
      .def(nb::init<>())
      .def_rw("sliding_window", &LayerSpec::sliding_window)
      .def_rw("rope", &LayerSpec::rope);

  nb::class_<ModelSpec>(m, "ModelSpec", "KV geometry, per-layer RoPE and window, fingerprint of the weights.")
      .def(nb::init<>())
      .def_rw("name", &ModelSpec::name)
      .def_rw("num_layers", &ModelSpec::num_layers)
      .def_rw("num_q_heads", &ModelSpec::num_q_heads)
      .def_rw("num_kv_heads", &ModelSpec::num_kv_heads)
      .def_rw("head_dim", &ModelSpec::head_dim)
      .def_rw("kv_dtype", &ModelSpec::kv_dtype)
      .def_rw("attn_scale", &ModelSpec::attn_scale)
      .def_rw("layers", &ModelSpec::layers)
      .def_rw("fingerprint", &ModelSpec::fingerprint)
      .def("validate", [](const ModelSpec& s) { ThrowIfError(s.Validate()); })
      .def("kv_bytes_per_token", &ModelSpec::KvBytesPerToken)
      .def("effective_attn_scale", &ModelSpec::EffectiveAttnScale)
      .def("serialize", [](const ModelSpec& s) {
        std::string b = s.Serialize();
        return nb::bytes(b.data(), b.size());
      })
      .def_static("deserialize",
                  [](nb::bytes b) { return ValueOrThrow(ModelSpec::Deserialize(std::string_view(b.c_str(), b.size()))); })
      .def(nb::self == nb::self);

  m.def("uniform_model_spec", &UniformModelSpec, "name"_a, "num_layers"_a, "num_q_heads"_a, "num_kv_heads"_a,
        "head_dim"_a, "kv_dtype"_a, "rope"_a, "fingerprint"_a,
        "A spec whose layers all use full attention and the same RoPE.");

  nb::class_<SegmentMeta>(m, "SegmentMeta")
      .def(nb::init<>())
      .def_rw("ns", &SegmentMeta::ns)
      .def_rw("agent", &SegmentMeta::agent)
      .def_rw("session", &SegmentMeta::session)
      .def_rw("turn", &SegmentMeta::turn)
      .def_rw("chunk", &SegmentMeta::chunk)
      .def_rw("role", &SegmentMeta::role)
      .def_rw("text", &SegmentMeta::text)
      .def_rw("time_us", &SegmentMeta::time_us);
}

Registration reg("core", 0, &RegisterCore);

}  // namespace
}  // namespace kvagent::py
