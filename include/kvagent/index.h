// Compressed keys (KeySummary) and latent-space retrieval over them (LatentIndex).
//
// A KeySummary holds, for each selected layer and KV head of one segment, the per-dimension
// minimum and maximum of its pre-RoPE keys (a bounding box, as in Quest) and the mean key.
// LatentIndex keeps the summaries of many segments in RAM as one dense row-major matrix
// ([segment][layer][kv_head][2*head_dim] for the bounding box or [..][head_dim] for the mean)
// and scores a new query's pre-RoPE Q vectors against every candidate segment.
//
// Scoring (docs/retrieval.md has the math and why the defaults are what they are):
//   1. Query pooling. q[layer][q_head][token][dim] is cast to f32. The tokens are split into
//      `token_chunks` contiguous chunks (0 = one chunk per token) and averaged per chunk. With
//      HeadReduce::kMeanQuery the query heads of each GQA group are averaged too, so every
//      (layer, kv_head, chunk) is one query vector; otherwise every query head is scored and the
//      scores of its group reduced (mean or max) onto its KV head. Vectors are multiplied by
//      ModelSpec::EffectiveAttnScale() (Gemma 3: query_pre_attn_scalar^-0.5 via attn_scale).
//   2. Raw score per (segment, layer, kv_head, chunk): bounding-box upper bound
//      sum_d max(q_d*min_d, q_d*max_d) (>= q.k for every key of the segment) or mean-key dot q.mu.
//   3. Normalisation per (layer, kv_head, chunk) across the candidate segments: softmax,
//      z-score or none.
//   4. Aggregation over the (layer, kv_head, chunk) "votes" of a segment: mean, max or top_p
//      (mean of the segment's highest ceil(top_p * votes) votes).
//   5. Selection: pinned segments first (always included, their tokens count against the
//      budget), then the rest by descending score while fewer than top_k were taken and the
//      budget holds (a segment that does not fit is skipped, smaller ones may still fit).
//      Hits are returned in original order: time_us, then session, turn, chunk.
//   Large searches (IndexOptions::prefilter_*, on by default above 20,000 candidates) first keep
//   the best candidates by a cheap proxy and run the steps above on those only: approximate,
//   tested for recall against this brute force, which SearchRequest::exact still runs.
//   With IndexOptions::device >= 0 (builds with CUDA) steps 2-4 run on a CUDA device over a device
//   mirror of the matrix, always as the exact brute force, and agree with the CPU brute force
//   within float rounding (same hits, order and breakdown unless two scores are that close).
//
// Thread-safety: KeySummary is a value. LatentIndex is safe for concurrent use: Search and the
// const accessors take a shared lock, Add/Remove/SetPinned an exclusive one. Search itself runs on
// up to IndexOptions::num_threads threads; device searches of one index run one at a time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "kvagent/dtype.h"
#include "kvagent/hash.h"
#include "kvagent/model_spec.h"
#include "kvagent/segment.h"
#include "kvagent/status.h"

namespace kvagent {

namespace index_internal {
class RowBlocks;
}
namespace cuda {
class IndexMirror;
}

// ---------------------------------------------------------------------------------------------
// KeySummary

struct KeySummary {
  int num_kv_heads = 0;
  int head_dim = 0;
  int num_tokens = 0;       // keys summarised (>= 1)
  std::vector<int> layers;  // model layer indices kept, strictly ascending
  // Each [layers.size()][num_kv_heads][head_dim], f32.
  std::vector<float> min;
  std::vector<float> max;
  std::vector<float> mean;
  // Optional per-token keys for token-level scoring (ScoreKind::kTokens): the keys of the tokens
  // selected at summarise time (all tokens, or those a token mask keeps), for `token_layers`
  // (model layer indices, strictly ascending, a subset of `layers` not required), laid out
  // [token_layers.size()][num_kv_heads][num_token_keys][head_dim], f32 in memory, f16 serialised
  // (rounded to nearest). Empty token_layers: no token keys (the v1 serialised form).
  std::vector<int> token_layers;
  int num_token_keys = 0;
  std::vector<float> token_keys;

