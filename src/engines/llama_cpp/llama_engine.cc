// llama.cpp engine (kvagent/llama_engine.h). Why the state API rather than graph taps for KV:
// what the engine later attends to is what its cache holds (possibly q8_0), so capturing from
// the cache makes stored memory equal, bit for bit up to the un-rotation, to what llama.cpp
// itself would reuse. Why state writes rather than restore + llama_memory_seq_add for
// placement: segments are stored pre-RoPE, so one rotation to the planned position is needed
// anyway; writing the cells at their planned positions does it once, exactly (seq_add would
// rotate a second time, by a delta, in llama.cpp's own float arithmetic).
#include "kvagent/llama_engine.h"

#include <ggml-backend.h>
#include <ggml.h>
#include <llama.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>

#include "engines/llama_cpp/gguf_model_info.h"
#include "engines/llama_cpp/llama_kv_state.h"
#include "kvagent/rope.h"

namespace kvagent {
namespace {

using llama_cpp::GgufModelInfo;
using llama_cpp::KvCacheSection;

void QuietLog(ggml_log_level level, const char* text, void*) {
  if (level == GGML_LOG_LEVEL_ERROR) std::fputs(text, stderr);
}

void InitBackendOnce() {
  static std::once_flag once;
  std::call_once(once, [] {
    llama_log_set(QuietLog, nullptr);
    llama_backend_init();
  });
}

ggml_type GgmlType(LlamaKvType t) {
  switch (t) {
    case LlamaKvType::kF32: return GGML_TYPE_F32;
    case LlamaKvType::kQ8_0: return GGML_TYPE_Q8_0;
    case LlamaKvType::kF16: break;
  }
  return GGML_TYPE_F16;
}

// Row of `n` cache-type elements -> float.
Status RowToFloat(int32_t type, const uint8_t* src, float* dst, int64_t n) {
  if (type < 0 || type >= GGML_TYPE_COUNT) return DataLossError("llama.cpp cache: bad tensor type");
  const auto t = static_cast<ggml_type>(type);
  if (t == GGML_TYPE_F32) {
    std::memcpy(dst, src, n * sizeof(float));
    return Status::Ok();
  }
  const ggml_type_traits* tr = ggml_get_type_traits(t);
  if (tr->to_float == nullptr) return UnimplementedError(std::string("llama.cpp cache type ") + tr->type_name);
  tr->to_float(src, dst, n);
  return Status::Ok();
}

// Orthonormal Walsh-Hadamard transform (Sylvester order, 1/sqrt(block) scaled; its own inverse)
// of each `block`-element chunk of x. llama.cpp applies it to K and V rows before storing them
// in a quantised cache (llama-kv-cache.cpp "attn_rot"), to spread outliers over a block.
void WalshHadamard(float* x, int64_t n, int block) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(block));
  for (int64_t c = 0; c + block <= n; c += block) {
    float* v = x + c;
    for (int h = 1; h < block; h *= 2) {
      for (int i = 0; i < block; i += 2 * h) {
        for (int j = i; j < i + h; ++j) {
          const float a = v[j], b = v[j + h];
          v[j] = a + b;
          v[j + h] = a - b;
        }
      }
    }
    for (int i = 0; i < block; ++i) v[i] *= scale;
  }
}

}  // namespace

StatusOr<LlamaKvType> ParseLlamaKvType(std::string_view name) {
  if (name == "f16") return LlamaKvType::kF16;
  if (name == "f32") return LlamaKvType::kF32;
  if (name == "q8_0") return LlamaKvType::kQ8_0;
  return InvalidArgumentError("llama.cpp kv type must be f16, f32 or q8_0, got '" + std::string(name) + "'");
}

std::string_view LlamaKvTypeName(LlamaKvType type) {
  switch (type) {
    case LlamaKvType::kF32: return "f32";
    case LlamaKvType::kQ8_0: return "q8_0";
    case LlamaKvType::kF16: break;
  }
  return "f16";
}

struct LlamaEngine::Impl {
  LlamaEngineOptions opt;
  Env* env = nullptr;
  GgufModelInfo info;
  llama_model* model = nullptr;
  llama_context* ctx = nullptr;
  const llama_vocab* vocab = nullptr;
  int64_t next_pos = 0;
  int n_batch = 512;
  // Walsh-Hadamard block llama.cpp applies to cached K / V rows (0 = none): quantised cache types
  // only, as llama_kv_cache's constructor and build_input_{k,v}_rot decide.
  int k_rot = 0, v_rot = 0;

