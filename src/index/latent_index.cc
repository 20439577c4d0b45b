#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <new>
#include <thread>
#include <unordered_set>

#if defined(__linux__)
#include <sched.h>
#endif

#include "index/moments.h"
#include "index/parallel_for.h"
#include "index/prefilter.h"
#include "index/row_blocks.h"
#include "index/score_kernel.h"
#include "index/token_scorer.h"
#include "kvagent/index.h"
#include "kvagent/rope.h"

#if defined(KVAGENT_WITH_CUDA)
#include "cuda/index_mirror.h"
#include "cuda/index_search.h"
#include "kvagent/cuda_kv.h"
#else
namespace kvagent::cuda {
class IndexMirror {};  // never instantiated without CUDA
}  // namespace kvagent::cuda
#endif

namespace kvagent {
namespace {

// Pending mirror rows are uploaded by Add once they reach this many bytes (else by the next search).
[[maybe_unused]] constexpr size_t kMirrorBatchBytes = size_t{64} << 20;

// Below this many candidates per thread, starting threads costs more than it saves.
constexpr size_t kMinSegmentsPerThread = 1024;
constexpr size_t kMaxVotes = size_t{1} << 30;  // 4 GiB of f32 scratch

// Cores this process may run on (taskset / cgroup cpusets), not the machine's count.
int UsableCores() {
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
#endif
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

bool PassesFilters(const IndexEntry& e, const SearchRequest& r) {
  if (r.agent && e.agent != *r.agent) return false;
  if (r.session && e.session != *r.session) return false;
  if (r.min_time_us && e.time_us < *r.min_time_us) return false;
  if (r.max_time_us && e.time_us > *r.max_time_us) return false;
  return true;
}

}  // namespace

std::vector<int> DefaultIndexLayers(int num_layers, int count) {
  std::vector<int> out;
  if (count < 1 || num_layers <= count) {
    for (int l = 0; l < num_layers; ++l) out.push_back(l);
    return out;
  }
  for (int i = 0; i < count; ++i) out.push_back(static_cast<int>((2 * int64_t{i} + 1) * num_layers / (2 * count)));
  return out;
}

LatentIndex::LatentIndex(const ModelSpec& spec, IndexOptions options, std::vector<int> layers)
    : spec_(spec), options_(std::move(options)), layers_(std::move(layers)) {
  const size_t width = options_.score == ScoreKind::kBoundingBox ? 2 * spec_.head_dim : spec_.head_dim;
  const size_t head_bytes = spec_.num_kv_heads * DTypeSize(options_.storage);
  rows_ = std::make_unique<index_internal::RowBlocks>(layers_.size() * width * head_bytes);
  if (options_.prefilter_min_segments > 0 && options_.prefilter_keep > 0 && options_.prefilter_layers > 0) {
    prefilter_slots_ = DefaultIndexLayers(static_cast<int>(layers_.size()), options_.prefilter_layers);
    pre_rows_ = std::make_unique<index_internal::RowBlocks>(prefilter_slots_.size() * spec_.head_dim * head_bytes);
  }
}

LatentIndex::~LatentIndex() = default;

StatusOr<std::unique_ptr<LatentIndex>> LatentIndex::Create(const ModelSpec& spec, IndexOptions options) {
  KVAGENT_RETURN_IF_ERROR(spec.Validate());
  if (options.storage != DType::kF32 && options.storage != DType::kF16) {
    return InvalidArgumentError("index storage must be f32 or f16");
  }
  if (options.token_chunks < 0) return InvalidArgumentError("token_chunks must be >= 0");
  if (!(options.top_p > 0 && options.top_p <= 1)) return InvalidArgumentError("top_p must be in (0, 1]");
  if (options.num_threads < 0) return InvalidArgumentError("num_threads must be >= 0");
  if (options.prefilter_min_segments < 0 || options.prefilter_keep < 0 || options.prefilter_layers < 0 ||
      options.prefilter_sample < 0) {
    return InvalidArgumentError("prefilter options must be >= 0");
  }
  if (static_cast<int>(options.score) > 2 || static_cast<int>(options.norm) > 2 || static_cast<int>(options.agg) > 2 ||
      static_cast<int>(options.head_reduce) > 2) {
    return InvalidArgumentError("unknown score, norm, agg or head_reduce value");
  }
  if (options.device < kAutoDevice) {
    return InvalidArgumentError("device must be a CUDA device ordinal >= 0, kCpuDevice (-1) or kAutoDevice (-2)");
  }
  const bool tokens = options.score == ScoreKind::kTokens;
  if (tokens && options.device >= 0) {
    return UnimplementedError("token-level scoring (score=tokens) runs on the CPU only; use device=-1");
  }
  if (tokens && options.device == kAutoDevice) options.device = kCpuDevice;
  if (!tokens && (!options.heads.empty() || options.rope_marginal_min != 0 || options.rope_marginal_max != 0)) {
    return InvalidArgumentError("heads and rope_marginal_* apply to score=tokens only");
  }
  if (options.rope_marginal_min < 0 || options.rope_marginal_max < 0 ||
      (options.rope_marginal_max != 0 && options.rope_marginal_max <= options.rope_marginal_min)) {
    return InvalidArgumentError("rope_marginal_* must satisfy 0 <= min < max (or both 0)");
  }
#if defined(KVAGENT_WITH_CUDA)
  if (options.device == kAutoDevice) {
    options.device = options.agg != Aggregation::kTopP && cuda::DeviceAvailable() ? 0 : kCpuDevice;
  }
  if (options.device >= 0 && options.agg == Aggregation::kTopP) {
    return UnimplementedError("device search does not implement agg=top_p (use mean or max, or device=-1)");
  }
  if (options.device >= 0) {
    if (Status st = cuda::CheckDevice(); !st.ok()) {
      return UnavailableError("index device " + std::to_string(options.device) +
                              " requested but no CUDA device is usable: " + st.message());
    }
  }
#else
  if (options.device >= 0) {
    return UnavailableError("index device " + std::to_string(options.device) +
                            " requested but kvagent was built without CUDA (KVAGENT_CUDA=OFF); use device=-1");
  }
  if (options.device == kAutoDevice) options.device = kCpuDevice;
#endif
  std::vector<int> layers = options.layers.empty() ? DefaultIndexLayers(spec.num_layers) : options.layers;
  std::vector<int> sorted = layers;
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 0; i < sorted.size(); ++i) {
    if (sorted[i] < 0 || sorted[i] >= spec.num_layers) {
      return InvalidArgumentError("index layer " + std::to_string(sorted[i]) + " out of range");
    }
    if (i > 0 && sorted[i] == sorted[i - 1]) return InvalidArgumentError("index layer listed twice");
  }
  std::unique_ptr<LatentIndex> idx(new LatentIndex(spec, std::move(options), std::move(layers)));
  if (tokens) KVAGENT_RETURN_IF_ERROR(idx->PrepareTokenScoring());
#if defined(KVAGENT_WITH_CUDA)
  if (idx->options_.device >= 0) {
    auto mirror =
        cuda::IndexMirror::Create(idx->options_.device, idx->rows_.get(), idx->options_.storage == DType::kF16);
    if (!mirror.ok()) return mirror.status();
    idx->mirror_ = std::move(*mirror);
  }
#endif
  return idx;
}

size_t LatentIndex::DeviceMemoryBytes() const {
#if defined(KVAGENT_WITH_CUDA)
  std::shared_lock lock(mu_);
  std::lock_guard dlock(device_mu_);
  return mirror_ ? mirror_->DeviceBytes() : 0;
#else
  return 0;
#endif
}

Status LatentIndex::PrepareTokenScoring() {
  const int D = spec_.head_dim;
  const float scale = static_cast<float>(spec_.EffectiveAttnScale());
  const int lo = options_.rope_marginal_min, hi = options_.rope_marginal_max;
  for (int l : layers_) {
    std::vector<float> w(D, scale);
    const RopeSpec& rope = spec_.layers[l].rope;
    if (hi > 0 && rope.enabled) {
      KVAGENT_ASSIGN_OR_RETURN(RopeFrequencies f, ComputeRopeFrequencies(rope, D));
      const int half = f.rotary_dim / 2;
      for (int i = 0; i < half; ++i) {
        // Mean of cos(omega * delta) over delta uniform in [lo, hi].
        const double om = f.inv_freq[i];
        const double m = om * (hi - lo) < 1e-12 ? std::cos(om * lo) : (std::sin(om * hi) - std::sin(om * lo)) / (om * (hi - lo));
        const int a = f.style == RopeStyle::kHalfSplit ? i : 2 * i;
        const int b = f.style == RopeStyle::kHalfSplit ? i + half : 2 * i + 1;
        w[a] = static_cast<float>(scale * m);
        w[b] = static_cast<float>(scale * m);
      }
    }
    q_weight_.push_back(std::move(w));
  }
  if (options_.heads.empty()) {
    for (size_t ls = 0; ls < layers_.size(); ++ls) {
      for (int h = 0; h < spec_.num_q_heads; ++h) token_heads_.push_back({static_cast<int>(ls), h, 1.0f});
    }
    return Status::Ok();
  }
  std::unordered_set<int64_t> seen;
  for (const RetrievalHead& rh : options_.heads) {
    auto it = std::find(layers_.begin(), layers_.end(), rh.layer);
    if (it == layers_.end()) {
      return InvalidArgumentError("retrieval head layer " + std::to_string(rh.layer) + " is not an index layer");
    }
    if (rh.q_head < 0 || rh.q_head >= spec_.num_q_heads) {
      return InvalidArgumentError("retrieval head q_head " + std::to_string(rh.q_head) + " out of range");
    }
    if (!std::isfinite(rh.weight)) return InvalidArgumentError("retrieval head weight must be finite");
    if (!seen.insert(int64_t{rh.layer} * 65536 + rh.q_head).second) {
      return InvalidArgumentError("retrieval head listed twice");
    }
    token_heads_.push_back({static_cast<int>(it - layers_.begin()), rh.q_head, rh.weight});
  }
  return Status::Ok();
}

Status LatentIndex::SetNullQuery(const QueryView& q) {
  if (options_.score != ScoreKind::kTokens) return InvalidArgumentError("a null query applies to score=tokens only");
  std::unique_lock lock(mu_);
  if (q.data == nullptr) {
    null_query_.clear();
    null_tokens_ = 0;
    return Status::Ok();
  }
  if (q.dtype != DType::kF32 && q.dtype != DType::kF16 && q.dtype != DType::kBF16) {
    return InvalidArgumentError("null query: dtype must be f32, f16 or bf16");
  }
  if (q.num_layers != static_cast<int>(layers_.size()) || q.num_q_heads != spec_.num_q_heads ||
      q.head_dim != spec_.head_dim || q.num_tokens < 1) {
    return InvalidArgumentError("null query shape does not match the index");
  }
  const size_t n = static_cast<size_t>(q.num_layers) * q.num_q_heads * q.num_tokens * q.head_dim;
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    v[i] = LoadAsF32(q.data, q.dtype, i);
    if (!std::isfinite(v[i])) return InvalidArgumentError("null query: non-finite value");
  }
  null_query_ = std::move(v);
  null_tokens_ = q.num_tokens;
  return Status::Ok();
}