  size_t Offset(int layer_slot, int head) const {
    return (static_cast<size_t>(layer_slot) * num_kv_heads + head) * static_cast<size_t>(head_dim);
  }
  // Slot of model layer `layer` in `layers`, or -1.
  int LayerSlot(int layer) const;
  // Slot of model layer `layer` in `token_layers`, or -1.
  int TokenLayerSlot(int layer) const;
  // First of the num_token_keys x head_dim keys of (token layer slot, kv head).
  const float* TokenKeys(int token_slot, int head) const {
    return token_keys.data() +
           (static_cast<size_t>(token_slot) * num_kv_heads + head) * num_token_keys * static_cast<size_t>(head_dim);
  }

  // Summarises keys laid out as [num_layers][num_kv_heads][num_tokens][head_dim] (dense,
  // element type `dtype`: f32, f16 or bf16). `layers`: model layer indices to keep (any order,
  // no duplicates, each < num_layers); empty = all. InvalidArgument on bad shapes, dtype,
  // layers or non-finite keys.
  // `token_layers`: model layers whose per-token keys are kept too (any order, no duplicates,
  // each < num_layers; empty = none). `token_mask`: empty (every token) or num_tokens bytes, non-zero
  // = keep that token's keys (at least one must be kept when token_layers is not empty); the box
  // and mean always cover every token.
  static StatusOr<KeySummary> FromKeys(const void* keys, DType dtype, int num_layers, int num_kv_heads, int num_tokens,
                                       int head_dim, std::span<const int> layers = {},
                                       std::span<const int> token_layers = {},
                                       std::span<const uint8_t> token_mask = {});
  // Same from a Segment's canonical payload (its K planes). InvalidArgument if the segment is
  // invalid or its keys are not pre-RoPE.
  static StatusOr<KeySummary> FromSegment(const Segment& segment, std::span<const int> layers = {},
                                          std::span<const int> token_layers = {},
                                          std::span<const uint8_t> token_mask = {});

  // Stable bytes (kvagent/wire.h, checksummed). dtype f32 or f16. With f16, min is rounded
  // toward -inf and max toward +inf so the box still bounds every key; mean rounds to nearest.
  // Values outside the finite f16 range make the f16 form fall back to f32 (the tag says which).
  // Without token keys the bytes are format version 1 (unchanged since it was introduced); with
  // token keys, version 2 appends them (f16 when the dtype and range allow, else f32).
  std::string Serialize(DType dtype = DType::kF16) const;
  // Reads versions 1 and 2. DataLoss on truncated, corrupt or inconsistent bytes.
  static StatusOr<KeySummary> Deserialize(std::string_view bytes);

  friend bool operator==(const KeySummary&, const KeySummary&) = default;
};

// Bounding-box bound of one query vector against one box: sum_d max(q_d*lo_d, q_d*hi_d).
float BoxUpperBound(const float* q, const float* lo, const float* hi, int dim);

// ---------------------------------------------------------------------------------------------
// LatentIndex

// kTokens: token-level attention of chosen retrieval heads (docs/retrieval.md, "Token-level
// scoring"): for each head h = (layer, query head) of IndexOptions::heads and each query token t,
// the softmax of q_t . k_n over every stored token n of every candidate (what the head would
// attend to with all candidates in context, positions marginalised, see rope_marginal_*), summed
// per segment and averaged over the query tokens; a segment's score is the weighted sum over the
// heads, minus the same score of the null query when one is set (SetNullQuery). Needs summaries
// with token keys for every index layer; norm, agg, head_reduce and token_chunks do not apply.
enum class ScoreKind : uint8_t { kBoundingBox = 0, kMeanKey = 1, kTokens = 2 };

// A query head that votes in kTokens searches (a "retrieval head") and its weight.
struct RetrievalHead {
  int layer = 0;   // model layer; must be one of the index layers
  int q_head = 0;  // query head in [0, num_q_heads)
  float weight = 1.0f;

