// Segment: a contiguous span of tokens (usually one turn, split at a maximum length) with its
// KV payload, positions and metadata. The unit of storage, retrieval and reuse.
//
// Canonical payload layout: [layer][k|v][kv_head][token][dim], densely packed, element type
// layout.dtype (f32, f16 or bf16). Keys are stored pre-RoPE when `pre_rope` is true (the
// default for memory segments: rotation is applied once, at the planned position).
//
// Ownership: payload bytes live in a refcounted Buffer; copying a Segment shares them. A
// Segment handed out by a store is immutable (std::shared_ptr<const Segment>): holders may read
// it concurrently; the store never frees it while a handle exists.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kvagent/dtype.h"
#include "kvagent/hash.h"
#include "kvagent/model_spec.h"
#include "kvagent/status.h"

namespace kvagent {

// Owned bytes, 64-byte aligned (4 KiB-aligned from 64 KiB up, for direct I/O). Contents are
// uninitialised after Allocate.
class Buffer {
 public:
  // Allocator hook: the CUDA build installs one that returns pinned host memory (a Store with a
  // device tier does so when it opens). `free` must accept what `alloc` returned. Thread-safe and
  // allowed at any time: every buffer is freed by the allocator it came from. An Allocator without
  // `alloc` restores the default (aligned_alloc).
  struct Allocator {
    std::function<void*(size_t)> alloc;
    std::function<void(void*)> free;
    const char* name = "aligned";
  };
  static void SetHostAllocator(Allocator allocator);
  static const char* HostAllocatorName();

  // ResourceExhausted if memory cannot be had.
  static StatusOr<std::shared_ptr<Buffer>> Allocate(size_t size);
  // Allocates and copies `bytes`.
  static StatusOr<std::shared_ptr<Buffer>> CopyOf(std::span<const std::byte> bytes);
  // Wraps memory owned elsewhere (e.g. a DLPack tensor); `release` runs when the last
  // reference drops. No copy.
  static std::shared_ptr<Buffer> Wrap(std::byte* data, size_t size, std::function<void()> release);

  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  std::byte* data() { return data_; }
  const std::byte* data() const { return data_; }
  size_t size() const { return size_; }
  std::span<std::byte> span() { return {data_, size_}; }
  std::span<const std::byte> span() const { return {data_, size_}; }

 private:
  Buffer(std::byte* data, size_t size, std::function<void()> release)
      : data_(data), size_(size), release_(std::move(release)) {}
  std::byte* data_;
  size_t size_;
  std::function<void()> release_;
};

// Shape of a canonical payload.
struct SegmentLayout {
  int num_layers = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int num_tokens = 0;
  DType dtype = DType::kF32;

  size_t NumElements() const { return static_cast<size_t>(num_layers) * 2 * num_kv_heads * num_tokens * head_dim; }
  size_t NumBytes() const { return NumElements() * DTypeSize(dtype); }
  // Element offset of (layer, kv: 0 = K / 1 = V, head, token, dim 0).
  size_t Offset(int layer, int kv, int head, int token) const {
    return (((static_cast<size_t>(layer) * 2 + kv) * num_kv_heads + head) * num_tokens + token) *
           static_cast<size_t>(head_dim);
  }
  // Elements of one [token][dim] plane (one layer, K or V, one head).
  size_t PlaneElements() const { return static_cast<size_t>(num_tokens) * head_dim; }

  // The layout a model produces for `num_tokens` tokens.
  static SegmentLayout ForModel(const ModelSpec& spec, int num_tokens) {
    return SegmentLayout{spec.num_layers, spec.num_kv_heads, spec.head_dim, num_tokens, spec.kv_dtype};
  }
  friend bool operator==(const SegmentLayout&, const SegmentLayout&) = default;
};

struct SegmentMeta {
  std::string ns;       // namespace (tenant / application)
  std::string agent;    // agent id within the namespace
  std::string session;  // session id
  int64_t turn = 0;     // turn index within the session
  int32_t chunk = 0;    // chunk index when a turn is split at the maximum segment length
  std::string role;     // "system", "user", "assistant", ...
  std::string text;     // the turn's text (for display and plaintext baselines)
  int64_t time_us = 0;  // wall-clock time of the turn, microseconds since the Unix epoch

  friend bool operator==(const SegmentMeta&, const SegmentMeta&) = default;
};

struct Segment {
  Hash128 key;     // store key (PrefixKey or MemoryKey)
  Hash128 model;   // ModelSpec::fingerprint of the weights that produced the KV
  Hash128 parent;  // previous segment in a prefix chain (zero if none)
  SegmentLayout layout;
  bool pre_rope = true;            // keys stored without rotation
  std::vector<int32_t> tokens;     // size layout.num_tokens
  std::vector<int64_t> positions;  // original positions, size layout.num_tokens
  SegmentMeta meta;
  std::shared_ptr<Buffer> payload;  // layout.NumBytes() bytes, canonical layout
  std::string summary;              // compressed keys (kvagent/index), opaque to the store

  size_t PayloadBytes() const { return layout.NumBytes(); }
  // Content hash of the tokens under `model` (de-duplication).
  Hash128 Content() const { return ContentHash(model, tokens); }

  // InvalidArgument unless the fields are mutually consistent (sizes, dtype, payload present).
  Status Validate() const;
  // Validate() plus: the layout matches `spec` (FailedPrecondition on fingerprint mismatch).
  Status ValidateFor(const ModelSpec& spec) const;
};

using SegmentHandle = std::shared_ptr<const Segment>;

// Metadata and sizes of a stored segment without its payload.
struct SegmentInfo {
  Hash128 key;
  Hash128 model;
  Hash128 parent;
  SegmentLayout layout;
  bool pre_rope = true;
  SegmentMeta meta;
  uint64_t payload_bytes = 0;  // canonical (decoded) bytes
  uint64_t stored_bytes = 0;   // bytes in the tier holding it (after the codec)
  uint8_t codec = 0;           // CodecKind of the tier holding it (kvagent/codec.h; 0 = raw)
  std::string summary;         // compressed keys (as Segment::summary), so an index can be
                               // rebuilt from metadata alone, without reading payloads
};

SegmentInfo InfoOf(const Segment& s);

// FailedPrecondition "segment was produced by model X, reader expects Y" unless equal.
Status CheckFingerprint(const Hash128& segment_model, const Hash128& expected);

}  // namespace kvagent