  // Query taps (QueryVectors): layer -> slot in `q_out`, -1 when not wanted.
  bool q_active = false;
  std::vector<int> q_slot;
  std::vector<std::vector<float>> q_out;  // per slot [tokens][q_heads][head_dim] as ggml holds it
  std::vector<bool> q_seen;

  ~Impl() {
    if (ctx) llama_free(ctx);
    if (model) llama_model_free(model);
  }

  bool iswa() const { return info.sliding_window > 0; }
  int L() const { return info.spec.num_layers; }
  int H() const { return info.spec.num_kv_heads; }
  int D() const { return info.spec.head_dim; }
  int64_t RowElems() const { return static_cast<int64_t>(H()) * D(); }

  // Section and index within it of layer `l` (full-attention layers first, then window layers).
  std::pair<int, int> LayerSlot(int l) const {
    int idx = 0;
    const bool swa = iswa() && info.layer_swa[l];
    for (int i = 0; i < l; ++i) idx += (iswa() && info.layer_swa[i]) == swa ? 1 : 0;
    return {swa ? 1 : 0, idx};
  }
  int NumSections() const { return iswa() ? 2 : 1; }

  void Clear() {
    llama_memory_clear(llama_get_memory(ctx), true);
    next_pos = 0;
  }

  Status CheckTokens(std::span<const int32_t> tokens) const {
    if (tokens.empty()) return InvalidArgumentError("llama.cpp engine: no tokens given");
    const int32_t n = llama_vocab_n_tokens(vocab);
    for (int32_t t : tokens) {
      if (t < 0 || t >= n) {
        return InvalidArgumentError("llama.cpp engine: token id " + std::to_string(t) + " outside the vocabulary [0, " +
                                    std::to_string(n) + ")");
      }
    }
    if (next_pos + static_cast<int64_t>(tokens.size()) > opt.context_tokens) {
      return InvalidArgumentError("llama.cpp engine: context of " + std::to_string(next_pos) + " + " +
                                  std::to_string(tokens.size()) + " tokens exceeds the capacity " +
                                  std::to_string(opt.context_tokens));
    }
    return Status::Ok();
  }

  // Decodes tokens at next_pos.. in steps of at most `step`; logits of the last token only.
  // On failure the context is cleared.
  Status Decode(std::span<const int32_t> tokens, int64_t step, bool logits) {
    llama_batch batch = llama_batch_init(static_cast<int32_t>(step), 0, 1);
    Status st;
    for (size_t i = 0; i < tokens.size(); i += step) {
      const size_t n = std::min<size_t>(step, tokens.size() - i);
      batch.n_tokens = static_cast<int32_t>(n);
      for (size_t j = 0; j < n; ++j) {
        batch.token[j] = tokens[i + j];
        batch.pos[j] = static_cast<llama_pos>(next_pos + j);
        batch.n_seq_id[j] = 1;
        batch.seq_id[j][0] = 0;
        batch.logits[j] = logits && i + j + 1 == tokens.size();
      }
      const int32_t rc = llama_decode(ctx, batch);
      if (rc != 0) {
        st = InternalError("llama.cpp: llama_decode failed with code " + std::to_string(rc));
        break;
      }
      next_pos += static_cast<int64_t>(n);
    }
    llama_batch_free(batch);
    if (!st.ok()) Clear();
    return st;
  }

  StatusOr<std::vector<KvCacheSection>> ReadState() {
    const size_t size = llama_state_seq_get_size(ctx, 0);
    std::vector<uint8_t> buf(size);
    const size_t got = llama_state_seq_get_data(ctx, buf.data(), buf.size(), 0);
    if (got == 0 && size != 0) return InternalError("llama.cpp: llama_state_seq_get_data failed");
    buf.resize(got);
    return llama_cpp::ParseKvState(buf, NumSections());
  }