  friend bool operator==(const RetrievalHead&, const RetrievalHead&) = default;
};
enum class TokenNorm : uint8_t { kNone = 0, kSoftmax = 1, kZScore = 2 };
enum class Aggregation : uint8_t { kMean = 0, kMax = 1, kTopP = 2 };
enum class HeadReduce : uint8_t {
  kMeanQuery = 0,  // average the group's query vectors, score once per KV head (cheapest)
  kMeanScore = 1,  // score every query head, average the scores of a group
  kMaxScore = 2,   // score every query head, take the group's maximum
};

// IndexOptions::device values besides CUDA device ordinals (>= 0).
inline constexpr int kCpuDevice = -1;
inline constexpr int kAutoDevice = -2;

struct IndexOptions {
  // Defaults: the best of a grid on planted-fact retrieval with Gemma 3 270M (docs/retrieval.md):
  // mean-key scores, every query token voting, softmax over segments, max over votes.
  ScoreKind score = ScoreKind::kMeanKey;
  TokenNorm norm = TokenNorm::kSoftmax;
  Aggregation agg = Aggregation::kMax;
  HeadReduce head_reduce = HeadReduce::kMeanQuery;
  // Model layers scored, in query order (the summaries must contain them). Empty = the default
  // DefaultIndexLayers(num_layers): every layer up to 8 layers, else 8 evenly spaced ones.
  std::vector<int> layers;
  // Query tokens are averaged into this many contiguous chunks (capped at the token count);
  // 0 = every query token votes separately.
  int token_chunks = 0;
  double top_p = 0.25;  // kTopP: fraction of a segment's votes averaged, in (0, 1]
  // Element type of the in-memory matrix: f16 halves memory and bandwidth (min/max rounded
  // outward so the bound still holds) or f32.
  DType storage = DType::kF16;
  int num_threads = 0;  // 0 = the cores this process may use (sched_getaffinity)

  // Two-stage search (approximate; docs/retrieval.md "Two-stage search"). A search runs it when it
  // has more than `prefilter_min_segments` candidates (after the filters), top_k > 0,
  // SearchRequest::exact is false and the rows it would score do not already cover every
  // candidate; otherwise the search is the exact brute force above.
  //   Stage 1 (proxy): the query is pooled to one vector per (layer, KV head) (mean over every
  //   query token and the GQA group, times the attention scale) on `prefilter_layers` evenly spaced
  //   of the index's layers (DefaultIndexLayers over their positions) and dotted with each
  //   candidate's mean key (also for kBoundingBox: the summary's mean, not the box); each
  //   (layer, KV head) is z-scored across the candidates and the proxy is their sum. The best
  //   max(prefilter_keep, 32 * top_k) non-pinned candidates are kept, plus every pinned one.
  //   Stage 2 (exact): the kept rows are scored as above, together with `prefilter_sample` of the
  //   others spread evenly over them (by slot), each standing for others / prefilter_sample
  //   candidates in the normalisation statistics (softmax denominator, z-score mean and deviation),
  //   so those still estimate the statistics of all candidates; sample rows can be hits too.
  //   prefilter_sample = 0 normalises over the kept rows only (measured much worse, see the doc).
  // A hit's score is then its brute-force score up to the estimate of the statistics (exact for
  // TokenNorm::kNone), and the hits are the brute-force ones when they survive stage 1 and the
  // estimate keeps their order (recall against brute force is tested and benchmarked).
  // Cost: the stage-1 mean keys live in a second matrix (PrefilterRowBytes() per segment, e.g.
  // 4 KiB for 2 layers x 8 KV heads x head_dim 128 in f16) allocated only when enabled.
  // Setting any of prefilter_min_segments, prefilter_keep, prefilter_layers to 0 disables it.
  int prefilter_min_segments = 20000;
  int prefilter_keep = 2048;
  int prefilter_layers = 2;  // capped at the number of index layers
  int prefilter_sample = 1024;

  // kTokens only. Heads that vote (each at most once, layer among `layers`, weight finite);
  // empty = every query head of every index layer with weight 1.
  std::vector<RetrievalHead> heads;
  // kTokens only. Pre-RoPE q . k ignores where the two tokens will sit; in the model the logit of
  // a token delta positions back rotates each frequency pair by omega * delta. With
  // rope_marginal_max > rope_marginal_min >= 0, each pair of the query is weighted by the mean of
  // cos(omega * delta) for delta uniform in [min, max] (the expected logit over those distances:
  // fast-rotating pairs average out, slow ones keep their weight); dims past rotary_dim and NoPE
  // layers keep weight 1. 0, 0 = plain pre-RoPE dot products.
  int rope_marginal_min = 0;
  int rope_marginal_max = 0;

