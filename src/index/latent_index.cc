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

#include "index/score_kernel.h"
#include "kvagent/index.h"

namespace kvagent {
namespace {

constexpr size_t kTargetBlockBytes = size_t{64} << 20;
// Below this many candidates per thread, starting threads costs more than it saves.
constexpr size_t kMinSegmentsPerThread = 1024;
constexpr size_t kMaxVotes = size_t{1} << 30;  // 4 GiB of f32 scratch

// Runs fn(begin, end, thread_index) over [0, n) split into `threads` contiguous ranges.
template <typename Fn>
void ParallelFor(size_t n, int threads, Fn fn) {
  if (threads <= 1 || n < 2) {
    fn(size_t{0}, n, 0);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) {
    pool.emplace_back([&, t] { fn(n * t / threads, n * (t + 1) / threads, t); });
  }
  fn(0, n / threads, 0);
  for (auto& th : pool) th.join();
}

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
  row_elems_ = layers_.size() * spec_.num_kv_heads * width;
  row_bytes_ = row_elems_ * DTypeSize(options_.storage);
  rows_per_block_ = std::clamp<size_t>(kTargetBlockBytes / row_bytes_, 1, 4096);
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
  if (static_cast<int>(options.score) > 1 || static_cast<int>(options.norm) > 2 || static_cast<int>(options.agg) > 2 ||
      static_cast<int>(options.head_reduce) > 2) {
    return InvalidArgumentError("unknown score, norm, agg or head_reduce value");
  }
  std::vector<int> layers = options.layers.empty() ? DefaultIndexLayers(spec.num_layers) : options.layers;
  std::vector<int> sorted = layers;
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 0; i < sorted.size(); ++i) {
    if (sorted[i] < 0 || sorted[i] >= spec.num_layers) {
      return InvalidArgumentError("index layer " + std::to_string(sorted[i]) + " out of range");
    }
    if (i > 0 && sorted[i] == sorted[i - 1]) return InvalidArgumentError("index layer listed twice");
  }
  return std::unique_ptr<LatentIndex>(new LatentIndex(spec, std::move(options), std::move(layers)));
}

