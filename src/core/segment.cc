#include "kvagent/segment.h"

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>

namespace kvagent {

namespace {

constexpr size_t kAlign = 64;
// Large buffers start on a page so the disk tier can hand them to direct I/O without a copy.
constexpr size_t kPageAlign = 4096;
constexpr size_t kPageAlignFrom = 64 << 10;
// Buffers of 4 MiB and more are 2 MiB-aligned and asked to be backed by transparent huge pages
// (the machine's THP mode is often "madvise"): one fault per 2 MiB instead of 512 and far fewer
// TLB misses while segments are copied (measured: docs/benchmarks.md, Store, huge pages).
constexpr size_t kHugeFrom = 4 << 20;
constexpr size_t kHugeAlign = 2 << 20;

void* AlignedAlloc(size_t size) {
  if (size >= kHugeFrom) {
    const size_t rounded = (size + kHugeAlign - 1) / kHugeAlign * kHugeAlign;
    void* p = std::aligned_alloc(kHugeAlign, rounded);
    if (p != nullptr) ::madvise(p, rounded, MADV_HUGEPAGE);
    return p;
  }
  const size_t align = size >= kPageAlignFrom ? kPageAlign : kAlign;
  size_t rounded = (size + align - 1) / align * align;
  return std::aligned_alloc(align, rounded == 0 ? align : rounded);
}

// The current allocator, swapped whole under a lock so Allocate may run on any thread while
// SetHostAllocator installs another (each Buffer keeps the free function it was allocated with).
std::shared_ptr<const Buffer::Allocator> DefaultAllocator() {
  return std::make_shared<const Buffer::Allocator>(
      Buffer::Allocator{AlignedAlloc, [](void* p) { std::free(p); }, "aligned"});
}

struct AllocatorSlot {
  std::mutex mu;
  std::shared_ptr<const Buffer::Allocator> current = DefaultAllocator();
};

AllocatorSlot& Slot() {
  static AllocatorSlot slot;
  return slot;
}

std::shared_ptr<const Buffer::Allocator> CurrentAllocator() {
  AllocatorSlot& s = Slot();
  std::lock_guard<std::mutex> l(s.mu);
  return s.current;
}

}  // namespace

void Buffer::SetHostAllocator(Allocator allocator) {
  auto next = allocator.alloc ? std::make_shared<const Allocator>(std::move(allocator)) : DefaultAllocator();
  AllocatorSlot& s = Slot();
  std::lock_guard<std::mutex> l(s.mu);
  s.current = std::move(next);
}
const char* Buffer::HostAllocatorName() { return CurrentAllocator()->name; }

StatusOr<std::shared_ptr<Buffer>> Buffer::Allocate(size_t size) {
  const std::shared_ptr<const Allocator> a = CurrentAllocator();
  void* p = a->alloc(size);
  if (p == nullptr) return ResourceExhaustedError("cannot allocate " + std::to_string(size) + " bytes of host memory");
  auto free_fn = a->free;
  return std::shared_ptr<Buffer>(new Buffer(static_cast<std::byte*>(p), size, [p, free_fn] { free_fn(p); }));
}

StatusOr<std::shared_ptr<Buffer>> Buffer::CopyOf(std::span<const std::byte> bytes) {
  KVAGENT_ASSIGN_OR_RETURN(auto buf, Allocate(bytes.size()));
  if (!bytes.empty()) std::memcpy(buf->data(), bytes.data(), bytes.size());
  return buf;
}

std::shared_ptr<Buffer> Buffer::Wrap(std::byte* data, size_t size, std::function<void()> release) {
  return std::shared_ptr<Buffer>(new Buffer(data, size, std::move(release)));
}

Buffer::~Buffer() {
  if (release_) release_();
}

Status Segment::Validate() const {
  const SegmentLayout& l = layout;
  if (l.num_layers <= 0 || l.num_kv_heads <= 0 || l.head_dim <= 0 || l.num_tokens <= 0)
    return InvalidArgumentError("segment layout must have positive layers, kv_heads, head_dim and tokens");
  if (l.dtype != DType::kF32 && l.dtype != DType::kF16 && l.dtype != DType::kBF16)
    return InvalidArgumentError("segment dtype must be f32, f16 or bf16, got " + std::string(DTypeName(l.dtype)));
  if (tokens.size() != static_cast<size_t>(l.num_tokens))
    return InvalidArgumentError("segment has " + std::to_string(tokens.size()) + " token ids for " +
                                std::to_string(l.num_tokens) + " tokens");
  if (positions.size() != static_cast<size_t>(l.num_tokens))
    return InvalidArgumentError("segment has " + std::to_string(positions.size()) + " positions for " +
                                std::to_string(l.num_tokens) + " tokens");
  if (!payload) return InvalidArgumentError("segment has no payload");
  if (payload->size() != l.NumBytes())
    return InvalidArgumentError("segment payload has " + std::to_string(payload->size()) + " bytes, layout needs " +
                                std::to_string(l.NumBytes()));
  if (key.IsZero()) return InvalidArgumentError("segment key is zero");
  if (model.IsZero()) return InvalidArgumentError("segment model fingerprint is zero");
  return Status::Ok();
}

Status Segment::ValidateFor(const ModelSpec& spec) const {
  KVAGENT_RETURN_IF_ERROR(Validate());
  KVAGENT_RETURN_IF_ERROR(CheckFingerprint(model, spec.fingerprint));
  if (layout.num_layers != spec.num_layers || layout.num_kv_heads != spec.num_kv_heads ||
      layout.head_dim != spec.head_dim)
    return InvalidArgumentError("segment layout (" + std::to_string(layout.num_layers) + " layers, " +
                                std::to_string(layout.num_kv_heads) + " kv heads, dim " +
                                std::to_string(layout.head_dim) + ") does not match model '" + spec.name + "'");
  if (layout.dtype != spec.kv_dtype)
    return InvalidArgumentError("segment dtype " + std::string(DTypeName(layout.dtype)) + " != model kv dtype " +
                                std::string(DTypeName(spec.kv_dtype)));
  return Status::Ok();
}

SegmentInfo InfoOf(const Segment& s) {
  SegmentInfo i;
  i.key = s.key;
  i.model = s.model;
  i.parent = s.parent;
  i.layout = s.layout;
  i.pre_rope = s.pre_rope;
  i.meta = s.meta;
  i.payload_bytes = s.layout.NumBytes();
  i.stored_bytes = s.layout.NumBytes();
  i.summary = s.summary;
  return i;
}

Status CheckFingerprint(const Hash128& segment_model, const Hash128& expected) {
  if (segment_model == expected) return Status::Ok();
  return FailedPreconditionError("model fingerprint mismatch: segment was produced by model " + segment_model.ToHex() +
                                 ", reader expects " + expected.ToHex());
}

}  // namespace kvagent