  // Where searches run (docs/retrieval.md "Device search").
  //   kCpuDevice (-1, the default): the CPU, as described above.
  //   N >= 0: CUDA device N holds a mirror of the scoring matrix, kept current by Add/Remove
  //     (changed rows are uploaded in batches: when 64 MiB are pending, else before the next
  //     search, never the whole matrix per search) and searches run there as the exact brute force
  //     (the prefilter_* options apply to CPU searches only), unless SearchRequest::backend says
  //     kCpu. Create returns Unavailable when the build has no CUDA (KVAGENT_CUDA=OFF) or device N
  //     is not usable (never a silent CPU fallback), and Unimplemented for Aggregation::kTopP.
  //   kAutoDevice (-2): device 0 when a CUDA device is usable and agg is not kTopP, else the CPU.
  // LatentIndex::device() (and options().device) hold the resolved choice.
  int device = kCpuDevice;
};

// Up to `count` evenly spaced layers of a `num_layers` model: floor((i + 0.5) * num_layers / count)
// for i < count (Llama-3.1-8B, 32 layers: 2, 6, ..., 30); all layers when num_layers <= count
// or count < 1.
std::vector<int> DefaultIndexLayers(int num_layers, int count = 8);

// Metadata of an indexed segment.
struct IndexEntry {
  Hash128 key;
  std::string ns;
  std::string agent;
  std::string session;
  int64_t turn = 0;
  int32_t chunk = 0;
  int64_t time_us = 0;
  int64_t num_tokens = 0;  // >= 0, counted against SearchRequest::token_budget
  bool pinned = false;     // always returned (system prompt, last turns)

  friend bool operator==(const IndexEntry&, const IndexEntry&) = default;
};

// Query Q vectors, dense [num_layers][num_q_heads][num_tokens][head_dim]; layer i is
// IndexOptions::layers[i] (or model layer i when that is empty). Not owned.
struct QueryView {
  const void* data = nullptr;
  DType dtype = DType::kF32;  // f32, f16 or bf16
  int num_layers = 0;
  int num_q_heads = 0;
  int num_tokens = 0;
  int head_dim = 0;
};

enum class SearchBackend : uint8_t {
  kIndex = 0,   // where IndexOptions::device says
  kCpu = 1,     // the CPU, with the two-stage search where the options enable it
  kDevice = 2,  // the index's CUDA device: Unavailable when the index has none
};

struct SearchRequest {
  int top_k = 5;                        // non-pinned hits at most; 0 = no count limit
  std::optional<int64_t> token_budget;  // total num_tokens of all hits incl. pinned; none = no limit
  std::vector<Hash128> pinned;          // extra keys to include (unknown keys are ignored)
  // Filters; a segment is a candidate when it passes all set ones. Pinned segments must pass
  // the namespace filter (a hard partition) but not the others.
  std::optional<std::string> ns;
  std::optional<std::string> agent;
  std::optional<std::string> session;
  std::optional<int64_t> min_time_us;  // inclusive
  std::optional<int64_t> max_time_us;  // inclusive
  bool explain = true;                 // fill Hit::breakdown
  bool exact = false;                  // brute force even where IndexOptions enable the prefilter
  SearchBackend backend = SearchBackend::kIndex;
};

// One (layer, kv_head, query chunk) vote of a hit, after normalisation.
struct Vote {
  int layer = 0;  // model layer index
  int kv_head = 0;
  int token_begin = 0;  // query tokens [token_begin, token_end)
  int token_end = 0;
  float value = 0;
};

// Why a segment scored what it did: the mean normalised vote per layer, KV head and query chunk,
// and the strongest individual votes.
struct Breakdown {
  std::vector<int> layers;  // model layer indices, matching per_layer
  std::vector<float> per_layer;
  std::vector<float> per_kv_head;
  std::vector<float> per_chunk;
  std::vector<std::pair<int, int>> chunk_tokens;  // [begin, end) query tokens of each chunk
  std::vector<Vote> top_votes;                    // up to 3, strongest first
};

struct Hit {
  IndexEntry entry;
  float score = 0;      // aggregated score (comparable within one search only)
  int rank = 0;         // 0 = highest score among the hits
  bool pinned = false;  // included because pinned (entry flag or request)
  Breakdown breakdown;  // empty unless SearchRequest::explain
};

class LatentIndex {
 public:
  // InvalidArgument on an invalid spec or options (layers out of range or repeated, token_chunks
  // or a prefilter option < 0, top_p outside (0, 1], storage not f32/f16). Any head_dim works; multiples of 8 take
  // the vectorised (AVX+FMA+F16C) path when the CPU has it.
  static StatusOr<std::unique_ptr<LatentIndex>> Create(const ModelSpec& spec, IndexOptions options = {});