  // Copies cells with positions in [lo, hi) out of `state` into canonical `dst` (token offset
  // `t0` of `total` tokens), keys still post-RoPE.
  Status ExtractCells(const std::vector<KvCacheSection>& state, int64_t lo, int64_t hi, float* dst, int64_t t0,
                      int64_t total) {
    const int64_t row = RowElems();
    std::vector<float> tmp(row);
    for (int l = 0; l < L(); ++l) {
      auto [sec, idx] = LayerSlot(l);
      const KvCacheSection& s = state[sec];
      if (idx >= static_cast<int>(s.layers.size())) return InternalError("llama.cpp cache: layer missing from state");
      const auto& layer = s.layers[idx];
      int64_t found = 0;
      for (size_t c = 0; c < s.positions.size(); ++c) {
        const int64_t p = s.positions[c];
        if (p < lo || p >= hi) continue;
        const int64_t t = t0 + (p - lo);
        for (int kv = 0; kv < 2; ++kv) {
          const int32_t type = kv == 0 ? layer.k_type : layer.v_type;
          const uint64_t rb = kv == 0 ? layer.k_row : layer.v_row;
          const uint8_t* src = (kv == 0 ? layer.k.data() : layer.v.data()) + c * rb;
          KVAGENT_RETURN_IF_ERROR(RowToFloat(type, src, tmp.data(), row));
          const int rot = kv == 0 ? k_rot : v_rot;
          if (rot > 0) WalshHadamard(tmp.data(), row, rot);
          float* plane = dst + (static_cast<int64_t>(l) * 2 + kv) * H() * total * D();
          for (int h = 0; h < H(); ++h) {
            std::memcpy(plane + (h * total + t) * D(), tmp.data() + h * D(), D() * sizeof(float));
          }
        }
        ++found;
      }
      if (found != hi - lo) {
        return InternalError("llama.cpp cache: layer " + std::to_string(l) + " holds " + std::to_string(found) +
                             " of " + std::to_string(hi - lo) + " new cells");
      }
    }
    return Status::Ok();
  }

  // Rotates (forward) or un-rotates the K planes of canonical `kv` [L][2][H][T][D] in place.
  Status RotateKeys(float* kv, int64_t T, std::span<const int64_t> positions, RopeDirection dir) {
    for (int l = 0; l < L(); ++l) {
      float* k = kv + static_cast<int64_t>(l) * 2 * H() * T * D();
      RopeTensorView v = RopeTensorView::Dense(k, DType::kF32, H(), T, D());
      KVAGENT_RETURN_IF_ERROR(RopeApply(info.spec.layers[l].rope, D(), v, v, positions, dir));
    }
    return Status::Ok();
  }

  static bool EvalCallback(ggml_tensor* t, bool ask, void* user) {
    auto* self = static_cast<Impl*>(user);
    if (!self->q_active) return !ask;  // not interested; keep computing
    int layer = -1;
    if (t->op != GGML_OP_ROPE || std::strncmp(t->name, "Qcur-", 5) != 0) return !ask;
    layer = std::atoi(t->name + 5);
    if (layer < 0 || layer >= static_cast<int>(self->q_slot.size()) || self->q_slot[layer] < 0) return !ask;
    if (ask) return true;
    const int slot = self->q_slot[layer];
    std::vector<float>& out = self->q_out[slot];
    out.resize(ggml_nelements(t));
    if (t->type == GGML_TYPE_F32 && ggml_is_contiguous(t)) {
      ggml_backend_tensor_get(t, out.data(), 0, ggml_nbytes(t));
      self->q_seen[slot] = true;
    }
    return true;
  }
};

LlamaEngine::LlamaEngine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
LlamaEngine::~LlamaEngine() = default;
LlamaEngine::LlamaEngine(LlamaEngine&&) noexcept = default;