std::byte* LatentIndex::RowPtr(size_t slot) {
  return blocks_[slot / rows_per_block_].get() + (slot % rows_per_block_) * row_bytes_;
}
const std::byte* LatentIndex::RowPtr(size_t slot) const {
  return blocks_[slot / rows_per_block_].get() + (slot % rows_per_block_) * row_bytes_;
}

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

  std::unique_lock lock(mu_);
  if (slot_of_.count(entry.key)) return AlreadyExistsError("segment " + entry.key.ToHex() + " already indexed");
  const size_t slot = entries_.size();
  if (slot / rows_per_block_ >= blocks_.size()) {
    std::unique_ptr<std::byte[]> block(new (std::nothrow) std::byte[rows_per_block_ * row_bytes_]);
    if (!block) return ResourceExhaustedError("cannot allocate an index block");
    blocks_.push_back(std::move(block));
  }
  std::byte* row = RowPtr(slot);
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
  entries_.push_back(entry);
  slot_of_.emplace(entry.key, slot);
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
    std::memcpy(RowPtr(slot), RowPtr(last), row_bytes_);
    entries_[slot] = std::move(entries_[last]);
    slot_of_[entries_[slot].key] = slot;
  }
  entries_.pop_back();
  // Keep one spare block so add/remove at a block boundary does not thrash the allocator.
  while (blocks_.size() > entries_.size() / rows_per_block_ + 2) blocks_.pop_back();
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
  return blocks_.size() * rows_per_block_ * row_bytes_ + entries_.capacity() * sizeof(IndexEntry);
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
  std::vector<float> qp(static_cast<size_t>(B) * nq * W);
  {
    std::vector<double> acc(D);
    for (int l = 0; l < L; ++l) {
      for (int g = 0; g < G; ++g) {
        for (int j = 0; j < nq; ++j) {
          const int c = per_head ? j / gs : j;
          const int h_lo = per_head ? g * gs + j % gs : g * gs;
          const int h_hi = per_head ? h_lo + 1 : g * gs + gs;
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int h = h_lo; h < h_hi; ++h) {
            for (int t = chunk_tokens[c].first; t < chunk_tokens[c].second; ++t) {
              const size_t base = ((static_cast<size_t>(l) * q.num_q_heads + h) * T + t) * D;
              for (int d = 0; d < D; ++d) acc[d] += LoadAsF32(q.data, q.dtype, base + d);
            }
          }
          const double inv =
              static_cast<double>(scale) / ((h_hi - h_lo) * (chunk_tokens[c].second - chunk_tokens[c].first));
          float* dst = qp.data() + (static_cast<size_t>(l * G + g) * nq + j) * W;
          for (int d = 0; d < D; ++d) {
            const float v = static_cast<float>(acc[d] * inv);
            if (!std::isfinite(v)) return InvalidArgumentError("query: non-finite value");
            if (bbox) {
              dst[d] = std::max(v, 0.0f);      // pairs with the box maximum
              dst[D + d] = std::min(v, 0.0f);  // pairs with the box minimum
            } else {
              dst[d] = v;
            }
          }
        }
      }
    }
  }

  std::shared_lock lock(mu_);
  // ---- candidates ----
  std::unordered_set<Hash128, Hash128Hasher> pin_set(req.pinned.begin(), req.pinned.end());
  std::vector<size_t> cand;
  std::vector<char> cand_pinned;
  for (size_t slot = 0; slot < entries_.size(); ++slot) {
    const IndexEntry& e = entries_[slot];
    if (req.ns && e.ns != *req.ns) continue;
    const bool pinned = e.pinned || pin_set.count(e.key);
    if (!pinned && !PassesFilters(e, req)) continue;
    cand.push_back(slot);
    cand_pinned.push_back(pinned);
  }
  const size_t S = cand.size();
  if (S == 0) return std::vector<Hit>{};

  // The votes of all candidates are kept for the normalisation pass (4 bytes each).
  if (S * static_cast<size_t>(U) > kMaxVotes) {
    return ResourceExhaustedError("search needs " + std::to_string(S * static_cast<size_t>(U) * 4) +
                                  " bytes of votes (candidates x layers x kv_heads x chunks); use fewer layers or "
                                  "token_chunks, or filter the candidates");
  }
  int threads = options_.num_threads > 0 ? options_.num_threads : UsableCores();
  threads = static_cast<int>(std::clamp<size_t>(S / kMinSegmentsPerThread, 1, threads));

  // ---- raw scores R[s][u], u = (l*G + g)*C + c; per-thread normalisation statistics ----
  std::vector<float> R(S * U);
  const bool f16 = options_.storage == DType::kF16;
  const size_t wbytes = static_cast<size_t>(W) * DTypeSize(options_.storage);
  const auto dot = index_internal::SelectDotRows(W);
  std::vector<std::vector<float>> t_max(threads, std::vector<float>(U, -std::numeric_limits<float>::infinity()));
  std::vector<std::vector<double>> t_sum(threads, std::vector<double>(U, 0.0));
  std::vector<std::vector<double>> t_sq(threads, std::vector<double>(U, 0.0));
  const TokenNorm norm = options_.norm;
  ParallelFor(S, threads, [&](size_t lo, size_t hi, int t) {
    std::vector<float> raw(nq);
    float* mx = t_max[t].data();
    double* sm = t_sum[t].data();
    double* sq = t_sq[t].data();
    for (size_t i = lo; i < hi; ++i) {
      const std::byte* row = RowPtr(cand[i]);
      float* out = R.data() + i * U;
      for (int b = 0; b < B; ++b) {
        dot(row + b * wbytes, f16, qp.data() + static_cast<size_t>(b) * nq * W, nq, W, raw.data());
        for (int c = 0; c < C; ++c) {
          float v;
          if (!per_head) {
            v = raw[c];
          } else if (options_.head_reduce == HeadReduce::kMaxScore) {
            v = *std::max_element(raw.begin() + c * gs, raw.begin() + (c + 1) * gs);
          } else {
            float s = 0;
            for (int h = 0; h < gs; ++h) s += raw[c * gs + h];
            v = s / gs;
          }
          out[b * C + c] = v;
        }
      }
      if (norm == TokenNorm::kSoftmax) {
        for (int u = 0; u < U; ++u) mx[u] = std::max(mx[u], out[u]);
      } else if (norm == TokenNorm::kZScore) {
        for (int u = 0; u < U; ++u) {
          sm[u] += out[u];
          sq[u] += static_cast<double>(out[u]) * out[u];
        }
      }
    }
  });

  // ---- normalisation across candidates, then aggregation per segment ----
  std::vector<float> shift(U, 0.0f), mul(U, 1.0f);
  if (norm == TokenNorm::kSoftmax) {
    for (int t = 1; t < threads; ++t) {
      for (int u = 0; u < U; ++u) t_max[0][u] = std::max(t_max[0][u], t_max[t][u]);
    }
    shift = t_max[0];
    for (auto& v : t_sum) std::fill(v.begin(), v.end(), 0.0);
    ParallelFor(S, threads, [&](size_t lo, size_t hi, int t) {
      double* z = t_sum[t].data();
      for (size_t i = lo; i < hi; ++i) {
        float* x = R.data() + i * U;
        index_internal::ExpShifted(x, shift.data(), U);
        for (int u = 0; u < U; ++u) z[u] += x[u];
      }
    });
    for (int u = 0; u < U; ++u) {
      double z = 0;
      for (int t = 0; t < threads; ++t) z += t_sum[t][u];
      mul[u] = static_cast<float>(1.0 / z);  // z >= 1: the maximum contributes exp(0)
      shift[u] = 0;
    }
  } else if (norm == TokenNorm::kZScore) {
    for (int u = 0; u < U; ++u) {
      double s = 0, s2 = 0;
      for (int t = 0; t < threads; ++t) {
        s += t_sum[t][u];
        s2 += t_sq[t][u];
      }
      const double mean = s / S;
      const double var = std::max(0.0, s2 / S - mean * mean);
      const double sd = std::sqrt(var);
      shift[u] = static_cast<float>(mean);
      mul[u] = sd > 1e-12 * std::max(1.0, std::fabs(mean)) ? static_cast<float>(1.0 / sd) : 0.0f;
    }
  }
  std::vector<float> score(S);
  const Aggregation agg = options_.agg;
  const int top_n = std::max(1, static_cast<int>(std::ceil(options_.top_p * U - 1e-9)));
  ParallelFor(S, threads, [&](size_t lo, size_t hi, int) {
    std::vector<float> tmp(U);
    for (size_t i = lo; i < hi; ++i) {
      float* x = R.data() + i * U;
      for (int u = 0; u < U; ++u) x[u] = (x[u] - shift[u]) * mul[u];
      if (agg == Aggregation::kMax) {
        score[i] = *std::max_element(x, x + U);
      } else if (agg == Aggregation::kTopP) {
        std::copy(x, x + U, tmp.begin());
        std::nth_element(tmp.begin(), tmp.begin() + (top_n - 1), tmp.end(), std::greater<float>());
        double s = 0;
        for (int k = 0; k < top_n; ++k) s += tmp[k];
        score[i] = static_cast<float>(s / top_n);
      } else {
        double s = 0;
        for (int u = 0; u < U; ++u) s += x[u];
        score[i] = static_cast<float>(s / U);
      }
    }
  });

  // ---- selection ----
  std::vector<size_t> chosen;
  int64_t used = 0;
  for (size_t i = 0; i < S; ++i) {
    if (cand_pinned[i]) {
      chosen.push_back(i);
      used += entries_[cand[i]].num_tokens;
    }
  }
  std::vector<size_t> order;
  for (size_t i = 0; i < S; ++i) {
    if (!cand_pinned[i]) order.push_back(i);
  }
  auto better = [&](size_t a, size_t b) {
    if (score[a] != score[b]) return score[a] > score[b];
    return entries_[cand[a]].key < entries_[cand[b]].key;
  };
  if (!req.token_budget && req.top_k > 0 && static_cast<size_t>(req.top_k) < order.size()) {
    std::partial_sort(order.begin(), order.begin() + req.top_k, order.end(), better);
    order.resize(req.top_k);
  } else {
    std::sort(order.begin(), order.end(), better);
  }
  int taken = 0;
  for (size_t i : order) {
    if (req.top_k > 0 && taken >= req.top_k) break;
    const int64_t n = entries_[cand[i]].num_tokens;
    if (req.token_budget && used + n > *req.token_budget) continue;
    chosen.push_back(i);
    used += n;
    ++taken;
  }

  std::vector<Hit> hits;
  hits.reserve(chosen.size());
  for (size_t i : chosen) {
    Hit h;
    h.entry = entries_[cand[i]];
    h.score = score[i];
    h.pinned = cand_pinned[i];
    if (req.explain) {
      Breakdown& bd = h.breakdown;
      const float* x = R.data() + i * U;
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
    hits.push_back(std::move(h));
  }
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
  return hits;
}

}  // namespace kvagent