bool LatentIndex::has_null_query() const {
  std::shared_lock lock(mu_);
  return !null_query_.empty();
}

size_t LatentIndex::TokenKeyBytes() const {
  std::shared_lock lock(mu_);
  return token_key_bytes_;
}

size_t LatentIndex::RowBytes() const { return rows_->row_bytes(); }
size_t LatentIndex::PrefilterRowBytes() const { return pre_rows_ ? pre_rows_->row_bytes() : 0; }

Status LatentIndex::Add(const IndexEntry& entry, const KeySummary& s) {
  if (entry.num_tokens < 0) return InvalidArgumentError("num_tokens must be >= 0");
  if (s.num_kv_heads != spec_.num_kv_heads || s.head_dim != spec_.head_dim) {
    return InvalidArgumentError("summary geometry (kv_heads=" + std::to_string(s.num_kv_heads) +
                                ", head_dim=" + std::to_string(s.head_dim) + ") does not match the model (" +
                                std::to_string(spec_.num_kv_heads) + ", " + std::to_string(spec_.head_dim) + ")");
  }
  const size_t per_layer = static_cast<size_t>(s.num_kv_heads) * s.head_dim;
  if (s.min.size() != s.layers.size() * per_layer || s.max.size() != s.min.size() || s.mean.size() != s.min.size()) {
    return InvalidArgumentError("summary arrays do not match its geometry");
  }
  std::vector<int> slots;
  for (int l : layers_) {
    int slot = s.LayerSlot(l);
    if (slot < 0) return InvalidArgumentError("summary lacks indexed layer " + std::to_string(l));
    slots.push_back(slot);
  }
  const bool f16 = options_.storage == DType::kF16;
  const bool bbox = options_.score == ScoreKind::kBoundingBox;
  for (int slot : slots) {
    for (size_t i = 0; i < per_layer; ++i) {
      const size_t k = slot * per_layer + i;
      float lim = f16 ? 65504.0f : std::numeric_limits<float>::max();
      const float vals[3] = {s.min[k], s.max[k], s.mean[k]};
      for (float v : vals) {
        if (!(std::fabs(v) <= lim)) return InvalidArgumentError("summary value out of range for the index storage");
      }
      if (!(s.min[k] <= s.max[k])) return InvalidArgumentError("summary min > max");
    }
  }

  std::vector<uint16_t> tk;
  if (options_.score == ScoreKind::kTokens) {
    const size_t per = static_cast<size_t>(s.num_token_keys) * s.head_dim;
    if (s.num_token_keys < 1 || s.token_keys.size() != s.token_layers.size() * s.num_kv_heads * per) {
      return InvalidArgumentError("score=tokens needs summaries with token keys (summarize with token_layers)");
    }
    tk.resize(layers_.size() * s.num_kv_heads * per);
    uint16_t* dst = tk.data();
    for (int l : layers_) {
      const int ts = s.TokenLayerSlot(l);
      if (ts < 0) return InvalidArgumentError("summary lacks token keys of index layer " + std::to_string(l));
      for (int g = 0; g < s.num_kv_heads; ++g, dst += per) {
        const float* src = s.TokenKeys(ts, g);
        for (size_t i = 0; i < per; ++i) {
          if (!(std::fabs(src[i]) <= 65504.0f)) return InvalidArgumentError("token key out of the f16 range");
        }
        index_internal::ToF16(src, dst, per, 0);
      }
    }
  }

  std::unique_lock lock(mu_);
  if (slot_of_.count(entry.key)) return AlreadyExistsError("segment " + entry.key.ToHex() + " already indexed");
  const size_t slot = entries_.size();
  if (!rows_->Reserve(slot + 1) || (pre_rows_ && !pre_rows_->Reserve(slot + 1))) {
    return ResourceExhaustedError("cannot allocate an index block");
  }
  std::byte* row = rows_->Row(slot);
  const int dim = spec_.head_dim;
  size_t out = 0;
  auto put = [&](const float* v, int direction) {
    if (f16) {
      index_internal::ToF16(v, reinterpret_cast<uint16_t*>(row) + out, dim, direction);
    } else {
      std::memcpy(reinterpret_cast<float*>(row) + out, v, dim * sizeof(float));
    }
    out += dim;
  };
  for (int ls : slots) {
    for (int g = 0; g < spec_.num_kv_heads; ++g) {
      const size_t base = s.Offset(ls, g);
      if (bbox) {
        put(&s.max[base], +1);
        put(&s.min[base], -1);
      } else {
        put(&s.mean[base], 0);
      }
    }
  }
  if (pre_rows_) {
    row = pre_rows_->Row(slot);
    out = 0;
    for (int ps : prefilter_slots_) {
      for (int g = 0; g < spec_.num_kv_heads; ++g) put(&s.mean[s.Offset(slots[ps], g)], 0);
    }
  }
  if (options_.score == ScoreKind::kTokens) {
    token_key_bytes_ += tk.size() * sizeof(uint16_t);
    token_keys_.push_back(std::move(tk));
    token_counts_.push_back(s.num_token_keys);
  }
  entries_.push_back(entry);
  slot_of_.emplace(entry.key, slot);
#if defined(KVAGENT_WITH_CUDA)
  if (mirror_) {
    mirror_->RowChanged(slot);
    // A failed upload stays pending: the next search retries it and reports the error.
    if (mirror_->PendingBytes(entries_.size()) >= kMirrorBatchBytes) (void)mirror_->Sync(entries_.size());
  }
#endif
  return Status::Ok();
}