StatusOr<std::unique_ptr<LlamaEngine>> LlamaEngine::Open(const LlamaEngineOptions& options, Env* env) {
  if (options.context_tokens <= 0 || options.batch_tokens <= 0 || options.threads < 0) {
    return InvalidArgumentError("llama.cpp engine: context_tokens and batch_tokens must be > 0, threads >= 0");
  }
  auto impl = std::make_unique<Impl>();
  impl->opt = options;
  impl->env = env;
  KVAGENT_ASSIGN_OR_RETURN(impl->info, llama_cpp::ReadGgufModelInfo(options.model_path, env));
  // Canonical memory is float32 whatever the cache type: cache rows are f16/q8_0 post-RoPE, and
  // a float32 pre-RoPE copy rotates back to the very same rows; an f16 copy would round twice
  // and perturb Gemma 3's peaked attention (docs/engine-llama-cpp.md, "Canonical dtype").
  impl->info.spec.kv_dtype = DType::kF32;
  InitBackendOnce();

  llama_model_params mp = llama_model_default_params();
  mp.n_gpu_layers = 0;
  impl->model = llama_model_load_from_file(options.model_path.c_str(), mp);
  if (impl->model == nullptr) return DataLossError("llama.cpp could not load " + options.model_path);
  impl->vocab = llama_model_get_vocab(impl->model);
  if (llama_model_n_layer(impl->model) != impl->info.spec.num_layers ||
      llama_model_n_head_kv(impl->model) != impl->info.spec.num_kv_heads ||
      llama_model_rope_type(impl->model) != LLAMA_ROPE_TYPE_NEOX) {
    return InternalError("llama.cpp engine: the GGUF's geometry as llama.cpp reads it differs from its metadata");
  }
  if (impl->info.sliding_window > 0 && llama_model_n_swa(impl->model) != impl->info.sliding_window) {
    return InternalError("llama.cpp engine: sliding window mismatch");
  }

  if (ggml_is_quantized(GgmlType(options.kv_type))) {
    const char* off = std::getenv("LLAMA_ATTN_ROT_DISABLE");
    const int d = impl->info.spec.head_dim;
    if (!(off && std::atoi(off)) && d % 64 == 0) {
      impl->k_rot = 64;
      while (d % (impl->k_rot * 2) == 0) impl->k_rot *= 2;  // the largest power of two dividing head_dim
      impl->v_rot = 64;
    }
  }

  const int threads = options.threads > 0 ? options.threads : std::max(1u, std::thread::hardware_concurrency());
  impl->n_batch = options.batch_tokens;
  llama_context_params cp = llama_context_default_params();
  cp.n_ctx = static_cast<uint32_t>(options.context_tokens);
  cp.n_batch = cp.n_ubatch = static_cast<uint32_t>(options.batch_tokens);
  cp.n_seq_max = 1;
  cp.n_threads = cp.n_threads_batch = threads;
  cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;  // V rows per cell; required for a quantised V
  cp.type_k = cp.type_v = GgmlType(options.kv_type);
  cp.swa_full = false;
  cp.no_perf = true;
  cp.cb_eval = &Impl::EvalCallback;
  cp.cb_eval_user_data = impl.get();
  impl->ctx = llama_init_from_model(impl->model, cp);
  if (impl->ctx == nullptr) return InternalError("llama.cpp could not create a context for " + options.model_path);
  // llama.cpp may round n_ctx up (padding); the usable capacity is what it reports.
  impl->opt.context_tokens = static_cast<int>(std::min<uint32_t>(llama_n_ctx(impl->ctx), cp.n_ctx));
  return std::unique_ptr<LlamaEngine>(new LlamaEngine(std::move(impl)));
}

const ModelSpec& LlamaEngine::spec() const { return impl_->info.spec; }
const std::string& LlamaEngine::architecture() const { return impl_->info.architecture; }
LlamaKvType LlamaEngine::kv_type() const { return impl_->opt.kv_type; }
int LlamaEngine::context_capacity() const { return impl_->opt.context_tokens; }
int32_t LlamaEngine::vocab_size() const { return llama_vocab_n_tokens(impl_->vocab); }
int32_t LlamaEngine::bos_token() const { return llama_vocab_bos(impl_->vocab); }

std::vector<int32_t> LlamaEngine::end_of_generation_tokens() const {
  std::vector<int32_t> out;
  const int32_t n = llama_vocab_n_tokens(impl_->vocab);
  for (int32_t t = 0; t < n; ++t) {
    if (llama_vocab_is_eog(impl_->vocab, t)) out.push_back(t);
  }
  return out;
}

StatusOr<std::vector<int32_t>> LlamaEngine::Tokenize(std::string_view text, bool add_special,
                                                     bool parse_special) const {
  if (text.size() > static_cast<size_t>(INT32_MAX / 2)) return InvalidArgumentError("llama.cpp tokenize: text too long");
  std::vector<int32_t> out(text.size() + 8);
  int32_t n = llama_tokenize(impl_->vocab, text.data(), static_cast<int32_t>(text.size()), out.data(),
                             static_cast<int32_t>(out.size()), add_special, parse_special);
  if (n < 0) {
    out.resize(-n);
    n = llama_tokenize(impl_->vocab, text.data(), static_cast<int32_t>(text.size()), out.data(),
                       static_cast<int32_t>(out.size()), add_special, parse_special);
  }
  if (n < 0) return InternalError("llama.cpp tokenize failed");
  out.resize(n);
  return out;
}

