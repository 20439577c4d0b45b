// llama.cpp engine bindings (kvagent/llama_engine.h): declarations, dtype/shape checks, GIL
// release. Built only when CMake found llama.cpp (KVAGENT_HAVE_LLAMA_CPP); the Python adapter
// is python/kv_agent/engines/llama_cpp.py.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/string_view.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <vector>

#include "errors.h"
#include "kvagent/llama_engine.h"
#include "registry.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace kvagent::py {
namespace {

using Floats = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using Ints64 = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// A numpy array owning `v` (moved), with `shape`.
template <typename T>
nb::object Owned(std::vector<T>&& v, std::vector<size_t> shape) {
  auto* holder = new std::vector<T>(std::move(v));
  nb::capsule owner(holder, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::cast(nb::ndarray<nb::numpy, T>(holder->data(), shape.size(), shape.data(), owner));
}

void Register(nb::module_& m) {
  nb::class_<LlamaEngine>(m, "LlamaEngine",
                          "A GGUF model run by llama.cpp with kv-agent's canonical KV in and out "
                          "(include/kvagent/llama_engine.h has the contract).")
      .def(
          "__init__",
          [](LlamaEngine* self, const std::string& path, int context_tokens, int batch_tokens, int threads,
             std::string_view kv_type) {
            LlamaEngineOptions o;
            o.model_path = path;
            o.context_tokens = context_tokens;
            o.batch_tokens = batch_tokens;
            o.threads = threads;
            o.kv_type = ValueOrThrow(ParseLlamaKvType(kv_type));
            StatusOr<std::unique_ptr<LlamaEngine>> e = [&] {
              nb::gil_scoped_release release;
              return LlamaEngine::Open(o);
            }();
            ThrowIfError(e.status());
            // LlamaEngine is not movable: adopt the opened engine's state through placement.
            new (self) LlamaEngine(std::move(**e));
          },
          "path"_a, "context_tokens"_a = 8192, "batch_tokens"_a = 512, "threads"_a = 0, "kv_type"_a = "f16")
      .def_prop_ro("spec", [](const LlamaEngine& e) { return e.spec(); })
      .def_prop_ro("architecture", &LlamaEngine::architecture)
      .def_prop_ro("kv_type", [](const LlamaEngine& e) { return std::string(LlamaKvTypeName(e.kv_type())); })
      .def_prop_ro("context_capacity", &LlamaEngine::context_capacity)
      .def_prop_ro("vocab_size", &LlamaEngine::vocab_size)
      .def_prop_ro("bos_token", &LlamaEngine::bos_token)
      .def_prop_ro("next_position", &LlamaEngine::NextPosition)
      .def("end_of_generation_tokens", &LlamaEngine::end_of_generation_tokens)
      .def("chat_template", &LlamaEngine::ChatTemplate)
      .def(
          "tokenize",
          [](const LlamaEngine& e, std::string_view text, bool add_special, bool parse_special) {
            return ValueOrThrow(e.Tokenize(text, add_special, parse_special));
          },
          "text"_a, "add_special"_a = false, "parse_special"_a = true)
      .def(
          "detokenize",
          [](const LlamaEngine& e, const std::vector<int32_t>& ids) { return ValueOrThrow(e.Detokenize(ids)); },
          "ids"_a)
      .def("reset", &LlamaEngine::Reset)
      .def(
          "place_context",
          [](LlamaEngine& e, const Floats& kv, const Ints64& positions) {
            const ModelSpec& s = e.spec();
            const size_t n = positions.shape(0);
            if (kv.ndim() != 5 || kv.shape(0) != static_cast<size_t>(s.num_layers) || kv.shape(1) != 2 ||
                kv.shape(2) != static_cast<size_t>(s.num_kv_heads) || kv.shape(3) != n ||
                kv.shape(4) != static_cast<size_t>(s.head_dim)) {
              ThrowIfError(InvalidArgumentError(
                  "place_context: kv must be float32 [layers=" + std::to_string(s.num_layers) + ", 2, kv_heads=" +
                  std::to_string(s.num_kv_heads) + ", tokens=len(positions)=" + std::to_string(n) +
                  ", head_dim=" + std::to_string(s.head_dim) + "]"));
            }
            Status st;
            {
              nb::gil_scoped_release release;
              st = e.PlaceContext(std::span<const float>(kv.data(), kv.size()),
                                  std::span<const int64_t>(positions.data(), n));
            }
            ThrowIfError(st);
          },
          "kv"_a, "positions"_a)
      .def(
          "capture",
          [](LlamaEngine& e, const std::vector<int32_t>& tokens) {
            StatusOr<LlamaKv> r = [&] {
              nb::gil_scoped_release release;
              return e.Capture(tokens);
            }();
            LlamaKv c = ValueOrThrow(std::move(r));
            const ModelSpec& s = e.spec();
            const size_t T = c.positions.size();
            nb::object kv = Owned(std::move(c.kv), {static_cast<size_t>(s.num_layers), 2,
                                                    static_cast<size_t>(s.num_kv_heads), T,
                                                    static_cast<size_t>(s.head_dim)});
            nb::object pos = Owned(std::move(c.positions), {T});
            return nb::make_tuple(kv, pos);
          },
          "tokens"_a, "(kv float32 [layers, 2, kv_heads, tokens, head_dim] pre-RoPE, positions int64)")
      .def(
          "query_vectors",
          [](LlamaEngine& e, const std::vector<int32_t>& tokens, const std::vector<int>& layers) {
            StatusOr<std::vector<float>> r = [&] {
              nb::gil_scoped_release release;
              return e.QueryVectors(tokens, layers);
            }();
            const ModelSpec& s = e.spec();
            return Owned(ValueOrThrow(std::move(r)), {layers.size(), static_cast<size_t>(s.num_q_heads),
                                                      tokens.size(), static_cast<size_t>(s.head_dim)});
          },
          "tokens"_a, "layers"_a)
      .def(
          "logits",
          [](LlamaEngine& e, const std::vector<int32_t>& tokens) {
            StatusOr<std::vector<float>> r = [&] {
              nb::gil_scoped_release release;
              return e.Logits(tokens);
            }();
            std::vector<float> v = ValueOrThrow(std::move(r));
            const size_t n = v.size();
            return Owned(std::move(v), {n});
          },
          "tokens"_a)
      .def(
          "generate",
          [](LlamaEngine& e, const std::vector<int32_t>& tokens, int max_new_tokens, const std::vector<int32_t>& stop) {
            StatusOr<LlamaGeneration> r = [&] {
              nb::gil_scoped_release release;
              return e.Generate(tokens, max_new_tokens, stop);
            }();
            LlamaGeneration g = ValueOrThrow(std::move(r));
            nb::dict d;
            d["tokens"] = g.tokens;
            d["prefill_tokens"] = g.prefill_tokens;
            d["context_tokens"] = g.context_tokens;
            d["prefill_s"] = g.prefill_s;
            d["first_token_s"] = g.first_token_s;
            d["decode_s"] = g.decode_s;
            return d;
          },
          "tokens"_a, "max_new_tokens"_a = 128, "stop"_a = std::vector<int32_t>{});
}

Registration reg("llama_cpp", 30, &Register);

}  // namespace
}  // namespace kvagent::py