Status LatentIndex::AddSerialized(const IndexEntry& entry, std::string_view bytes) {
  KVAGENT_ASSIGN_OR_RETURN(KeySummary s, KeySummary::Deserialize(bytes));
  return Add(entry, s);
}

Status LatentIndex::Remove(const Hash128& key) {
  std::unique_lock lock(mu_);
  auto it = slot_of_.find(key);
  if (it == slot_of_.end()) return NotFoundError("segment " + key.ToHex() + " not indexed");
  const size_t slot = it->second;
  const size_t last = entries_.size() - 1;
  slot_of_.erase(it);
  if (slot != last) {
    std::memcpy(rows_->Row(slot), rows_->Row(last), rows_->row_bytes());
    if (pre_rows_) std::memcpy(pre_rows_->Row(slot), pre_rows_->Row(last), pre_rows_->row_bytes());
    entries_[slot] = std::move(entries_[last]);
    slot_of_[entries_[slot].key] = slot;
  }
  if (!token_keys_.empty()) {
    token_key_bytes_ -= token_keys_[slot].size() * sizeof(uint16_t);
    if (slot != last) {
      token_keys_[slot] = std::move(token_keys_[last]);
      token_counts_[slot] = token_counts_[last];
    }
    token_keys_.pop_back();
    token_counts_.pop_back();
  }
  entries_.pop_back();
#if defined(KVAGENT_WITH_CUDA)
  if (mirror_) {
    if (slot != last) mirror_->RowChanged(slot);
    mirror_->Truncate(entries_.size());
  }
#endif
  rows_->Shrink(entries_.size());
  if (pre_rows_) pre_rows_->Shrink(entries_.size());
  return Status::Ok();
}