StatusOr<std::string> LlamaEngine::Detokenize(std::span<const int32_t> tokens) const {
  const int32_t nv = llama_vocab_n_tokens(impl_->vocab);
  for (int32_t t : tokens) {
    if (t < 0 || t >= nv) return InvalidArgumentError("llama.cpp detokenize: token id " + std::to_string(t) + " outside the vocabulary");
  }
  std::string out(tokens.size() * 8 + 16, '\0');
  int32_t n = llama_detokenize(impl_->vocab, tokens.data(), static_cast<int32_t>(tokens.size()), out.data(),
                               static_cast<int32_t>(out.size()), false, true);
  if (n < 0) {
    out.resize(-n);
    n = llama_detokenize(impl_->vocab, tokens.data(), static_cast<int32_t>(tokens.size()), out.data(),
                         static_cast<int32_t>(out.size()), false, true);
  }
  if (n < 0) return InternalError("llama.cpp detokenize failed");
  out.resize(n);
  return out;
}

std::string LlamaEngine::ChatTemplate() const {
  const char* t = llama_model_chat_template(impl_->model, nullptr);
  return t ? t : "";
}

void LlamaEngine::Reset() { impl_->Clear(); }
int64_t LlamaEngine::NextPosition() const { return impl_->next_pos; }

Status LlamaEngine::PlaceContext(std::span<const float> kv, std::span<const int64_t> positions) {
  Impl& m = *impl_;
  const int64_t n = static_cast<int64_t>(positions.size());
  const int64_t want = static_cast<int64_t>(m.L()) * 2 * m.RowElems() * n;
  if (static_cast<int64_t>(kv.size()) != want) {
    return InvalidArgumentError("llama.cpp PlaceContext: kv must hold layers*2*kv_heads*tokens*head_dim = " +
                                std::to_string(want) + " floats, got " + std::to_string(kv.size()));
  }
  for (int64_t i = 0; i < n; ++i) {
    if (positions[i] < 0 || (i > 0 && positions[i] <= positions[i - 1])) {
      return InvalidArgumentError("llama.cpp PlaceContext: positions must be >= 0 and strictly increasing");
    }
  }
  if (n > 0 && positions[n - 1] >= m.opt.context_tokens) {
    return InvalidArgumentError("llama.cpp PlaceContext: position " + std::to_string(positions[n - 1]) +
                                " beyond the context capacity " + std::to_string(m.opt.context_tokens));
  }
  m.Clear();
  if (n == 0) return Status::Ok();

  std::vector<float> rotated(kv.begin(), kv.end());
  KVAGENT_RETURN_IF_ERROR(m.RotateKeys(rotated.data(), n, positions, RopeDirection::kForward));

  const ggml_type type = GgmlType(m.opt.kv_type);
  const int64_t row = m.RowElems();
  const size_t row_bytes = ggml_row_size(type, row);
  std::vector<KvCacheSection> sections(m.NumSections());
  // Window layers need only the tokens a later query can see: positions > last - window.
  const int64_t first_swa =
      m.iswa() ? static_cast<int64_t>(std::lower_bound(positions.begin(), positions.end(),
                                                       positions[n - 1] - m.info.sliding_window + 1) -
                                      positions.begin())
               : 0;
  for (int sec = 0; sec < m.NumSections(); ++sec) {
    const int64_t t0 = sec == 1 ? first_swa : 0;
    for (int64_t t = t0; t < n; ++t) sections[sec].positions.push_back(static_cast<int32_t>(positions[t]));
  }
  std::vector<float> buf(row);
  for (int l = 0; l < m.L(); ++l) {
    auto [sec, idx] = m.LayerSlot(l);
    KvCacheSection& s = sections[sec];
    if (static_cast<int>(s.layers.size()) <= idx) s.layers.resize(idx + 1);
    auto& layer = s.layers[idx];
    const int64_t t0 = sec == 1 ? first_swa : 0;
    const int64_t cells = n - t0;
    for (int kvi = 0; kvi < 2; ++kvi) {
      std::vector<uint8_t>& dst = kvi == 0 ? layer.k : layer.v;
      (kvi == 0 ? layer.k_type : layer.v_type) = type;
      (kvi == 0 ? layer.k_row : layer.v_row) = row_bytes;
      dst.resize(row_bytes * cells);
      const float* plane = rotated.data() + (static_cast<int64_t>(l) * 2 + kvi) * m.H() * n * m.D();
      for (int64_t c = 0; c < cells; ++c) {
        for (int h = 0; h < m.H(); ++h) {
          std::memcpy(buf.data() + h * m.D(), plane + (h * n + t0 + c) * m.D(), m.D() * sizeof(float));
        }
        const int rot = kvi == 0 ? m.k_rot : m.v_rot;
        if (rot > 0) WalshHadamard(buf.data(), row, rot);
        ggml_quantize_chunk(type, buf.data(), dst.data() + c * row_bytes, 0, 1, row, nullptr);
      }
    }
  }
  const std::vector<uint8_t> blob = llama_cpp::SerializeKvState(sections);
  if (llama_state_seq_set_data(m.ctx, blob.data(), blob.size(), 0) == 0) {
    m.Clear();
    return InternalError("llama.cpp: llama_state_seq_set_data rejected the planned context");
  }
  m.next_pos = positions[n - 1] + 1;
  return Status::Ok();
}