  // Adds a segment. AlreadyExists if the key is present; InvalidArgument if the summary's
  // geometry does not match the spec, lacks an indexed layer, entry.num_tokens < 0, or (f16
  // storage) holds values beyond the f16 range. The index is unchanged on error.
  Status Add(const IndexEntry& entry, const KeySummary& summary);
  // Deserialises then adds (DataLoss on malformed bytes).
  Status AddSerialized(const IndexEntry& entry, std::string_view summary_bytes);
  // NotFound if absent.
  Status Remove(const Hash128& key);
  Status SetPinned(const Hash128& key, bool pinned);
  bool Contains(const Hash128& key) const;
  StatusOr<IndexEntry> Get(const Hash128& key) const;
  size_t size() const;
  // Bytes of the scoring matrix rows per segment, of the stage-1 (prefilter) rows per segment
  // (0 when the prefilter is disabled), and of everything allocated.
  size_t RowBytes() const;
  size_t PrefilterRowBytes() const;
  size_t MemoryBytes() const;
  // CUDA device searches run on (kCpuDevice: none), and the device bytes it holds for this index
  // (mirror capacity and search workspace; 0 without a device).
  int device() const { return options_.device; }
  size_t DeviceMemoryBytes() const;

  // kTokens only: the content-free query (e.g. "N/A" in the same template) whose score is
  // subtracted from every candidate's (in-context re-ranking calibration), copied; an empty view
  // (data == nullptr) clears it. InvalidArgument on a wrong shape (as Search) or for other kinds.
  Status SetNullQuery(const QueryView& query);
  bool has_null_query() const;
  // Bytes of per-token keys held for kTokens scoring (0 for other kinds).
  size_t TokenKeyBytes() const;

  // Scores the candidates and selects hits (see the file comment). InvalidArgument on a query
  // of the wrong shape or dtype; ResourceExhausted if candidates x layers x kv_heads x chunks
  // exceeds 2^30 votes (4 GiB of scratch; device searches: if the device lacks the memory for
  // them); Unavailable for SearchBackend::kDevice on an index without a device; Internal on CUDA
  // errors; empty result when nothing matches.
  StatusOr<std::vector<Hit>> Search(const QueryView& query, const SearchRequest& request) const;

  const ModelSpec& spec() const { return spec_; }
  const IndexOptions& options() const { return options_; }
  // Model layers scored, in query order.
  const std::vector<int>& layers() const { return layers_; }

  ~LatentIndex();

 private:
  LatentIndex(const ModelSpec& spec, IndexOptions options, std::vector<int> layers);
  // kTokens: per-layer query weights and resolved heads (Create; InvalidArgument on bad heads).
  Status PrepareTokenScoring();

  ModelSpec spec_;
  IndexOptions options_;
  std::vector<int> layers_;
  std::vector<int> prefilter_slots_;  // positions in layers_ of the stage-1 layers (empty: no prefilter)

  mutable std::shared_mutex mu_;
  // Row of slot i: [layer][kv_head][max | min] or [..][mean] in rows_; the mean keys of the stage-1
  // layers, [prefilter layer][kv_head][mean], in pre_rows_ (a separate matrix because a sweep over
  // a few short runs of every wide row reads memory at a fraction of the streaming rate).
  // Removal moves the last row into the hole.
  std::unique_ptr<index_internal::RowBlocks> rows_;
  std::unique_ptr<index_internal::RowBlocks> pre_rows_;
  // kTokens: per slot, f16 token keys [index layer][kv_head][tokens][head_dim] and their count.
  std::vector<std::vector<uint16_t>> token_keys_;
  std::vector<int> token_counts_;
  size_t token_key_bytes_ = 0;
  // kTokens: per index layer, the query's per-dim weight (attention scale x RoPE marginalisation),
  // the heads resolved to (layer slot, q_head, weight), and the null query [L][Hq][T][D] f32.
  std::vector<std::vector<float>> q_weight_;
  std::vector<RetrievalHead> token_heads_;  // layer = slot in layers_
  std::vector<float> null_query_;
  int null_tokens_ = 0;
  std::vector<IndexEntry> entries_;  // by slot
  std::unordered_map<Hash128, size_t, Hash128Hasher> slot_of_;
  // Device mirror of rows_ (IndexOptions::device >= 0); its searches are serialised by device_mu_.
  std::unique_ptr<cuda::IndexMirror> mirror_;
  mutable std::mutex device_mu_;
};

}  // namespace kvagent