Status LatentIndex::SetPinned(const Hash128& key, bool pinned) {
  std::unique_lock lock(mu_);
  auto it = slot_of_.find(key);
  if (it == slot_of_.end()) return NotFoundError("segment " + key.ToHex() + " not indexed");
  entries_[it->second].pinned = pinned;
  return Status::Ok();
}

bool LatentIndex::Contains(const Hash128& key) const {
  std::shared_lock lock(mu_);
  return slot_of_.count(key) != 0;
}

StatusOr<IndexEntry> LatentIndex::Get(const Hash128& key) const {
  std::shared_lock lock(mu_);
  auto it = slot_of_.find(key);
  if (it == slot_of_.end()) return NotFoundError("segment " + key.ToHex() + " not indexed");
  return entries_[it->second];
}

size_t LatentIndex::size() const {
  std::shared_lock lock(mu_);
  return entries_.size();
}

size_t LatentIndex::MemoryBytes() const {
  std::shared_lock lock(mu_);
  return rows_->MemoryBytes() + (pre_rows_ ? pre_rows_->MemoryBytes() : 0) + entries_.capacity() * sizeof(IndexEntry) +
         token_key_bytes_;
}

StatusOr<std::vector<Hit>> LatentIndex::Search(const QueryView& q, const SearchRequest& req) const {
  const int L = static_cast<int>(layers_.size());
  const int G = spec_.num_kv_heads;
  const int gs = spec_.GroupSize();
  const int D = spec_.head_dim;
  if (q.data == nullptr) return InvalidArgumentError("query: null data");
  if (q.dtype != DType::kF32 && q.dtype != DType::kF16 && q.dtype != DType::kBF16) {
    return InvalidArgumentError("query: dtype must be f32, f16 or bf16");
  }
  if (q.num_layers != L || q.num_q_heads != spec_.num_q_heads || q.head_dim != D || q.num_tokens < 1) {
    return InvalidArgumentError("query shape [" + std::to_string(q.num_layers) + ", " + std::to_string(q.num_q_heads) +
                                ", " + std::to_string(q.num_tokens) + ", " + std::to_string(q.head_dim) +
                                "] does not match the index [" + std::to_string(L) + ", " +
                                std::to_string(spec_.num_q_heads) + ", T>=1, " + std::to_string(D) + "]");
  }
  if (req.top_k < 0) return InvalidArgumentError("top_k must be >= 0");
  if (static_cast<int>(req.backend) > static_cast<int>(SearchBackend::kDevice)) {
    return InvalidArgumentError("unknown search backend");
  }
  if (req.backend == SearchBackend::kDevice && !mirror_) {
    return UnavailableError(
        "device search requested but the index has no CUDA device (IndexOptions::device = -1, or a build without "
        "CUDA)");
  }
  const bool on_device = mirror_ != nullptr && req.backend != SearchBackend::kCpu;
  if (req.token_budget && *req.token_budget < 0) return InvalidArgumentError("token_budget must be >= 0");

  // ---- pooled, scaled query vectors: Qp[block = l*G + g][j][W] ----
  const int T = q.num_tokens;
  const int C = options_.token_chunks == 0 ? T : std::min(options_.token_chunks, T);
  const bool per_head = options_.head_reduce != HeadReduce::kMeanQuery;
  const int nq = per_head ? C * gs : C;
  const bool bbox = options_.score == ScoreKind::kBoundingBox;
  const int W = bbox ? 2 * D : D;
  const int B = L * G;
  const int U = B * C;
  const float scale = static_cast<float>(spec_.EffectiveAttnScale());
  std::vector<std::pair<int, int>> chunk_tokens(C);
  for (int c = 0; c < C; ++c)
    chunk_tokens[c] = {static_cast<int>(int64_t{c} * T / C), static_cast<int>(int64_t{c + 1} * T / C)};
  // dst[d] = scale * mean of q over query layer l, heads [h_lo, h_hi), tokens [t_lo, t_hi); false
  // on a non-finite result.
  std::vector<double> acc(D);
  auto pool = [&](int l, int h_lo, int h_hi, int t_lo, int t_hi, float* dst) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int h = h_lo; h < h_hi; ++h) {
      for (int t = t_lo; t < t_hi; ++t) {
        const size_t base = ((static_cast<size_t>(l) * q.num_q_heads + h) * T + t) * D;
        // One branch per vector, not per element (LoadAsF32's switch kept this loop scalar: about
        // 1.5 ms for a 30-token, 32-head, 8-layer query). Same values, same order of additions.
        double* a = acc.data();
        if (q.dtype == DType::kF32) {
          const float* src = static_cast<const float*>(q.data) + base;
          for (int d = 0; d < D; ++d) a[d] += src[d];
        } else if (q.dtype == DType::kF16) {
          const uint16_t* src = static_cast<const uint16_t*>(q.data) + base;
          for (int d = 0; d < D; ++d) a[d] += F16ToF32(src[d]);
        } else {
          const uint16_t* src = static_cast<const uint16_t*>(q.data) + base;
          for (int d = 0; d < D; ++d) a[d] += BF16ToF32(src[d]);
        }
      }
    }
    const double inv = static_cast<double>(scale) / ((h_hi - h_lo) * (t_hi - t_lo));
    bool finite = true;
    for (int d = 0; d < D; ++d) {
      dst[d] = static_cast<float>(acc[d] * inv);
      finite &= std::isfinite(dst[d]);
    }
    return finite;
  };
  std::vector<float> qp(static_cast<size_t>(B) * nq * W);
  std::vector<float> v(D);
  for (int l = 0; l < L; ++l) {
    for (int g = 0; g < G; ++g) {
      for (int j = 0; j < nq; ++j) {
        const int c = per_head ? j / gs : j;
        const int h_lo = per_head ? g * gs + j % gs : g * gs;
        const int h_hi = per_head ? h_lo + 1 : g * gs + gs;
        if (!pool(l, h_lo, h_hi, chunk_tokens[c].first, chunk_tokens[c].second, v.data())) {
          return InvalidArgumentError("query: non-finite value");
        }
        float* dst = qp.data() + (static_cast<size_t>(l * G + g) * nq + j) * W;
        for (int d = 0; d < D; ++d) {
          if (bbox) {
            dst[d] = std::max(v[d], 0.0f);      // pairs with the box maximum
            dst[D + d] = std::min(v[d], 0.0f);  // pairs with the box minimum
          } else {
            dst[d] = v[d];
          }
        }
      }
    }
  }
  // Stage-1 query: one vector per (prefilter layer, kv_head), the mean over every token and the
  // group, against the stage-1 rows (mean keys).
  const bool f16 = options_.storage == DType::kF16;
  const size_t wbytes = static_cast<size_t>(W) * DTypeSize(options_.storage);
  const bool prefilter_on = pre_rows_ != nullptr && !req.exact && req.top_k > 0 && !on_device;
  std::vector<float> pq;
  if (prefilter_on) {
    for (int slot : prefilter_slots_) {
      for (int g = 0; g < G; ++g) {
        (void)pool(slot, g * gs, (g + 1) * gs, 0, T, v.data());  // finite, as the chunk means are
        pq.insert(pq.end(), v.begin(), v.end());
      }
    }
  }

  std::shared_lock lock(mu_);
  // ---- candidates ----
  std::unordered_set<Hash128, Hash128Hasher> pin_set(req.pinned.begin(), req.pinned.end());
  std::vector<size_t> cand;
  std::vector<char> cand_pinned;
  size_t num_pinned = 0;
  for (size_t slot = 0; slot < entries_.size(); ++slot) {
    const IndexEntry& e = entries_[slot];
    if (req.ns && e.ns != *req.ns) continue;
    const bool pinned = e.pinned || pin_set.count(e.key);
    if (!pinned && !PassesFilters(e, req)) continue;
    cand.push_back(slot);
    cand_pinned.push_back(pinned);
    num_pinned += pinned;
  }
  if (cand.empty()) return std::vector<Hit>{};

  // ---- selection and hits (shared by the CPU and device paths) ----
  // Every pinned candidate, then `others` ((candidate index, score) of non-pinned candidates: all
  // of them, or at least every one that scores >= the top_k-th hit) best first (ties: lower key)
  // while fewer than top_k were taken and the budget holds.
  auto select = [&](std::vector<std::pair<size_t, float>> others) {
    std::vector<size_t> chosen;
    int64_t used = 0;
    for (size_t i = 0; i < cand.size(); ++i) {
      if (cand_pinned[i]) {
        chosen.push_back(i);
        used += entries_[cand[i]].num_tokens;
      }
    }
    auto better = [&](const std::pair<size_t, float>& a, const std::pair<size_t, float>& b) {
      if (a.second != b.second) return a.second > b.second;
      return entries_[cand[a.first]].key < entries_[cand[b.first]].key;
    };
    if (!req.token_budget && req.top_k > 0 && static_cast<size_t>(req.top_k) < others.size()) {
      std::partial_sort(others.begin(), others.begin() + req.top_k, others.end(), better);
      others.resize(req.top_k);
    } else {
      std::sort(others.begin(), others.end(), better);
    }
    int taken = 0;
    for (const auto& [i, sc] : others) {
      if (req.top_k > 0 && taken >= req.top_k) break;
      const int64_t n = entries_[cand[i]].num_tokens;
      if (req.token_budget && used + n > *req.token_budget) continue;
      chosen.push_back(i);
      used += n;
      ++taken;
    }
    return chosen;
  };
  // The hit of candidate i; x: its U normalised votes (breakdown), or null.
  auto make_hit = [&](size_t i, float score, const float* x) {
    Hit h;
    h.entry = entries_[cand[i]];
    h.score = score;
    h.pinned = cand_pinned[i];
    if (x != nullptr) {
      Breakdown& bd = h.breakdown;
      bd.layers = layers_;
      bd.per_layer.assign(L, 0.0f);
      bd.per_kv_head.assign(G, 0.0f);
      bd.per_chunk.assign(C, 0.0f);
      bd.chunk_tokens = chunk_tokens;
      for (int l = 0; l < L; ++l) {
        for (int g = 0; g < G; ++g) {
          for (int c = 0; c < C; ++c) {
            const float v = x[(l * G + g) * C + c];
            bd.per_layer[l] += v / (G * C);
            bd.per_kv_head[g] += v / (L * C);
            bd.per_chunk[c] += v / (L * G);
          }
        }
      }
      std::vector<int> idx(U);
      for (int u = 0; u < U; ++u) idx[u] = u;
      const int nv = std::min(U, 3);
      std::partial_sort(idx.begin(), idx.begin() + nv, idx.end(), [&](int a, int b) { return x[a] > x[b]; });
      for (int k = 0; k < nv; ++k) {
        const int u = idx[k];
        const int c = u % C, g = (u / C) % G, l = u / (C * G);
        bd.top_votes.push_back(Vote{layers_[l], g, chunk_tokens[c].first, chunk_tokens[c].second, x[u]});
      }
    }
    return h;
  };
  // Ranks by score, then puts the hits in original order.
  auto finish = [](std::vector<Hit>& hits) {
    std::vector<size_t> by_score(hits.size());
    for (size_t i = 0; i < hits.size(); ++i) by_score[i] = i;
    std::sort(by_score.begin(), by_score.end(), [&](size_t a, size_t b) {
      if (hits[a].score != hits[b].score) return hits[a].score > hits[b].score;
      return hits[a].entry.key < hits[b].entry.key;
    });
    for (size_t r = 0; r < by_score.size(); ++r) hits[by_score[r]].rank = static_cast<int>(r);
    std::sort(hits.begin(), hits.end(), [](const Hit& a, const Hit& b) {
      const IndexEntry &x = a.entry, &y = b.entry;
      if (x.time_us != y.time_us) return x.time_us < y.time_us;
      if (x.session != y.session) return x.session < y.session;
      if (x.turn != y.turn) return x.turn < y.turn;
      if (x.chunk != y.chunk) return x.chunk < y.chunk;
      return x.key < y.key;
    });
  };