StatusOr<LlamaKv> LlamaEngine::Capture(std::span<const int32_t> tokens) {
  Impl& m = *impl_;
  KVAGENT_RETURN_IF_ERROR(m.CheckTokens(tokens));
  const int64_t T = static_cast<int64_t>(tokens.size());
  LlamaKv out;
  out.kv.assign(static_cast<size_t>(m.L()) * 2 * m.RowElems() * T, 0.0f);
  out.positions.resize(T);
  const int64_t start = m.next_pos;
  for (int64_t t = 0; t < T; ++t) out.positions[t] = start + t;
  // A window cache keeps the last `window` tokens: read it back at least that often.
  const int64_t step = m.iswa() ? std::min<int64_t>(m.n_batch, m.info.sliding_window) : m.n_batch;
  for (int64_t i = 0; i < T; i += step) {
    const int64_t n = std::min(step, T - i);
    const int64_t lo = m.next_pos;
    KVAGENT_RETURN_IF_ERROR(m.Decode(tokens.subspan(i, n), m.n_batch, false));
    auto state = m.ReadState();
    if (!state.ok()) {
      m.Clear();
      return state.status();
    }
    Status st = m.ExtractCells(*state, lo, lo + n, out.kv.data(), i, T);
    if (!st.ok()) {
      m.Clear();
      return st;
    }
  }
  KVAGENT_RETURN_IF_ERROR(m.RotateKeys(out.kv.data(), T, out.positions, RopeDirection::kInverse));
  return out;
}

StatusOr<std::vector<float>> LlamaEngine::QueryVectors(std::span<const int32_t> tokens, std::span<const int> layers) {
  Impl& m = *impl_;
  KVAGENT_RETURN_IF_ERROR(m.CheckTokens(tokens));
  if (layers.empty()) return InvalidArgumentError("llama.cpp QueryVectors: no layers asked for");
  m.q_slot.assign(m.L(), -1);
  for (size_t i = 0; i < layers.size(); ++i) {
    const int l = layers[i];
    if (l < 0 || l >= m.L()) {
      return InvalidArgumentError("llama.cpp QueryVectors: layer " + std::to_string(l) + " outside [0, " +
                                  std::to_string(m.L()) + ")");
    }
    if (m.q_slot[l] >= 0) return InvalidArgumentError("llama.cpp QueryVectors: layer " + std::to_string(l) + " asked twice");
    m.q_slot[l] = static_cast<int>(i);
  }
  const int64_t T = static_cast<int64_t>(tokens.size());
  if (T > m.n_batch) return InvalidArgumentError("llama.cpp QueryVectors: at most batch_tokens query tokens");
  const int64_t start = m.next_pos;
  // A window cache drops cells that fall out of the window while the query tokens are decoded;
  // removing the query tokens afterwards would not bring them back, so window models restore a
  // snapshot of the sequence instead.
  std::vector<uint8_t> snapshot;
  if (m.iswa() && start > 0) {
    snapshot.resize(llama_state_seq_get_size(m.ctx, 0));
    snapshot.resize(llama_state_seq_get_data(m.ctx, snapshot.data(), snapshot.size(), 0));
  }
  m.q_out.assign(layers.size(), {});
  m.q_seen.assign(layers.size(), false);
  m.q_active = true;
  Status st = m.Decode(tokens, m.n_batch, false);
  m.q_active = false;
  KVAGENT_RETURN_IF_ERROR(st);
  if (!snapshot.empty()) {
    if (llama_state_seq_set_data(m.ctx, snapshot.data(), snapshot.size(), 0) == 0) {
      m.Clear();
      return InternalError("llama.cpp QueryVectors: could not restore the context");
    }
  } else {
    llama_memory_seq_rm(llama_get_memory(m.ctx), 0, static_cast<llama_pos>(start), -1);
  }
  m.next_pos = start;
  const int Hq = m.info.spec.num_q_heads, D = m.D();
  std::vector<int64_t> pos(T);
  for (int64_t t = 0; t < T; ++t) pos[t] = start + t;
  std::vector<float> out(layers.size() * static_cast<size_t>(Hq) * T * D);
  for (size_t i = 0; i < layers.size(); ++i) {
    if (!m.q_seen[i] || m.q_out[i].size() != static_cast<size_t>(Hq) * T * D) {
      return InternalError("llama.cpp QueryVectors: no Qcur tensor observed for layer " + std::to_string(layers[i]));
    }
    // ggml [tokens][heads][dim] -> [heads][tokens][dim]
    float* dst = out.data() + i * static_cast<size_t>(Hq) * T * D;
    for (int64_t t = 0; t < T; ++t) {
      for (int h = 0; h < Hq; ++h) {
        std::memcpy(dst + (h * T + t) * D, m.q_out[i].data() + (t * Hq + h) * D, D * sizeof(float));
      }
    }
    RopeTensorView v = RopeTensorView::Dense(dst, DType::kF32, Hq, T, D);
    KVAGENT_RETURN_IF_ERROR(RopeApply(m.info.spec.layers[layers[i]].rope, D, v, v, pos, RopeDirection::kInverse));
  }
  return out;
}

