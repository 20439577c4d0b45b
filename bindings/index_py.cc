// Latent index bindings: KeySummary construction from key arrays and LatentIndex. Arrays cross as
// nanobind ndarrays (buffer protocol / DLPack, CPU, C-contiguous, no copy); the Python layer
// (kv_agent/index.py) makes inputs contiguous and maps option names. Blocking calls release the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <string>
#include <tuple>

#include "errors.h"
#include "kvagent/index.h"
#include "registry.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace kvagent::py {
namespace {

using AnyCpuArray = nb::ndarray<nb::ro, nb::device::cpu>;

// The array's element type as a DType, after checking rank and C-contiguity.
DType CheckedArray(const AnyCpuArray& a, size_t ndim, const char* what) {
  if (a.ndim() != ndim) {
    ThrowIfError(InvalidArgumentError(std::string(what) + ": expected " + std::to_string(ndim) + " dimensions, got " +
                                      std::to_string(a.ndim())));
  }
  int64_t expect = 1;
  for (size_t i = ndim; i-- > 0;) {
    if (a.shape(i) > 1 && a.stride(i) != expect) {
      ThrowIfError(InvalidArgumentError(std::string(what) + ": array must be C-contiguous"));
    }
    expect *= static_cast<int64_t>(a.shape(i));
  }
  const nb::dlpack::dtype dt = a.dtype();
  if (dt == nb::dtype<float>()) return DType::kF32;
  if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) && dt.bits == 16 && dt.lanes == 1)
    return DType::kF16;
  if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) && dt.bits == 16 && dt.lanes == 1)
    return DType::kBF16;
  ThrowIfError(InvalidArgumentError(std::string(what) + ": dtype must be float32, float16 or bfloat16"));
  return DType::kF32;
}

int Dim(const AnyCpuArray& a, size_t i, const char* what) {
  if (a.shape(i) > static_cast<size_t>(INT32_MAX))
    ThrowIfError(InvalidArgumentError(std::string(what) + ": too large"));
  return static_cast<int>(a.shape(i));
}

template <typename E>
E EnumFromName(const std::string& name, std::initializer_list<std::pair<const char*, E>> table, const char* what) {
  for (const auto& [n, v] : table) {
    if (name == n) return v;
  }
  std::string allowed;
  for (const auto& [n, v] : table) allowed += std::string(allowed.empty() ? "" : ", ") + n;
  ThrowIfError(InvalidArgumentError(std::string(what) + " must be one of " + allowed + " (got '" + name + "')"));
  return table.begin()->second;
}

nb::dict BreakdownDict(const Breakdown& b) {
  nb::dict d;
  d["layers"] = nb::cast(b.layers);
  d["per_layer"] = nb::cast(b.per_layer);
  d["per_kv_head"] = nb::cast(b.per_kv_head);
  d["per_chunk"] = nb::cast(b.per_chunk);
  nb::list chunks;
  for (const auto& [lo, hi] : b.chunk_tokens) chunks.append(nb::make_tuple(lo, hi));
  d["chunk_tokens"] = chunks;
  nb::list votes;
  for (const Vote& v : b.top_votes) {
    nb::dict x;
    x["layer"] = v.layer;
    x["kv_head"] = v.kv_head;
    x["tokens"] = nb::make_tuple(v.token_begin, v.token_end);
    x["value"] = v.value;
    votes.append(x);
  }
  d["top_votes"] = votes;
  return d;
}