#if defined(KVAGENT_WITH_CUDA)
  // ---- device path: exact brute force over the mirror ----
  if (on_device) {
    std::lock_guard dlock(device_mu_);
    KVAGENT_RETURN_IF_ERROR(mirror_->Sync(entries_.size()));
    const size_t S = cand.size();
    cuda::MirrorQuery mq;
    mq.q = qp.data();
    mq.blocks = B;
    mq.width = W;
    mq.nq = nq;
    mq.group = per_head ? gs : 1;
    mq.reduce = options_.head_reduce;
    mq.norm = options_.norm;
    mq.agg = options_.agg;
    mq.slots = S == entries_.size() ? nullptr : cand.data();  // candidates are in slot order: all = identity
    mq.num_candidates = S;
    KVAGENT_RETURN_IF_ERROR(mirror_->Score(mq));
    // Without a budget, the device's top (top_k + pinned) decides unless the last of them ties the
    // top_k-th non-pinned one (a tie may continue past it: the CPU breaks ties by key, the device by
    // row); otherwise every score comes back and the host selects as the CPU does.
    std::vector<std::pair<size_t, float>> others;
    bool complete = false;
    const size_t m = static_cast<size_t>(req.top_k) + num_pinned;
    if (!req.token_budget && req.top_k > 0 && m < S && m <= static_cast<size_t>(cuda::kMaxSearchTopK)) {
      std::vector<std::pair<size_t, float>> top;
      KVAGENT_RETURN_IF_ERROR(mirror_->Top(static_cast<int>(m), &top));
      float kth = std::numeric_limits<float>::quiet_NaN();
      for (const auto& t : top) {
        if (cand_pinned[t.first]) continue;
        others.push_back(t);
        if (others.size() == static_cast<size_t>(req.top_k)) kth = t.second;
      }
      complete = !top.empty() && top.back().second < kth;
    }
    if (!complete) {
      std::vector<float> all;
      KVAGENT_RETURN_IF_ERROR(mirror_->AllScores(&all));
      others.clear();
      others.reserve(S - num_pinned);
      for (size_t i = 0; i < S; ++i) {
        if (!cand_pinned[i]) others.push_back({i, all[i]});
      }
    }
    const std::vector<size_t> chosen = select(std::move(others));
    std::vector<float> hit_scores, votes, stats;
    KVAGENT_RETURN_IF_ERROR(mirror_->Gather(chosen, &hit_scores, req.explain ? &votes : nullptr, &stats));
    std::vector<Hit> hits;
    hits.reserve(chosen.size());
    std::vector<float> x(U);
    for (size_t k = 0; k < chosen.size(); ++k) {
      if (req.explain) {
        const float* v = votes.data() + k * U;
        for (int u = 0; u < U; ++u) {
          const float a = stats[2 * u], b = stats[2 * u + 1];
          x[u] = options_.norm == TokenNorm::kSoftmax  ? std::exp((v[u] - a) - b)
                 : options_.norm == TokenNorm::kZScore ? (v[u] - a) * b
                                                       : v[u];
        }
      }
      hits.push_back(make_hit(chosen[k], hit_scores[k], req.explain ? x.data() : nullptr));
    }
    finish(hits);
    return hits;
  }