StatusOr<std::vector<float>> LlamaEngine::Logits(std::span<const int32_t> tokens) {
  Impl& m = *impl_;
  KVAGENT_RETURN_IF_ERROR(m.CheckTokens(tokens));
  KVAGENT_RETURN_IF_ERROR(m.Decode(tokens, m.n_batch, true));
  const float* lg = llama_get_logits_ith(m.ctx, -1);
  if (lg == nullptr) return InternalError("llama.cpp: no logits");
  return std::vector<float>(lg, lg + llama_vocab_n_tokens(m.vocab));
}

StatusOr<LlamaGeneration> LlamaEngine::Generate(std::span<const int32_t> tokens, int max_new_tokens,
                                                std::span<const int32_t> stop_tokens) {
  Impl& m = *impl_;
  if (max_new_tokens < 1) return InvalidArgumentError("llama.cpp Generate: max_new_tokens must be >= 1");
  KVAGENT_RETURN_IF_ERROR(m.CheckTokens(tokens));
  LlamaGeneration g;
  g.context_tokens = m.next_pos;
  g.prefill_tokens = static_cast<int64_t>(tokens.size());
  const int32_t nv = llama_vocab_n_tokens(m.vocab);
  auto argmax = [&]() -> StatusOr<int32_t> {
    const float* lg = llama_get_logits_ith(m.ctx, -1);
    if (lg == nullptr) return InternalError("llama.cpp: no logits");
    return static_cast<int32_t>(std::max_element(lg, lg + nv) - lg);
  };
  auto is_stop = [&](int32_t t) { return std::find(stop_tokens.begin(), stop_tokens.end(), t) != stop_tokens.end(); };
  const uint64_t t0 = m.env->NowMicros();
  KVAGENT_RETURN_IF_ERROR(m.Decode(tokens, m.n_batch, true));
  const uint64_t t1 = m.env->NowMicros();
  KVAGENT_ASSIGN_OR_RETURN(int32_t tok, argmax());
  const uint64_t t2 = m.env->NowMicros();
  g.prefill_s = (t1 - t0) * 1e-6;
  g.first_token_s = (t2 - t0) * 1e-6;
  while (!is_stop(tok)) {
    g.tokens.push_back(tok);
    if (static_cast<int>(g.tokens.size()) >= max_new_tokens || m.next_pos >= m.opt.context_tokens) break;
    const int32_t one[1] = {tok};
    KVAGENT_RETURN_IF_ERROR(m.Decode(one, 1, true));
    KVAGENT_ASSIGN_OR_RETURN(tok, argmax());
  }
  g.decode_s = (m.env->NowMicros() - t2) * 1e-6;
  return g;
}

}  // namespace kvagent