void RegisterIndex(nb::module_& m) {
  m.def(
      "index_summarize",
      [](const AnyCpuArray& keys, std::optional<std::vector<int>> layers, const std::string& dtype,
         std::optional<std::vector<int>> token_layers, std::optional<std::vector<uint8_t>> token_mask) {
        const DType in = CheckedArray(keys, 4, "keys");
        const DType out = EnumFromName<DType>(dtype, {{"f16", DType::kF16}, {"f32", DType::kF32}}, "dtype");
        const int L = Dim(keys, 0, "keys"), H = Dim(keys, 1, "keys"), T = Dim(keys, 2, "keys"),
                  D = Dim(keys, 3, "keys");
        const std::vector<int> ls = layers.value_or(std::vector<int>{});
        const std::vector<int> tls = token_layers.value_or(std::vector<int>{});
        const std::vector<uint8_t> mask = token_mask.value_or(std::vector<uint8_t>{});
        std::string bytes;
        Status st;
        {
          nb::gil_scoped_release release;
          auto s = KeySummary::FromKeys(keys.data(), in, L, H, T, D, ls, tls, mask);
          if (s.ok()) {
            bytes = s->Serialize(out);
          } else {
            st = s.status();
          }
        }
        ThrowIfError(st);
        return nb::bytes(bytes.data(), bytes.size());
      },
      "keys"_a, "layers"_a = nb::none(), "dtype"_a = "f16", "token_layers"_a = nb::none(), "token_mask"_a = nb::none(),
      "Compressed keys of pre-RoPE keys [L, H_kv, T, D] (C-contiguous f32/f16/bf16) as bytes; token_layers keeps\n"
      "per-token keys of those layers (tokens where token_mask is non-zero) for score='tokens'.");

  m.def(
      "index_summary_info",
      [](nb::bytes b) {
        KeySummary s = ValueOrThrow(KeySummary::Deserialize(std::string_view(b.c_str(), b.size())));
        nb::dict d;
        d["layers"] = nb::cast(s.layers);
        d["num_kv_heads"] = s.num_kv_heads;
        d["head_dim"] = s.head_dim;
        d["num_tokens"] = s.num_tokens;
        d["min"] = nb::cast(s.min);
        d["max"] = nb::cast(s.max);
        d["mean"] = nb::cast(s.mean);
        d["token_layers"] = nb::cast(s.token_layers);
        d["num_token_keys"] = s.num_token_keys;
        return d;
      },
      "summary"_a, "Decodes summary bytes: dict with layers, geometry and flat min/max/mean lists.");

  m.def("index_default_layers", &DefaultIndexLayers, "num_layers"_a, "count"_a = 8);

  nb::class_<Hit>(m, "IndexHit", "One retrieved segment.")
      .def_prop_ro("key", [](const Hit& h) { return h.entry.key; })
      .def_ro("score", &Hit::score)
      .def_ro("rank", &Hit::rank)
      .def_ro("pinned", &Hit::pinned)
      .def_prop_ro("ns", [](const Hit& h) { return h.entry.ns; })
      .def_prop_ro("agent", [](const Hit& h) { return h.entry.agent; })
      .def_prop_ro("session", [](const Hit& h) { return h.entry.session; })
      .def_prop_ro("turn", [](const Hit& h) { return h.entry.turn; })
      .def_prop_ro("chunk", [](const Hit& h) { return h.entry.chunk; })
      .def_prop_ro("time_us", [](const Hit& h) { return h.entry.time_us; })
      .def_prop_ro("num_tokens", [](const Hit& h) { return h.entry.num_tokens; })
      .def_prop_ro("breakdown", [](const Hit& h) { return BreakdownDict(h.breakdown); })
      .def("__repr__", [](const Hit& h) {
        return "IndexHit(session='" + h.entry.session + "', turn=" + std::to_string(h.entry.turn) +
               ", chunk=" + std::to_string(h.entry.chunk) + ", score=" + std::to_string(h.score) +
               ", rank=" + std::to_string(h.rank) + (h.pinned ? ", pinned" : "") + ")";
      });

  nb::class_<LatentIndex>(m, "_LatentIndex", "C++ LatentIndex; use kv_agent.index.LatentIndex.")
      .def_static(
          "create",
          [](const ModelSpec& spec, const std::string& score, const std::string& norm, const std::string& agg,
             const std::string& head_reduce, std::optional<std::vector<int>> layers, int token_chunks, double top_p,
             const std::string& storage, int num_threads, int prefilter_min_segments, int prefilter_keep,
             int prefilter_layers, int prefilter_sample, int device, std::vector<std::tuple<int, int, float>> heads,
             int rope_marginal_min, int rope_marginal_max) {
            IndexOptions o;
            o.score = EnumFromName<ScoreKind>(
                score,
                {{"bbox", ScoreKind::kBoundingBox}, {"mean", ScoreKind::kMeanKey}, {"tokens", ScoreKind::kTokens}},
                "score");
            for (const auto& [l, h, w] : heads) o.heads.push_back({l, h, w});
            o.rope_marginal_min = rope_marginal_min;
            o.rope_marginal_max = rope_marginal_max;
            o.norm = EnumFromName<TokenNorm>(
                norm, {{"softmax", TokenNorm::kSoftmax}, {"zscore", TokenNorm::kZScore}, {"none", TokenNorm::kNone}},
                "norm");
            o.agg = EnumFromName<Aggregation>(
                agg, {{"mean", Aggregation::kMean}, {"max", Aggregation::kMax}, {"top_p", Aggregation::kTopP}}, "agg");
            o.head_reduce = EnumFromName<HeadReduce>(head_reduce,
                                                     {{"mean_query", HeadReduce::kMeanQuery},
                                                      {"mean_score", HeadReduce::kMeanScore},
                                                      {"max_score", HeadReduce::kMaxScore}},
                                                     "head_reduce");
            o.layers = layers.value_or(std::vector<int>{});
            o.token_chunks = token_chunks;
            o.top_p = top_p;
            o.storage = EnumFromName<DType>(storage, {{"f16", DType::kF16}, {"f32", DType::kF32}}, "storage");
            o.num_threads = num_threads;
            o.prefilter_min_segments = prefilter_min_segments;
            o.prefilter_keep = prefilter_keep;
            o.prefilter_layers = prefilter_layers;
            o.prefilter_sample = prefilter_sample;
            o.device = device;
            return ValueOrThrow(LatentIndex::Create(spec, o));
          },
          "spec"_a, "score"_a, "norm"_a, "agg"_a, "head_reduce"_a, "layers"_a.none(), "token_chunks"_a, "top_p"_a,
          "storage"_a, "num_threads"_a, "prefilter_min_segments"_a, "prefilter_keep"_a, "prefilter_layers"_a,
          "prefilter_sample"_a, "device"_a = kCpuDevice, "heads"_a = std::vector<std::tuple<int, int, float>>{},
          "rope_marginal_min"_a = 0, "rope_marginal_max"_a = 0)
      .def(
          "set_null_query",
          [](LatentIndex& idx, std::optional<AnyCpuArray> q) {
            if (!q) {
              ThrowIfError(idx.SetNullQuery(QueryView{}));
              return;
            }
            const DType dt = CheckedArray(*q, 4, "q");
            ThrowIfError(idx.SetNullQuery(
                QueryView{q->data(), dt, Dim(*q, 0, "q"), Dim(*q, 1, "q"), Dim(*q, 2, "q"), Dim(*q, 3, "q")}));
          },
          "q"_a.none())
      .def_prop_ro("has_null_query", &LatentIndex::has_null_query)
      .def("token_key_bytes", &LatentIndex::TokenKeyBytes)
      .def(
          "add",
          [](LatentIndex& idx, const Hash128& key, nb::bytes summary, const std::string& ns, const std::string& agent,
             const std::string& session, int64_t turn, int32_t chunk, int64_t time_us, int64_t num_tokens,
             bool pinned) {
            IndexEntry e{key, ns, agent, session, turn, chunk, time_us, num_tokens, pinned};
            std::string bytes(summary.c_str(), summary.size());
            Status st;
            {
              nb::gil_scoped_release release;
              st = idx.AddSerialized(e, bytes);
            }
            ThrowIfError(st);
          },
          "key"_a, "summary"_a, "ns"_a, "agent"_a, "session"_a, "turn"_a, "chunk"_a, "time_us"_a, "num_tokens"_a,
          "pinned"_a)
      .def(
          "remove", [](LatentIndex& idx, const Hash128& key) { ThrowIfError(idx.Remove(key)); }, "key"_a)
      .def(
          "set_pinned", [](LatentIndex& idx, const Hash128& key, bool p) { ThrowIfError(idx.SetPinned(key, p)); },
          "key"_a, "pinned"_a)
      .def("contains", &LatentIndex::Contains, "key"_a)
      .def("size", &LatentIndex::size)
      .def("memory_bytes", &LatentIndex::MemoryBytes)
      .def("row_bytes", &LatentIndex::RowBytes)
      .def("prefilter_row_bytes", &LatentIndex::PrefilterRowBytes)
      .def("device_memory_bytes", &LatentIndex::DeviceMemoryBytes)
      .def_prop_ro("device", &LatentIndex::device)
      .def_prop_ro("layers", [](const LatentIndex& idx) { return idx.layers(); })
      .def(
          "search",
          [](const LatentIndex& idx, const AnyCpuArray& q, int top_k, std::optional<int64_t> token_budget,
             std::vector<Hash128> pinned, std::optional<std::string> ns, std::optional<std::string> agent,
             std::optional<std::string> session, std::optional<int64_t> min_time_us, std::optional<int64_t> max_time_us,
             bool explain, bool exact, const std::string& backend) {
            const DType dt = CheckedArray(q, 4, "q");
            QueryView view{q.data(), dt, Dim(q, 0, "q"), Dim(q, 1, "q"), Dim(q, 2, "q"), Dim(q, 3, "q")};
            SearchRequest req;
            req.top_k = top_k;
            req.token_budget = token_budget;
            req.pinned = std::move(pinned);
            req.ns = std::move(ns);
            req.agent = std::move(agent);
            req.session = std::move(session);
            req.min_time_us = min_time_us;
            req.max_time_us = max_time_us;
            req.explain = explain;
            req.exact = exact;
            req.backend = EnumFromName<SearchBackend>(
                backend,
                {{"index", SearchBackend::kIndex}, {"cpu", SearchBackend::kCpu}, {"device", SearchBackend::kDevice}},
                "backend");
            StatusOr<std::vector<Hit>> hits = InternalError("not run");
            {
              nb::gil_scoped_release release;
              hits = idx.Search(view, req);
            }
            return ValueOrThrow(std::move(hits));
          },
          "q"_a, "top_k"_a, "token_budget"_a.none(), "pinned"_a, "ns"_a.none(), "agent"_a.none(), "session"_a.none(),
          "min_time_us"_a.none(), "max_time_us"_a.none(), "explain"_a, "exact"_a = false,
          "backend"_a = "index");
}

Registration reg("index", 20, &RegisterIndex);

}  // namespace
}  // namespace kvagent::py