#endif
  const int max_threads = options_.num_threads > 0 ? options_.num_threads : UsableCores();
  auto threads_for = [&](size_t n) {
    return static_cast<int>(std::clamp<size_t>(n / kMinSegmentsPerThread, 1, max_threads));
  };

  // ---- stage 1 (two-stage search only): keep the best candidates by the proxy score ----
  // weight[i]: candidates row i stands for in the normalisation statistics (empty = 1 each).
  std::vector<double> weight;
  const size_t keep = std::max<size_t>(options_.prefilter_keep, size_t{32} * req.top_k);
  const size_t sample = options_.prefilter_sample;
  if (prefilter_on && cand.size() > static_cast<size_t>(options_.prefilter_min_segments) &&
      keep + sample < cand.size() - num_pinned) {
    std::vector<const std::byte*> rows(cand.size());
    for (size_t i = 0; i < cand.size(); ++i) rows[i] = pre_rows_->Row(cand[i]);
    const std::vector<float> proxy = index_internal::ProxyScores(rows, static_cast<int>(prefilter_slots_.size()) * G,
                                                                 f16, pq.data(), D, threads_for(cand.size()));
    index_internal::RescoreRows chosen = index_internal::ChooseRows(proxy, cand_pinned, keep, sample);
    std::vector<size_t> sub(chosen.rows.size());
    std::vector<char> sub_pinned(chosen.rows.size());
    for (size_t k = 0; k < chosen.rows.size(); ++k) {
      sub[k] = cand[chosen.rows[k]];
      sub_pinned[k] = cand_pinned[chosen.rows[k]];
    }
    cand = std::move(sub);
    cand_pinned = std::move(sub_pinned);
    weight = std::move(chosen.weight);
  }
  const size_t S = cand.size();

  if (options_.score == ScoreKind::kTokens) {
    // ---- token-level attention of the retrieval heads (score = tokens) ----
    std::vector<index_internal::TokenBlock> blocks(S);
    for (size_t i = 0; i < S; ++i) blocks[i] = {token_keys_[cand[i]].data(), token_counts_[cand[i]]};
    // q vectors of each head over `tokens` query tokens, weighted per dimension.
    auto head_queries = [&](const void* data, DType dtype, int tokens, std::vector<std::vector<float>>& qs,
                            std::vector<index_internal::TokenHead>& heads) {
      qs.assign(token_heads_.size(), {});
      heads.clear();
      for (size_t k = 0; k < token_heads_.size(); ++k) {
        const RetrievalHead& th = token_heads_[k];
        const float* w = q_weight_[th.layer].data();
        qs[k].resize(static_cast<size_t>(tokens) * D);
        for (int t = 0; t < tokens; ++t) {
          const size_t base = ((static_cast<size_t>(th.layer) * spec_.num_q_heads + th.q_head) * tokens + t) * D;
          for (int d = 0; d < D; ++d) qs[k][static_cast<size_t>(t) * D + d] = LoadAsF32(data, dtype, base + d) * w[d];
        }
        heads.push_back({qs[k].data(), tokens, th.layer * G + th.q_head / gs, th.weight});
      }
    };
    std::vector<std::vector<float>> qs;
    std::vector<index_internal::TokenHead> heads;
    head_queries(q.data, q.dtype, T, qs, heads);
    std::vector<float> score = index_internal::TokenAttentionScores(blocks, weight, D, heads, max_threads);
    if (!null_query_.empty()) {
      head_queries(null_query_.data(), DType::kF32, null_tokens_, qs, heads);
      const std::vector<float> base = index_internal::TokenAttentionScores(blocks, weight, D, heads, max_threads);
      for (size_t i = 0; i < S; ++i) score[i] -= base[i];
    }
    std::vector<std::pair<size_t, float>> others;
    others.reserve(S - num_pinned);
    for (size_t i = 0; i < S; ++i) {
      if (!cand_pinned[i]) others.push_back({i, score[i]});
    }
    std::vector<Hit> hits;
    for (size_t i : select(std::move(others))) hits.push_back(make_hit(i, score[i], nullptr));
    finish(hits);
    return hits;
  }

  // The votes of all scored rows are kept for the normalisation pass (4 bytes each).
  if (S * static_cast<size_t>(U) > kMaxVotes) {
    return ResourceExhaustedError("search needs " + std::to_string(S * static_cast<size_t>(U) * 4) +
                                  " bytes of votes (candidates x layers x kv_heads x chunks); use fewer layers or "
                                  "token_chunks, filter the candidates or enable the prefilter");
  }
  const int threads = threads_for(S);
  auto weight_of = [&](size_t i) { return weight.empty() ? 1.0 : weight[i]; };

  // ---- raw scores R[s][u], u = (l*G + g)*C + c; per-thread normalisation statistics ----
  // Not value-initialised: every element is written below.
  std::unique_ptr<float[]> R(new (std::nothrow) float[S * U]);
  if (!R) return ResourceExhaustedError("cannot allocate the vote matrix");
  const auto dot2 = index_internal::SelectDotRows2(W);
  std::vector<std::vector<float>> t_max(threads, std::vector<float>(U, -std::numeric_limits<float>::infinity()));
  std::vector<std::vector<double>> t_sum(threads, std::vector<double>(U, 0.0));
  std::vector<std::vector<double>> t_sq(threads, std::vector<double>(U, 0.0));
  const TokenNorm norm = options_.norm;
  // Rows are scored in tiles, block by block, so one block's query vectors stay in L1 for the tile.
  constexpr size_t kTile = 16;
  index_internal::ParallelFor(S, threads, [&](size_t lo, size_t hi, int t) {
    std::vector<float> raw(2 * nq);
    float* mx = t_max[t].data();
    double* sm = t_sum[t].data();
    double* sq = t_sq[t].data();
    for (size_t i0 = lo; i0 < hi; i0 += kTile) {
      const size_t i1 = std::min(hi, i0 + kTile);
      for (int b = 0; b < B; ++b) {
        const float* qb = qp.data() + static_cast<size_t>(b) * nq * W;
        for (size_t i = i0; i < i1; i += 2) {
          // A lone last row is paired with itself: a row's votes must not depend on its neighbour's
          // presence (the same arithmetic whatever the candidate set).
          const std::byte* row0 = rows_->Row(cand[i]) + b * wbytes;
          const bool pair = i + 1 < i1;
          const std::byte* row1 = pair ? rows_->Row(cand[i + 1]) + b * wbytes : row0;
          if (!per_head) {  // one query vector per vote: straight into R
            float* out0 = R.get() + i * U + b * C;
            dot2(row0, row1, f16, qb, nq, W, out0, pair ? out0 + U : raw.data());
            continue;
          }
          dot2(row0, row1, f16, qb, nq, W, raw.data(), raw.data() + nq);
          for (size_t r = 0; r < (pair ? 2u : 1u); ++r) {
            const float* x = raw.data() + r * nq;
            float* out = R.get() + (i + r) * U + b * C;
            for (int c = 0; c < C; ++c) {
              if (options_.head_reduce == HeadReduce::kMaxScore) {
                out[c] = *std::max_element(x + c * gs, x + (c + 1) * gs);
              } else {
                float s = 0;
                for (int h = 0; h < gs; ++h) s += x[c * gs + h];
                out[c] = s / gs;
              }
            }
          }
        }
      }
      for (size_t i = i0; i < i1; ++i) {
        const float* out = R.get() + i * U;
        if (norm == TokenNorm::kSoftmax) {
          for (int u = 0; u < U; ++u) mx[u] = std::max(mx[u], out[u]);
        } else if (norm == TokenNorm::kZScore) {
          const double w = weight_of(i);
          for (int u = 0; u < U; ++u) {
            sm[u] += w * out[u];
            sq[u] += w * out[u] * out[u];
          }
        }
      }
    }
  });

  // ---- normalisation statistics: normalised vote = (x - shift) * mul ----
  std::vector<float> shift(U, 0.0f), mul(U, 1.0f);
  // Softmax with max aggregation leaves R raw (the maximum of exp(x - m) / z needs one exp per
  // segment, not per vote); then exp_pending and log_z hold what is still to apply.
  const bool exp_pending = norm == TokenNorm::kSoftmax && options_.agg == Aggregation::kMax;
  std::vector<float> log_z(U, 0.0f);
  double total_weight = 0;
  for (size_t i = 0; i < S; ++i) total_weight += weight_of(i);
  if (norm == TokenNorm::kSoftmax) {
    for (int t = 1; t < threads; ++t) {
      for (int u = 0; u < U; ++u) t_max[0][u] = std::max(t_max[0][u], t_max[t][u]);
    }
    shift = t_max[0];
    for (auto& z : t_sum) std::fill(z.begin(), z.end(), 0.0);
    index_internal::ParallelFor(S, threads, [&](size_t lo, size_t hi, int t) {
      double* z = t_sum[t].data();
      std::vector<float> tmp(exp_pending ? U : 0);
      for (size_t i = lo; i < hi; ++i) {
        float* x = R.get() + i * U;
        if (exp_pending) x = std::copy(x, x + U, tmp.data()) - U;
        index_internal::ExpShifted(x, shift.data(), U);
        const double w = weight_of(i);
        for (int u = 0; u < U; ++u) z[u] += w * x[u];
      }
    });
    for (int u = 0; u < U; ++u) {
      double z = 0;
      for (int t = 0; t < threads; ++t) z += t_sum[t][u];
      mul[u] = static_cast<float>(1.0 / z);  // z >= 1: the maximum contributes exp(0)
      log_z[u] = static_cast<float>(std::log(z));
      if (!exp_pending) shift[u] = 0;
    }
  } else if (norm == TokenNorm::kZScore) {
    for (int u = 0; u < U; ++u) {
      const index_internal::Standardiser z = index_internal::MergeMoments(t_sum, t_sq, u, total_weight, 1e-12);
      shift[u] = z.mean;
      mul[u] = z.inv_sd;
    }
  }
  // out[u] = the normalised votes of row x.
  auto normalised = [&](const float* x, float* out) {
    if (exp_pending) {
      std::copy(x, x + U, out);
      index_internal::ExpShifted(out, shift.data(), U);
      for (int u = 0; u < U; ++u) out[u] *= mul[u];
    } else {
      for (int u = 0; u < U; ++u) out[u] = (x[u] - shift[u]) * mul[u];
    }
  };

  // ---- aggregation per segment (R is read, not rewritten) ----
  std::vector<float> score(S);
  const Aggregation agg = options_.agg;
  const int top_n = std::max(1, static_cast<int>(std::ceil(options_.top_p * U - 1e-9)));
  index_internal::ParallelFor(S, threads, [&](size_t lo, size_t hi, int) {
    std::vector<float> tmp(U);
    for (size_t i = lo; i < hi; ++i) {
      const float* x = R.get() + i * U;
      if (agg == Aggregation::kMax && exp_pending) {
        float best = -std::numeric_limits<float>::infinity();
        for (int u = 0; u < U; ++u) best = std::max(best, (x[u] - shift[u]) - log_z[u]);
        score[i] = best < -87.0f ? 0.0f : std::exp(best);  // ExpShifted flushes there too
      } else if (agg == Aggregation::kMax) {
        float best = -std::numeric_limits<float>::infinity();
        for (int u = 0; u < U; ++u) best = std::max(best, (x[u] - shift[u]) * mul[u]);
        score[i] = best;
      } else if (agg == Aggregation::kTopP) {
        normalised(x, tmp.data());
        std::nth_element(tmp.begin(), tmp.begin() + (top_n - 1), tmp.end(), std::greater<float>());
        double s = 0;
        for (int k = 0; k < top_n; ++k) s += tmp[k];
        score[i] = static_cast<float>(s / top_n);
      } else {
        double s = 0;
        for (int u = 0; u < U; ++u) s += (x[u] - shift[u]) * mul[u];
        score[i] = static_cast<float>(s / U);
      }
    }
  });

  // ---- selection ----
  std::vector<std::pair<size_t, float>> others;
  others.reserve(S - num_pinned);
  for (size_t i = 0; i < S; ++i) {
    if (!cand_pinned[i]) others.push_back({i, score[i]});
  }
  const std::vector<size_t> chosen = select(std::move(others));

  std::vector<Hit> hits;
  hits.reserve(chosen.size());
  std::vector<float> x(U);
  for (size_t i : chosen) {
    if (req.explain) normalised(R.get() + i * U, x.data());
    hits.push_back(make_hit(i, score[i], req.explain ? x.data() : nullptr));
  }
  finish(hits);
  return hits;
}

}  // namespace kvagent
